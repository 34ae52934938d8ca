"""RoPE followed by an online Hadamard (R3) before GroupQueryAttention -> onnxruntime's RotaryEmbedding."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.online import FunctionBuilder
from rotgraph.passes.ort.group_query_attention import MS_DOMAIN, flat_heads
from rotgraph.passes.ort.rotary_attention import (
    Rope,
    RopeTables,
    flat_input,
    inverse_frequencies,
    match_rope,
    plan_every_layer,
    rope_tables,
)
from rotgraph.structure import is_hadamard

logger = logging.getLogger(__name__)

_SEQLENS_K = 5


class RotaryEmbeddingPass(ir.passes.InPlacePass):
    """Flatten(Hadamard(RoPE(heads))) feeding GroupQueryAttention's Q and K -> Reshape(Hadamard(Reshape(
    RotaryEmbedding(x)))), with x the [batch, seq, heads * head_dim] projection output.

    The form a quantized KV cache needs (R3 between RoPE and the cache, so RoPE cannot go into the
    attention op as `RotaryIntoAttentionPass` puts it) in a few nodes instead of the exported layout
    round trips and the rotate-half pattern: com.microsoft RotaryEmbedding on the 3-D projection output
    with cos/sin caches [max_length, head_dim / 2] computed in float64 from the graph's inverse
    frequencies (and attention scaling), the Hadamard on the head axis of a [batch, seq, heads, head_dim]
    view, and one Reshape back. Positions come from the attention's own seqlens_k as GroupQueryAttention
    counts them with do_rotary (seqlens_k + 1 - seq + i), so the graph reads no cache shape for them.

    Guarantees: the same function to float rounding for positions below `max_length` and unpadded rows
    (a left-padded row's positions shift by its padding, which RoPE's relative scores do not see). All
    layers or none: when one layer does not match, nothing is rewritten and the reason is logged. The
    values it makes carry the projection's element type (rotgraph's kernels need the Hadamard's known).
    """

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.shapes: dict[tuple[int, ...], ir.Value] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.shapes.clear()
        nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
        plans = plan_every_layer(nodes, self._plan, "RoPE + Hadamard stay as exported")
        if plans is None:
            return ir.passes.PassResult(model, False)
        tables: RopeTables = {}
        positions: dict[int, ir.Value] = {}
        for node, (ropes, hadamards, inv_freq) in zip(nodes, plans, strict=True):
            pair = rope_tables(graph, ropes[0], inv_freq, self.max_length, tables)
            seqlens = node.inputs[_SEQLENS_K]
            assert seqlens is not None
            flats = [flat_heads(graph, rope.x, self._heads(node, slot)) for slot, rope in enumerate(ropes)]
            if id(seqlens) not in positions:
                positions[id(seqlens)] = self._positions(graph, node, seqlens, flats[0])
            for slot, (flat, rope, hadamard) in enumerate(zip(flats, ropes, hadamards, strict=True)):
                self._rewrite(graph, node, slot, flat, rope, hadamard, positions[id(seqlens)], pair)
            values = flat_input(node.inputs[2])
            if values is not None:  # V's layout round trip, as RotaryIntoAttentionPass removes it
                node.replace_input_with(2, flat_heads(graph, values, self._heads(node, 1)))
        graph.sort()
        RemoveUnusedNodesPass()(model)
        logger.info("RoPE as RotaryEmbedding before the R3 Hadamard in %d layers", len(nodes))
        return ir.passes.PassResult(model, bool(nodes))

    @staticmethod
    def _plan(node: ir.Node) -> str | tuple[list[Rope], list[ir.Node], np.ndarray]:
        if node.attributes.get_int("do_rotary", 0) or len(node.inputs) < 6 or node.inputs[1] is None:
            return "RoPE inside, or packed QKV"
        ropes, hadamards = [], []
        for slot in (0, 1):
            rotated = flat_input(node.inputs[slot])
            hadamard = rotated.producer() if rotated is not None else None
            if hadamard is None or not is_hadamard(hadamard) or hadamard.inputs[0] is None:
                return "Q or K is not a flattened online Hadamard"
            rope = match_rope(hadamard.inputs[0])
            if rope is None:
                return "the Hadamard does not read x * cos + rotate_half(x) * sin"
            ropes.append(rope)
            hadamards.append(hadamard)
        if (ropes[0].cos, ropes[0].sin, ropes[0].scale) != (ropes[1].cos, ropes[1].sin, ropes[1].scale):
            return "Q and K use different RoPE tables"
        shape = ropes[0].x.shape
        width = shape[-1] if shape is not None and len(shape) == 4 else None
        if not isinstance(width, int):
            return "the head width before RoPE is unknown"
        inv_freq = inverse_frequencies(ropes[0].cos, width)
        if inv_freq is None:
            return "the RoPE angles are not positions x one constant vector of head_dim / 2 (Concat(f, f))"
        return ropes, hadamards, inv_freq

    @staticmethod
    def _heads(node: ir.Node, slot: int) -> int:
        return node.attributes.get_int("num_heads" if slot == 0 else "kv_num_heads", 0)

    @staticmethod
    def _positions(graph: ir.Graph, node: ir.Node, seqlens: ir.Value, x: ir.Value) -> ir.Value:
        """[batch, seq] int64: seqlens_k + 1 - seq + arange(seq), seq from the [batch, seq, d] `x`."""
        b = FunctionBuilder()
        seq = b.op("Squeeze", b.op("Shape", x, start=1, end=2), b.const("rotary_pos_axis0", np.array([0])))
        start = b.op(
            "Sub",
            b.op("Add", b.op("Cast", seqlens, to=ir.DataType.INT64), b.const("rotary_pos_one", np.array(1, np.int64))),
            seq,
        )
        steps = b.op(
            "Range",
            b.const("rotary_pos_zero", np.array(0, np.int64)),
            seq,
            b.const("rotary_pos_step", np.array(1, np.int64)),
        )
        out = b.op(
            "Add",
            b.op("Unsqueeze", start, b.const("rotary_pos_axis1", np.array([1]))),
            b.op("Unsqueeze", steps, b.const("rotary_pos_axis0b", np.array([0]))),
        )
        out.name = "rotary_position_ids"
        graph.insert_before(node, b.nodes)
        return out

    def _shape(self, graph: ir.Graph, dims: tuple[int, ...]) -> ir.Value:
        """A Reshape target as one initializer per distinct shape (not a Constant node per layer)."""
        if dims not in self.shapes:
            array = np.array(dims, np.int64)
            name = "rotary_shape_" + "_".join(map(str, dims))
            value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
            value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.INT64
            graph.register_initializer(value)
            self.shapes[dims] = value
        return self.shapes[dims]

    def _rewrite(
        self,
        graph: ir.Graph,
        node: ir.Node,
        slot: int,
        flat: ir.Value,
        rope: Rope,
        hadamard: ir.Node,
        positions: ir.Value,
        tables: tuple[ir.Value, ir.Value],
    ) -> None:
        heads = RotaryEmbeddingPass._heads(node, slot)
        width = rope.x.shape[-1]  # type: ignore[index]
        assert isinstance(width, int)
        rotary = ir.Node(MS_DOMAIN, "RotaryEmbedding", [flat, positions, *tables], [ir.AttrInt64("interleaved", 0)])
        split = ir.Node("", "Reshape", [rotary.outputs[0], self._shape(graph, (0, 0, heads, width))])
        graph.insert_before(hadamard, [rotary, split])
        hadamard.replace_input_with(0, split.outputs[0])
        hadamard.outputs[0].shape = None
        back = ir.Node("", "Reshape", [hadamard.outputs[0], self._shape(graph, (0, 0, heads * width))])
        graph.insert_before(node, [back])
        node.replace_input_with(slot, back.outputs[0])
        # typed values: onnx cannot infer through com.microsoft ops, and rotgraph's kernels are only
        # registered for a model whose rotgraph ops (this Hadamard) have inputs of a known float32 type
        dtype = flat.dtype or hadamard.outputs[0].dtype
        if dtype is not None:
            for value in (rotary.outputs[0], split.outputs[0], hadamard.outputs[0], back.outputs[0]):
                value.dtype = dtype
