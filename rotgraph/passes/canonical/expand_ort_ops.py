"""Expand onnxruntime's fused norm and MatMul ops back into the standard ops rotgraph's patterns read."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from rotgraph.constants import MS_DOMAIN, ORT_NORMS_KEY
from rotgraph.errors import StructureError

logger = logging.getLogger(__name__)

_NORM_DOMAINS = ("", MS_DOMAIN)  # onnxruntime registers SimplifiedLayerNormalization in the default domain
_STATS = {"SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (1, 2)}  # mean / inv-std


def _used(node: ir.Node, index: int) -> bool:
    return index < len(node.outputs) and (bool(node.outputs[index].uses()) or node.outputs[index].is_graph_output())


def _refusal(node: ir.Node) -> str | None:
    """Why a (Skip)SimplifiedLayerNormalization node has no exact expansion, or None when it has one."""
    x = node.inputs[0]
    if node.attributes.get_int("axis", -1) not in (-1, len(x.shape or ()) - 1 if x is not None else -1):
        return "normalizes over a non-last axis"
    if any(_used(node, i) for i in _STATS[node.op_type]):
        return "its mean / inverse-std outputs are used"
    return None


def _checked(normalized: ir.Value) -> pattern.MatchResult:
    result = pattern.MatchResult()
    node = normalized.producer()
    assert node is not None
    if (why := _refusal(node)) is not None:
        return result.fail(why, node)
    return result


def _rms(op, x: ir.Value, scale: ir.Value, fused: ir.Node) -> ir.Value:  # type: ignore[no-untyped-def]
    """RMSNormalization over the last axis with `fused`'s epsilon (in float32, as onnxruntime computes it)."""
    epsilon = fused.attributes.get_float("epsilon", 1e-5)
    return op.RMSNormalization(x, scale, axis=-1, epsilon=epsilon, stash_type=1, _name=f"{fused.name}.rms")


class _ExpandNorm(pattern.RewriteRuleClassBase):
    """SimplifiedLayerNormalization(x, w) -> RMSNormalization(x, w); its inverse-std output unused."""

    def __init__(self, domain: str) -> None:
        super().__init__(f"ExpandSimplifiedLayerNorm[{domain}]")
        self._domain = domain

    def pattern(self, op, x, scale):  # type: ignore[no-untyped-def]
        return op.SimplifiedLayerNormalization(
            x, scale, _domain=self._domain, _allow_other_attributes=True, _outputs=["normalized"]
        )

    def check(self, op, normalized, **_):  # type: ignore[no-untyped-def]
        return _checked(normalized)

    def rewrite(self, op, x, scale, normalized):  # type: ignore[no-untyped-def]
        return _rms(op, x, scale, normalized.producer())


class _ExpandSkipNorm(pattern.RewriteRuleClassBase):
    """SkipSimplifiedLayerNormalization(x, skip, w[, bias]) -> s = x + skip [+ bias], RMSNormalization(s, w).

    With `total`, the pattern is the op with its residual-sum output (index 3) and s takes it over; without,
    the op's outputs after the first must be unused (the matcher refuses a node whose other outputs are read).
    """

    def __init__(self, domain: str, *, total: bool) -> None:
        super().__init__(f"ExpandSkipSimplifiedLayerNorm[{domain}]{'+sum' if total else ''}")
        self._domain = domain
        self._total = total

    def pattern(self, op, x, skip, gamma):  # type: ignore[no-untyped-def]
        bias = pattern.Var("bias", can_match_none=True)
        outputs = ["normalized", None, None, "total"] if self._total else ["normalized"]
        fused = op.SkipSimplifiedLayerNormalization(
            x, skip, gamma, bias, _domain=self._domain, _allow_other_attributes=True, _outputs=outputs
        )
        return (fused[0], fused[3]) if self._total else fused

    def check(self, op, normalized, **_):  # type: ignore[no-untyped-def]
        return _checked(normalized)

    def rewrite(self, op, x, skip, gamma, bias, normalized, **_):  # type: ignore[no-untyped-def]
        fused = normalized.producer()
        total = op.Add(x, skip, _name=f"{fused.name}.add")
        if bias is not None:
            total = op.Add(total, bias, _name=f"{fused.name}.bias")
        out = _rms(op, total, gamma, fused)
        return (out, total) if self._total else out


