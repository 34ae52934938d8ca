"""Move RoPE out of onnxruntime's GroupQueryAttention (do_rotary=1) into RotaryEmbedding nodes before it."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from rotgraph.constants import MS_DOMAIN
from rotgraph.errors import StructureError
from rotgraph.online import FunctionBuilder
from rotgraph.weights import new_initializer

logger = logging.getLogger(__name__)

# GroupQueryAttention operands (onnxruntime's contrib op spec).
QUERY, KEY, VALUE, SEQLENS_K, TOTAL_LENGTH, COS_CACHE, SIN_CACHE, POSITION_IDS = 0, 1, 2, 5, 6, 7, 8, 9


def rotary_inside(node: ir.Node) -> bool:
    """`node` is a com.microsoft GroupQueryAttention that applies RoPE itself (do_rotary=1)."""
    return (
        node.op_type == "GroupQueryAttention"
        and node.domain == MS_DOMAIN
        and node.attributes.get_int("do_rotary", 0) != 0
    )


def _operand(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _static_last(value: ir.Value | None) -> int | None:
    last = value.shape[-1] if value is not None and value.shape is not None and len(value.shape) else None
    return last if isinstance(last, int) else None


class SplitRotaryPass(ir.passes.InPlacePass):
    """GroupQueryAttention(do_rotary=1)  ->  RotaryEmbedding on Q and K, then GroupQueryAttention(do_rotary=0).

    For every com.microsoft GroupQueryAttention with do_rotary=1 (onnxruntime-genai's builder makes them): a
    packed QKV operand [batch, seq, (heads + 2 kv_heads) * head_dim] is cut by one Split into Q, K and V
    (`SplitFusedProjectionsPass` then turns the packed projection MatMul into three); Q, K and V each go to
    [batch, heads, seq, head_dim] and back to [batch, seq, heads * head_dim] for the op's query, key and
    value operands, Q and K through a com.microsoft RotaryEmbedding on the way (the op's own cos_cache,
    sin_cache and rotary_interleaved). The head layout is where R3 and KV-cache quantization act. The op then has do_rotary=0 and no cos/sin caches; everything else (cache, seqlens_k,
    total_sequence_length, attention_bias, scale) is left as it was.

    Positions are those the kernel derives (onnxruntime's GeneratePositionIds): the op's position_ids
    operand when it has one, else 0 .. seq - 1 on a first prompt (seq == total_sequence_length) and
    seqlens_k[b] + 1 - seq + s after a cache. Padding positions of a right-padded prompt get other values
    than the kernel's, but no real token attends to them. One positions subgraph serves all ops that
    share seqlens_k and total_sequence_length (the query length is taken from the first of them: all
    layers see the same tokens).

    Guarantees: the same function in onnxruntime (the same rotary kernel at the same positions); RoPE is
    a node before the op, with head_dim as the last axis of its output, and V passes through the same
    head layout, where structure discovery, R3 (`InsertQKHadamardPass`) and KV-cache quantization
    (`QuantizeKVCachePass`, simulated: the op keeps its float cache) look for them. Fails (StructureError) where the
    head size cannot be told from a static query width or the cos cache. Changes nothing in a graph
    without such an op.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if rotary_inside(n)]
        shared: dict[tuple[int, int], ir.Value] = {}

        def positions(node: ir.Node, query: ir.Value, b: FunctionBuilder) -> ir.Value:
            given = _operand(node, POSITION_IDS)
            if given is not None:
                return given
            seqlens, total = _operand(node, SEQLENS_K), _operand(node, TOTAL_LENGTH)
            if seqlens is None or total is None:
                raise StructureError(f"GroupQueryAttention {node.name!r}: no seqlens_k/total_sequence_length")
            key = (id(seqlens), id(total))
            if key not in shared:
                shared[key] = _positions(b, node, query, seqlens, total)
            return shared[key]

        for node in nodes:
            _split(graph, node, positions)
        if nodes:
            logger.info("RoPE moved out of %d GroupQueryAttention nodes (RotaryEmbedding before each)", len(nodes))
        return ir.passes.PassResult(model, bool(nodes))


def _positions(b: FunctionBuilder, node: ir.Node, query: ir.Value, seqlens: ir.Value, total: ir.Value) -> ir.Value:
    """[batch, seq] int64: 0 .. seq - 1 on a first prompt, else seqlens_k + 1 - seq + (0 .. seq - 1); seq is
    the length of `query` (the query part, never the packed projection: SplitFusedProjectionsPass needs the
    Split to be its only reader)."""
    one, zero = (b.const(f"{node.name}_rope_{v}", np.array(v, np.int64)) for v in (1, 0))
    flat = b.const(f"{node.name}_rope_flat", np.array([-1], np.int64))
    rows = b.const(f"{node.name}_rope_rows", np.array([-1, 1], np.int64))
    seq = b.op("Squeeze", b.op("Shape", query, start=1, end=2))  # scalars from here on, rows [batch, 1]
    total_length = b.op("Cast", b.op("Squeeze", b.op("Reshape", total, flat)), to=ir.DataType.INT64)
    lengths = b.op("Cast", b.op("Reshape", seqlens, rows), to=ir.DataType.INT64)
    past = b.op("Where", b.op("Equal", seq, total_length), zero, b.op("Sub", b.op("Add", lengths, one), seq))
    positions = b.op("Add", past, b.op("Range", zero, seq, one))
    positions.name = f"{node.name}_rope_positions"
    return positions


def _split(graph: ir.Graph, node: ir.Node, positions: Callable[[ir.Node, ir.Value, FunctionBuilder], ir.Value]) -> None:
    where = f"GroupQueryAttention {node.name!r}"
    heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
    query, key, value = (_operand(node, i) for i in (QUERY, KEY, VALUE))
    cos, sin = _operand(node, COS_CACHE), _operand(node, SIN_CACHE)
    if query is None or cos is None or sin is None or heads <= 0 or kv_heads <= 0:
        raise StructureError(f"{where}: do_rotary=1 without a query, cos/sin caches or head counts")
    packed = key is None
    width = _static_last(query)
    half = _static_last(cos)
    head_dim = width // (heads + 2 * kv_heads if packed else heads) if width else (2 * half if half else None)
    if head_dim is None:
        raise StructureError(f"{where}: cannot tell the head size (no static query width or cos cache width)")
    b = FunctionBuilder()
    if packed:
        widths = np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], np.int64)
        sizes = new_initializer(graph, f"{node.name}_qkv_sizes", ir.tensor(widths))  # read by SplitFusedProjectionsPass
        split = ir.Node("", "Split", [query, sizes], [ir.AttrInt64("axis", -1)], num_outputs=3)
        b.nodes.append(split)
        query, key, value = split.outputs
    assert key is not None and value is not None
    if packed:
        for part, count in zip(split.outputs, (heads, kv_heads, kv_heads), strict=True):
            _describe(part, node.inputs[QUERY], [count * head_dim])
    interleaved = node.attributes.get_int("rotary_interleaved", 0)
    at = positions(node, query, b)
    rope = (at, cos, sin, interleaved)
    rotated = [
        _rotary(b, x, count, head_dim, with_rope, f"{node.name}_{name}")
        for x, count, with_rope, name in (
            (query, heads, rope, "q"),
            (key, kv_heads, rope, "k"),
            (value, kv_heads, None, "v"),
        )
    ]
    graph.insert_before(node, b.nodes)
    if len(node.inputs) <= VALUE:
        node.resize_inputs(VALUE + 1)
    for index, operand in zip((QUERY, KEY, VALUE), rotated, strict=True):
        node.replace_input_with(index, operand)
    node.replace_input_with(COS_CACHE, None)
    node.replace_input_with(SIN_CACHE, None)
    node.attributes["do_rotary"] = ir.AttrInt64("do_rotary", 0)
    node.attributes.pop("rotary_interleaved", None)


