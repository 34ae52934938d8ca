"""Quantize keys and values where a KV cache stores them."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from rotgraph import kvcache
from rotgraph.errors import StructureError
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.online import FunctionBuilder
from rotgraph.structure import Attention, KVCache, discover, is_constant_shift, is_hadamard

logger = logging.getLogger(__name__)


class QuantizeKVCachePass(ir.passes.InPlacePass):
    """Quantize keys and values per token and KV head (groups of head_dim, or `spec.group`), on the keys
    after RoPE (and after the R3 Hadamard when present) and on the values in [batch, kv_heads, seq,
    head_dim] layout, both before the grouped-query repeat.

    Graphs without a cache get `rotgraph.FakeQuant` there. Graphs with `past_key_values` inputs store the
    cache quantized: each `past`/`present` pair becomes three (uint8 codes, float32 scales, uint8 zero
    points; see `rotgraph.kvcache`), new entries are quantized before they are appended and the whole
    cache is dequantized for attention. Both forms compute the same values, so a cached graph gives the
    same logits as the fake-quantized one. `store=False` gives every graph the FakeQuant form (learning
    runs on empty caches and needs the straight-through gradient of FakeQuant, not stored codes).
    """

    def __init__(self, spec: ActSpec, store: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.store = store

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        stored = faked = 0
        for block in desc.blocks:
            a = block.attention
            if a.fused is not None and a.rope_inside:
                raise StructureError(
                    f"block {block.index}: the keys are rotated (RoPE) inside the fused {a.fused.op_type} "
                    f"{a.fused.name!r}: R3 and KV-cache quantization need RoPE outside the fused op"
                )
            if a.k_rope is None or a.v_cache is None:
                raise StructureError(f"block {block.index}: cannot find where keys and values enter the cache")
            if self.spec.group and a.head_dim % self.spec.group:
                raise StructureError(f"KV group {self.spec.group} does not divide head_dim {a.head_dim}")
            if self.store and a.key_cache is not None and a.value_cache is not None:
                cache_spec = kvcache.CacheSpec.from_act(self.spec, a.head_dim)
                for cache in (a.key_cache, a.value_cache):
                    _store_quantized(model, cache, cache_spec, f"block {block.index}")
                stored += 1
                continue
            for value in (cached_keys(a), a.v_cache):
                insert_fake_quant(model, value, self.spec)
            faked += 1
        logger.info(
            "KV cache: %d-bit keys and values in %d blocks (%d stored quantized)",
            self.spec.bits,
            len(desc.blocks),
            stored,
        )
        return ir.passes.PassResult(model, stored + faked > 0)


def cached_keys(attention: Attention) -> ir.Value:
    """The keys as the cache quantizer reads them: after RoPE, then the R3 Hadamard and the key mean
    shift (`SubtractKeyMeanPass`) where present."""
    if attention.k_rope is None:
        raise StructureError("cannot find the keys after RoPE")
    keys = attention.k_rope
    for step in (is_hadamard, is_constant_shift):
        found = [c for c in keys.consumers() if step(c)]
        keys = found[0].outputs[0] if found else keys
    return keys


def _store_quantized(model: ir.Model, cache: KVCache, spec: kvcache.CacheSpec, where: str) -> None:
    """Replace Concat(past, new) -> present by the quantized form; see the pass docstring."""
    graph = model.graph
    if cache.quantized:
        raise StructureError(f"{where}: the KV cache {cache.past.name!r} is already quantized")
    if cache.window:
        raise StructureError(
            f"{where}: the KV cache {cache.past.name!r} is a sliding window (Slice nodes "
            f"{', '.join(repr(n.name) for n in cache.window)}); storing it quantized is not supported yet: "
            "quantize the export without a cache, or use a scheme without kv bits"
        )
    shape = cache.past.shape
    if shape is None or len(shape) != 4 or shape[3] != spec.head_dim:
        raise StructureError(
            f"{where}: the cache input {cache.past.name!r} has shape {shape}, expected [b, h, t, {spec.head_dim}]"
        )
    for user in cache.past.consumers():
        if user is not cache.concat and user.op_type != "Shape":
            raise StructureError(
                f"{where}: the cache input {cache.past.name!r} is read by {user.op_type} node {user.name!r}; "
                "expected only the cache Concat and Shape nodes"
            )
    kvcache.add_functions(model, spec, cache.new.dtype or ir.DataType.FLOAT)
    name, present_name = cache.past.name or "", cache.present.name or ""
    dims = list(shape)
    batch, heads, past_len = dims[0], dims[1], dims[2]
    stored = {
        "": (ir.DataType.UINT8, [batch, heads, past_len, spec.code_width]),
        "_scale": (ir.DataType.FLOAT, [batch, heads, past_len, spec.groups]),
        "_zero": (ir.DataType.UINT8, [batch, heads, past_len, spec.groups]),
    }
    cache.past.name = f"{name}_float"
    pasts = [ir.Value(name=name + sfx, type=ir.TensorType(t), shape=ir.Shape(d)) for sfx, (t, d) in stored.items()]
    index = graph.inputs.index(cache.past)
    graph.inputs[index : index + 1] = pasts
    for user in list(cache.past.consumers()):
        if user is not cache.concat:
            _read_float_shape(graph, user, pasts[0], spec.head_dim)
    quantize = kvcache.quantize_node(spec, cache.new)
    axis = cache.concat.attributes.get_int("axis", -2)
    concats = [
        ir.Node("", "Concat", [p, q], [ir.AttrInt64("axis", axis)])
        for p, q in zip(pasts, quantize.outputs, strict=True)
    ]
    presents = [c.outputs[0] for c in concats]
    out_index = graph.outputs.index(cache.present)
    graph.outputs.pop(out_index)
    cache.present.name = f"{present_name}_float"
    for value, sfx in zip(presents, stored, strict=True):
        value.name = present_name + sfx
        value.dtype = stored[sfx][0]
    graph.outputs[out_index:out_index] = presents
    dequantize = kvcache.dequantize_node(spec, *presents)
    full = dequantize.outputs[0]
    full.name, full.shape, full.type = f"{present_name}_dequantized", cache.present.shape, cache.present.type
    cache.present.replace_all_uses_with(full)
    graph.insert_before(cache.concat, [quantize, *concats, dequantize])
    graph.remove(cache.concat, safe=True)


def _read_float_shape(graph: ir.Graph, shape: ir.Node, codes: ir.Value, head_dim: int) -> None:
    """Make a Shape node of the float past read the stored codes instead: the first three axes are the
    same; the last (head_dim, packed two codes per byte at 4 bits) is restated as a constant."""
    start, end = shape.attributes.get_int("start", 0), shape.attributes.get_int("end", 4)
    start, end = (min(max(v + 4 if v < 0 else v, 0), 4) for v in (start, end))
    if end <= 3:
        shape.replace_input_with(0, codes)
        return
    b = FunctionBuilder()
    last = b.const(f"{codes.name}_head_dim", np.array([head_dim], dtype=np.int64))
    if start <= 2:
        leading = b.op("Shape", codes, start=start, end=3)
        last = b.op("Concat", leading, last, axis=0)
    out = shape.outputs[0]
    last.name, last.shape, last.type = f"{out.name}_stored", out.shape, out.type
    graph.insert_before(shape, b.nodes)
    out.replace_all_uses_with(last, replace_graph_outputs=True)
    graph.remove(shape, safe=True)