class _ExpandFusedMatMul(pattern.RewriteRuleClassBase):
    """FusedMatMul(A, B, transB, alpha) -> MatMul(A, Transpose(B)) [* alpha]; a transposed A or batch stays."""

    def pattern(self, op, a, b):  # type: ignore[no-untyped-def]
        return op.FusedMatMul(a, b, _domain=MS_DOMAIN, _allow_other_attributes=True, _outputs=["product"])

    def check(self, op, b, product, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        attrs = product.producer().attributes
        if any(attrs.get_int(name, 0) for name in ("transA", "transBatchA", "transBatchB")):
            return result.fail("A or a batch axis is transposed", product)
        if b.shape is None or len(b.shape) < 2:
            return result.fail("B's rank is unknown or below 2", b)
        return result

    def rewrite(self, op, a, b, product):  # type: ignore[no-untyped-def]
        fused = product.producer()
        if fused.attributes.get_int("transB", 0):
            rank = len(b.shape)
            perm = [*range(rank - 2), rank - 1, rank - 2]
            b = op.Transpose(b, perm=perm, _name=f"{fused.name}.transpose")
        out = op.MatMul(a, b, _name=f"{fused.name}.matmul")
        alpha = fused.attributes.get_float("alpha", 1.0)
        if alpha != 1.0:
            out = op.Mul(out, op.Constant(value=ir.tensor(np.float32(alpha))), _name=f"{fused.name}.alpha")
        return out


NORM_RULES = pattern.RewriteRuleSet([_ExpandNorm.rule(d) for d in _NORM_DOMAINS])
# The rule without the residual sum comes first, so a node whose sum is unused keeps its Add anonymous
SKIP_RULES = pattern.RewriteRuleSet([_ExpandSkipNorm.rule(d, total=t) for d in _NORM_DOMAINS for t in (False, True)])
MATMUL_RULES = pattern.RewriteRuleSet([_ExpandFusedMatMul.rule()])


class ExpandOrtFusedOpsPass(ir.passes.InPlacePass):
    """onnxruntime's fused ops (from its transformer optimizer or onnxscript's ort_fusions) -> standard ops.

    - SimplifiedLayerNormalization(x, w)  ->  RMSNormalization(x, w) (opset 23, same epsilon, last axis);
    - SkipSimplifiedLayerNormalization(x, skip, w[, bias])  ->  s = x + skip [+ bias], RMSNormalization(s, w),
      with the op's residual-sum output (index 3) taken over by s;
    - FusedMatMul(A, B, transB, alpha) (the tied lm_head, attention scores)  ->  MatMul(A, Transpose(B))
      [* alpha].

    Each is an onnxscript rewrite rule. Guarantees: the function is unchanged (the same expressions,
    unfused); afterwards residual adds and norms are separate nodes as structure discovery expects. Refuses
    (StructureError, naming the node and the reason) forms whose expansion would not be exact: a used mean /
    inverse-std output, a norm over another axis; leaves a FusedMatMul with a transposed A or batch
    transposes as it is.
    """

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < 23:
            raise ir.passes.PreconditionError("RMSNormalization needs opset 23: run CanonicalizeNormsPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts = {"norm": 0, "skip": 0, "matmul": 0}
        if any(n.op_type in _STATS and n.domain in _NORM_DOMAINS for n in model.graph):
            counts["norm"] = NORM_RULES.apply_to_model(model)
            counts["skip"] = SKIP_RULES.apply_to_model(model)
            for node in model.graph:
                if node.op_type in _STATS and node.domain in _NORM_DOMAINS:
                    why = _refusal(node) or "no expansion rule matched it"
                    raise StructureError(f"{node.op_type} node {node.name!r}: {why}")
        if any(n.op_type == "FusedMatMul" and n.domain == MS_DOMAIN for n in model.graph):
            counts["matmul"] = MATMUL_RULES.apply_to_model(model)
        logger.info(
            "expanded %d SimplifiedLayerNormalization, %d SkipSimplifiedLayerNormalization, %d FusedMatMul",
            counts["norm"],
            counts["skip"],
            counts["matmul"],
        )
        if counts["norm"] or counts["skip"]:  # RestoreOrtNormsPass fuses them again at the end
            model.metadata_props[ORT_NORMS_KEY] = json.dumps({"simplified": counts["norm"], "skip": counts["skip"]})
        return ir.passes.PassResult(model, any(counts.values()))
