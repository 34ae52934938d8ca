"""Expand onnxruntime's fused norm and MatMul ops back into the standard ops rotgraph's patterns read."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import ORT_NORMS_KEY
from rotgraph.errors import StructureError

logger = logging.getLogger(__name__)

_ORT_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _rms(x: ir.Value, scale: ir.Value, epsilon: float, name: str) -> ir.Node:
    return ir.Node(
        "",
        "RMSNormalization",
        [x, scale],
        [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", epsilon), ir.AttrInt64("stash_type", 1)],
        name=name,
    )


def _used(node: ir.Node, index: int) -> bool:
    return index < len(node.outputs) and (bool(node.outputs[index].uses()) or node.outputs[index].is_graph_output())


class ExpandOrtFusedOpsPass(ir.passes.InPlacePass):
    """onnxruntime's fused ops (from its transformer optimizer or onnxscript's ort_fusions) -> standard ops.

    - SimplifiedLayerNormalization(x, w)  ->  RMSNormalization(x, w) (opset 23, same epsilon, last axis);
    - SkipSimplifiedLayerNormalization(x, skip, w[, bias])  ->  s = x + skip [+ bias], RMSNormalization(s, w),
      with the op's residual-sum output (index 3) taken over by s;
    - FusedMatMul(A, B, transB, alpha) (the tied lm_head, attention scores)  ->  MatMul(A, Transpose(B))
      [* alpha].

    Guarantees: the function is unchanged (the same expressions, unfused); afterwards residual adds and
    norms are separate nodes as structure discovery expects. Refuses (StructureError) forms whose
    expansion would not be exact: a used mean / inverse-std output, a norm over another axis; leaves a
    FusedMatMul with a transposed A or batch transposes as it is.
    """

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < 23:
            raise ir.passes.PreconditionError("RMSNormalization needs opset 23: run CanonicalizeNormsPass first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts = {"norm": 0, "skip": 0, "matmul": 0}
        for node in list(graph):
            if node.domain not in _ORT_DOMAINS:
                continue
            if node.op_type == "SimplifiedLayerNormalization":
                self._norm(graph, node)
                counts["norm"] += 1
            elif node.op_type == "SkipSimplifiedLayerNormalization":
                self._skip_norm(graph, node)
                counts["skip"] += 1
            elif node.op_type == "FusedMatMul" and node.domain == "com.microsoft" and self._matmul(graph, node):
                counts["matmul"] += 1
        logger.info(
            "expanded %d SimplifiedLayerNormalization, %d SkipSimplifiedLayerNormalization, %d FusedMatMul",
            counts["norm"],
            counts["skip"],
            counts["matmul"],
        )
        if counts["norm"] or counts["skip"]:  # RestoreOrtNormsPass fuses them again at the end
            model.metadata_props[ORT_NORMS_KEY] = json.dumps({"simplified": counts["norm"], "skip": counts["skip"]})
        return ir.passes.PassResult(model, any(counts.values()))

    @staticmethod
    def _check_norm(node: ir.Node, unused: tuple[int, ...]) -> float:
        if node.attributes.get_int("axis", -1) not in (-1, len(node.inputs[0].shape or ()) - 1):  # type: ignore[union-attr]
            raise StructureError(f"{node.op_type} node {node.name!r} normalizes over a non-last axis")
        if any(_used(node, i) for i in unused):
            raise StructureError(f"{node.op_type} node {node.name!r}: its mean / inverse-std outputs are used")
        return node.attributes.get_float("epsilon", 1e-5)

    def _norm(self, graph: ir.Graph, node: ir.Node) -> None:
        epsilon = self._check_norm(node, (1,))
        x, scale = node.inputs[0], node.inputs[1]
        assert x is not None and scale is not None
        new = _rms(x, scale, epsilon, f"{node.name}.rms")
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])

    def _skip_norm(self, graph: ir.Graph, node: ir.Node) -> None:
        epsilon = self._check_norm(node, (1, 2))
        x, skip, gamma = node.inputs[:3]
        bias = node.inputs[3] if len(node.inputs) > 3 else None
        assert x is not None and skip is not None and gamma is not None
        nodes = [ir.Node("", "Add", [x, skip], name=f"{node.name}.add")]
        if bias is not None:
            nodes.append(ir.Node("", "Add", [nodes[-1].outputs[0], bias], name=f"{node.name}.bias"))
        total = nodes[-1].outputs[0]
        nodes.append(_rms(total, gamma, epsilon, f"{node.name}.rms"))
        old, new = [node.outputs[0]], [nodes[-1].outputs[0]]
        if _used(node, 3):
            old.append(node.outputs[3])
            new.append(total)
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, old, new)

    @staticmethod
    def _matmul(graph: ir.Graph, node: ir.Node) -> bool:
        a, b = node.inputs[:2]
        attrs = node.attributes
        plain = (
            attrs.get_int("transA", 0) == 0
            and attrs.get_int("transBatchA", 0) == 0
            and attrs.get_int("transBatchB", 0) == 0
        )
        if a is None or b is None or not plain or b.shape is None or len(b.shape) < 2:
            return False
        nodes = []
        if attrs.get_int("transB", 0):
            rank = len(b.shape)
            perm = [*range(rank - 2), rank - 1, rank - 2]
            nodes.append(ir.Node("", "Transpose", [b], [ir.AttrInt64s("perm", perm)], name=f"{node.name}.transpose"))
            b = nodes[-1].outputs[0]
        nodes.append(ir.Node("", "MatMul", [a, b], name=f"{node.name}.matmul"))
        alpha = attrs.get_float("alpha", 1.0)
        if alpha != 1.0:
            scale = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(np.float32(alpha)))])
            nodes += [scale, ir.Node("", "Mul", [nodes[-1].outputs[0], scale.outputs[0]], name=f"{node.name}.alpha")]
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [node.outputs[0]], [nodes[-1].outputs[0]])
        return True
