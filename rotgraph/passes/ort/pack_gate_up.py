"""Pack the gate and up projections of a SwiGLU MLP into one MatMul followed by a Split."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.passes.ort.pack_qkv import Projection, pack_projections, projection, same_kind

logger = logging.getLogger(__name__)


def _plain(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _width(p: Projection) -> int | None:
    """Output channels of the projection (Split halves the packed output: both must have the same)."""
    if p.node.op_type == "MatMulNBits":
        return p.node.attributes.get_int("N", 0) or None
    weight = p.node.inputs[1]
    shape = weight.shape if weight is not None else None
    return shape[-1] if shape is not None and isinstance(shape[-1], int) else None


def _swiglu(node: ir.Node) -> tuple[Projection, Projection] | None:
    """(gate, up) when `node` is Mul(Mul(g, Sigmoid(g)), u) (either operand order) with g and u projections
    of the same kind and the same input, g read only by that Sigmoid and Mul, u only by `node`."""
    if not _plain(node, "Mul"):
        return None
    for silu_value, up_value in (node.inputs, reversed(node.inputs)):
        silu = silu_value.producer() if silu_value is not None else None
        if not _plain(silu, "Mul"):
            continue
        assert silu is not None
        for g, s in (silu.inputs, reversed(silu.inputs)):
            sigmoid = s.producer() if s is not None else None
            if not _plain(sigmoid, "Sigmoid") or sigmoid.inputs[0] is not g:  # type: ignore[union-attr]
                continue
            gate, up = projection(g, readers=2), projection(up_value)
            if gate is None or up is None:
                continue
            if same_kind([gate, up]) and _width(gate) == _width(up) is not None:
                return gate, up
    return None


class PackGateUpPass(ir.passes.InPlacePass):
    """SwiGLU's gate and up projections of one input -> one projection of twice the width + Split.

    Where Mul(SiLU(gate), up) reads two projections of the same input (MatMulNBits with the same K, bits,
    block size and accuracy level, or MatMul by constant weights; both with a constant bias or neither, as
    centered projection inputs (`activations.center`) leave them), their weights (and biases) are concatenated (gate first) into one
    projection whose output a Split halves on the last axis; the SiLU and the product read the halves.
    Weights move byte for byte, so the function is the same to float rounding.
    Measured on onnxruntime 1.32 (CPU, 2 threads, SmolLM2's 576 -> 2 x 1536, int4 blocks of 64): one
    packed MatMulNBits + Split takes the MLP's gate/up 1.22x faster at one token, 1.06x at 512.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pairs = [found for node in list(graph) if (found := _swiglu(node)) is not None]
        for index, (gate, up) in enumerate(pairs):
            packed = pack_projections(graph, [gate, up], f"gate_up_{index}")
            split = ir.Node(
                "",
                "Split",
                [packed],
                [ir.AttrInt64("axis", -1), ir.AttrInt64("num_outputs", 2)],
                num_outputs=2,
                name=f"gate_up_{index}_split",
            )
            graph.insert_after(packed.producer(), split)  # type: ignore[arg-type]
            olds = [(p.bias or p.node).outputs[0] for p in (gate, up)]
            for old, new in zip(olds, split.outputs, strict=True):
                new.name, new.shape, new.type = f"{old.name}_packed", old.shape, old.type
                old.replace_all_uses_with(new)
        if pairs:
            RemoveUnusedNodesPass()(model)
            logger.info("gate and up packed into one projection in %d MLPs", len(pairs))
        return ir.passes.PassResult(model, bool(pairs))
