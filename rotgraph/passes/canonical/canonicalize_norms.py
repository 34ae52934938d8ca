"""Rewrite decomposed RMSNorms into the opset-23 RMSNormalization op."""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import version_converter
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.rules.fusion import _rms_normalization

from rotgraph.errors import RotgraphError

logger = logging.getLogger(__name__)

RMS_OPSET = 23


class _DivRmsNormFusion(pattern.RewriteRuleClassBase):
    """RMSNorm written with Div: x * (1 / sqrt(mean(x^2) + eps)) * w, or x / sqrt(...) * w.

    The TorchScript exporter emits the first form; onnxscript's own rules cover the Reciprocal form.
    """

    def __init__(self, name: str, *, one_over: bool, scale_first: bool) -> None:
        super().__init__(name)
        self._one_over = one_over
        self._scale_first = scale_first

    def pattern(self, op, x, scale, epsilon, one, compute_dtype, target_dtype):  # type: ignore[no-untyped-def]
        x = pattern.OrValue([op.Cast(x, to=compute_dtype), x])
        mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1, _allow_other_attributes=True)
        rms = op.Sqrt(op.Add(mean_square, epsilon))
        normalized = op.Mul(x, op.Div(one, rms)) if self._one_over else op.Div(x, rms)
        normalized = pattern.OrValue([op.Cast(normalized, to=target_dtype), normalized])
        return op.Mul(scale, normalized) if self._scale_first else op.Mul(normalized, scale)

    def check(self, op, x, scale, epsilon, one=None, compute_dtype=None, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if not isinstance(_ir_utils.get_singleton_value(epsilon), float):
            return result.fail("epsilon is not a float scalar", epsilon)
        if self._one_over and _ir_utils.get_singleton_value(one) != 1.0:
            return result.fail("numerator is not 1", one)
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return result.fail("input is not a float tensor", x)
        self._stash = compute_dtype.as_int() if compute_dtype is not None else ir.DataType.FLOAT
        return result

    def rewrite(self, op, x, scale, epsilon, **_):  # type: ignore[no-untyped-def]
        return op.RMSNormalization(
            x, scale, axis=-1, epsilon=_ir_utils.get_singleton_value(epsilon), stash_type=self._stash
        )


RULES = pattern.RewriteRuleSet(
    [
        *_rms_normalization.rms_normalization_rules,
        *(
            _DivRmsNormFusion.rule(f"DivRmsNorm_{one}_{first}", one_over=one, scale_first=first)
            for one in (True, False)
            for first in (True, False)
        ),
    ]
)


def _remove_noop_casts(graph: ir.Graph) -> int:
    """Drop Cast nodes whose input already has the target type (the TorchScript exporter emits many)."""
    outputs = set(map(id, graph.outputs))
    removed = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        source, out = node.inputs[0], node.outputs[0]
        to = node.attributes.get_int("to")
        if source is None or source.dtype is None or to != source.dtype.value or id(out) in outputs:
            continue
        out.replace_all_uses_with(source)
        graph.remove(node, safe=True)
        removed += 1
    return removed


class _Reasons(logging.Handler):
    """The exceptions a logger reports (the version converter logs why it left a model unconverted)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.reasons.append(" ".join(str(record.exc_info[1]).split()))


def _convert_version(model: ir.Model) -> None:
    """Raise the default opset to RMS_OPSET, or fail with a RotgraphError naming the opset found and why
    the conversion failed (onnxscript's converter handles opset 18 on; it hands older graphs to onnx's)."""
    found = model.opset_imports.get("")
    if found is None:
        raise RotgraphError(
            f"the graph imports no ONNX opset (only {sorted(model.opset_imports)}): rotgraph needs opset {RMS_OPSET}"
        )
    converter_log = logging.getLogger(version_converter.__name__)
    reasons, level, propagate = _Reasons(), converter_log.level, converter_log.propagate
    converter_log.propagate = converter_log.isEnabledFor(logging.WARNING)  # shown as before; caught here
    converter_log.setLevel(logging.WARNING)
    converter_log.addHandler(reasons)
    try:
        version_converter.convert_version(model, RMS_OPSET, fallback=True)
        converted = model.opset_imports.get("", 1) >= RMS_OPSET
    except Exception as e:  # onnxscript's converter raises on a graph it cannot read
        reasons.reasons.append(f"{type(e).__name__}: {' '.join(str(e).split())}")
        converted = False
    finally:
        converter_log.removeHandler(reasons)
        converter_log.setLevel(level)
        converter_log.propagate = propagate
    if not converted:
        why = reasons.reasons[-1] if reasons.reasons else "no reason given"
        raise RotgraphError(
            f"the graph imports ONNX opset {found}: rotgraph needs opset {RMS_OPSET} (RMSNormalization) and "
            f"could not convert the graph to it ({why}); export the model at opset 18 or later"
        )


class CanonicalizeNormsPass(ir.passes.InPlacePass):
    """Raise the default opset to 23 and fuse every decomposed RMSNorm into RMSNormalization.

    First lifts small Constant nodes into initializers (so patterns see their values) and removes
    no-op Casts; then matches Pow/ReduceMean/Add/Sqrt followed by Reciprocal, Div(1, .) or Div(x, .),
    optional Casts, and the scale Mul in either order. Guarantees: the function is unchanged
    (RMSNormalization computes the same expression); already fused norms are left as they are.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if model.opset_imports.get("", 1) < RMS_OPSET:
            _convert_version(model)
            modified = True
        lifted = common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=16)(model)
        modified |= lifted.modified
        modified |= _remove_noop_casts(model.graph) > 0
        count = RULES.apply_to_model(model)
        logger.info("fused %d decomposed RMSNorms into RMSNormalization", count)
        return ir.passes.PassResult(model, modified or count > 0)