def _rotary(
    b: FunctionBuilder,
    x: ir.Value,
    heads: int,
    head_dim: int,
    rope: tuple[ir.Value, ir.Value, ir.Value, int] | None,
    name: str,
) -> ir.Value:
    """x [batch, seq, heads * head_dim] as [batch, heads, seq, head_dim] (head_dim last: where R3 and KV-cache
    quantization act), through RoPE when `rope` (positions, cos cache, sin cache, interleaved) is given,
    and back to [batch, seq, heads * head_dim]."""
    split_heads = b.const(f"{name}_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = b.const(f"{name}_merge", np.array([0, 0, heads * head_dim], np.int64))
    current = b.op("Transpose", b.op("Reshape", x, split_heads), perm=[0, 2, 1, 3])
    if rope is not None:
        positions, cos, sin, interleaved = rope
        attributes = [ir.AttrInt64("interleaved", interleaved), ir.AttrInt64("num_heads", heads)]
        node = ir.Node(MS_DOMAIN, "RotaryEmbedding", [current, positions, cos, sin], attributes, name=f"{name}_rope")
        b.nodes.append(node)
        current = node.outputs[0]
        current.name = f"{name}_rope"
    _describe(current, x, [heads, None, head_dim], batch_only=True)
    merged = b.op("Reshape", b.op("Transpose", current, perm=[0, 2, 1, 3]), merge_heads)
    _describe(merged, x, [heads * head_dim])
    return merged


def _describe(value: ir.Value, like: ir.Value | None, last: list[int | None], batch_only: bool = False) -> None:
    """Type and shape of a new value: `like`'s dtype; its leading dims (batch, or batch and seq) with `last`
    after them, where `like`'s shape is known (structure discovery reads head sizes from static widths)."""
    if like is None or like.type is None:
        return
    value.type = like.type
    if like.shape is not None and len(like.shape) == 3:
        lead = list(like.shape)[:1] if batch_only else list(like.shape)[:2]
        dims = [*lead, *last]
        if batch_only:
            dims[2] = like.shape[1]
        value.shape = ir.Shape(dims)
