"""A KV cache that onnxruntime's GroupQueryAttention keeps as int8 / int4 codes with static scales.

onnxruntime's CPU GroupQueryAttention (1.32) can store its cache quantized: with `k_quant_type` /
`v_quant_type` "PER_CHANNEL", `kv_cache_bit_width` 8 or 4 and constant `k_scale` / `v_scale` inputs
(one float per cache channel, kv_heads * head_dim), it stores round(x / scale) clipped to the signed
grid (int8 codes; int4 codes + 8 packed two per uint8 byte, low nibble first, so the cache's last axis
is head_dim / 2) and attends over the dequantized cache, the new tokens included. The whole cache is
thus a fake quantization of the keys and values per channel with static scales, which
`CalibrateGqaCachePass` calibrates and `GqaQuantizedCachePass` writes into the graph.

R3 matters here: the keys the op stores are those after RoPE and after the online Hadamard (when
present), so the Hadamard spreads each head's outlier channels over all of its channels before one
static scale per channel has to cover them. RoPE must therefore be outside the op (`do_rotary` 0):
a per-channel scale of the keys before RoPE does not bound them after it.

Scales: per channel, the clipping threshold among `CANDIDATES` fractions of the calibrated max |x|
that gives the least squared error of the round trip on the calibration data (the "mse" choice of
onnxruntime's and TensorRT's calibrators), over `grid.qmax(bits, symmetric=True)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import grid
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.passes.ort.group_query_attention import MS_DOMAIN
from rotgraph.probe import probe
from rotgraph.results import CacheScales, Calibration
from rotgraph.weights import new_initializer

logger = logging.getLogger(__name__)

CANDIDATES = np.linspace(0.5, 1.0, 21)  # clipping thresholds, as fractions of the calibrated max |x|
_KEY, _VALUE, _PAST_KEY, _PAST_VALUE = 1, 2, 3, 4
_K_SCALE, _V_SCALE = 12, 13
_CODE_TYPE = {8: ir.DataType.INT8, 4: ir.DataType.UINT8}


def cache_attentions(model: ir.Model) -> list[ir.Node]:
    """The GroupQueryAttention nodes whose cache can be quantized, in graph order; refuses the forms
    where static per-channel scales would not describe what is stored."""
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
    if not nodes:
        raise StructureError("a quantized GroupQueryAttention cache needs GroupQueryAttention nodes; found none")
    graph_inputs, graph_outputs = set(model.graph.inputs), set(model.graph.outputs)
    for node in nodes:
        where = f"GroupQueryAttention {node.name!r}"
        if node.attributes.get_int("do_rotary", 0):
            raise StructureError(
                f"{where} applies RoPE inside: per-channel cache scales need the keys after RoPE (move it out)"
            )
        inputs = list(node.inputs) + [None] * 5
        if inputs[_KEY] is None or inputs[_VALUE] is None:
            raise StructureError(f"{where} reads packed QKV: the keys and values to calibrate are not separate")
        if inputs[_PAST_KEY] not in graph_inputs or inputs[_PAST_VALUE] not in graph_inputs:
            raise StructureError(f"{where}: its past key and value are not model inputs")
        if node.outputs[1] not in graph_outputs or node.outputs[2] not in graph_outputs:
            raise StructureError(f"{where}: its present key and value are not model outputs")
        if node.attributes.get_string("k_quant_type", "NONE") != "NONE":
            raise StructureError(f"{where} already keeps a quantized cache")
    return nodes


def mse_scales(samples: np.ndarray, bits: int) -> np.ndarray:
    """Per channel (last axis of `samples` [n, channels]): threshold / qmax for the candidate threshold
    with the least squared round-trip error on the signed `bits`-bit grid (float32)."""
    x = np.asarray(samples, np.float64)
    qmax = grid.qmax(bits, True)
    amax = np.maximum(np.abs(x).max(axis=0), grid.EPS)
    best = np.full(amax.shape, np.inf)
    scale = amax / qmax
    for ratio in CANDIDATES:
        s = amax * ratio / qmax
        err = ((np.clip(np.round(x / s), -qmax - 1, qmax) * s - x) ** 2).sum(axis=0)
        better = err < best
        best, scale = np.where(better, err, best), np.where(better, s, scale)
    return scale.astype(np.float32)


class CalibrateGqaCachePass(ir.passes.InPlacePass):
    """Measure the keys and values every GroupQueryAttention stores (its key and value inputs) on
    `calibration.tokens` and set `calibration.cache_scales` to their per-channel `bits`-bit scales
    (`mse_scales`). Rewrites nothing; weights may move into `scratch`."""

    def __init__(self, calibration: Calibration, bits: int, scratch: Path | None = None) -> None:
        super().__init__()
        self.calibration, self.bits, self.scratch = calibration, bits, scratch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        tokens = self.calibration.tokens
        if tokens.size == 0:
            raise RotgraphError("a quantized GroupQueryAttention cache needs calibration tokens")
        nodes = cache_attentions(model)
        values = [v for n in nodes for v in (n.inputs[_KEY], n.inputs[_VALUE]) if v is not None]
        rows: list[list[np.ndarray]] = [[] for _ in values]
        for p in probe(model, values, tokens, scratch=self.scratch, optimization="basic", what="calibrate (KV)"):
            rows[p.value].append(np.asarray(p.array).reshape(-1, p.array.shape[-1]))
        scales = [mse_scales(np.concatenate(parts), self.bits) for parts in rows]
        self.calibration.cache_scales = CacheScales(scales[0::2], scales[1::2])
        logger.info(
            "KV cache: %d-bit per-channel scales of %d layers on %d windows", self.bits, len(nodes), len(tokens)
        )
        return ir.passes.PassResult(model, False)


class GqaQuantizedCachePass(ir.passes.InPlacePass):
    """Make every GroupQueryAttention keep its cache as `bits`-bit codes with the static per-channel
    scales of `calibration.cache_scales` (`CalibrateGqaCachePass`, required): quantization attributes, `k_scale`/`v_scale` initializers (inputs 12 and 13),
    and the past/present cache values retyped (int8 codes [.., head_dim], or int4 packed into uint8
    [.., head_dim / 2]). Attention then reads the dequantized cache: the graph computes the float
    graph's function with keys and values fake-quantized per channel by those scales."""

    def __init__(self, calibration: Calibration, bits: int) -> None:
        super().__init__()
        if bits not in _CODE_TYPE:
            raise RotgraphError(f"GroupQueryAttention keeps an 8- or 4-bit cache, not {bits}-bit")
        self.calibration, self.bits = calibration, bits

    def requires(self, model: ir.Model) -> None:
        self.calibration.need(self.calibration.cache_scales, "cache_scales", self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        scales = self.calibration.need(self.calibration.cache_scales, "cache_scales", self)
        nodes = cache_attentions(model)
        if len(scales.keys) != len(nodes):
            raise RotgraphError(f"{len(scales.keys)} layers of cache scales for {len(nodes)} attention nodes")
        for i, node in enumerate(nodes):
            width, shape = len(scales.keys[i]), node.inputs[_KEY].shape  # type: ignore[union-attr]
            if shape is not None and isinstance(shape[-1], int) and shape[-1] != width:
                raise StructureError(f"{node.name!r}: {width} key scales for {shape[-1]} key channels")
            node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", "PER_CHANNEL")
            node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", "PER_CHANNEL")
            node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", self.bits)
            if len(node.inputs) < _V_SCALE + 1:
                node.resize_inputs(_V_SCALE + 1)
            for index, kind, scale in ((_K_SCALE, "k", scales.keys[i]), (_V_SCALE, "v", scales.values[i])):
                tensor = ir.Tensor(np.asarray(scale, np.float32), name="")
                node.replace_input_with(index, new_initializer(model.graph, f"{node.name}.{kind}_cache_scale", tensor))
            for cache in (node.inputs[_PAST_KEY], node.inputs[_PAST_VALUE], node.outputs[1], node.outputs[2]):
                assert cache is not None
                self._retype(cache, width // node.attributes.get_int("kv_num_heads", 1))
        logger.info("KV cache: %d-bit codes inside %d GroupQueryAttention nodes", self.bits, len(nodes))
        return ir.passes.PassResult(model, bool(nodes))

    def _retype(self, cache: ir.Value, head_dim: int) -> None:
        """Code type, and the last axis as stored: head_dim (int8) or head_dim / 2 (int4, packed)."""
        cache.type = ir.TensorType(_CODE_TYPE[self.bits])
        if cache.shape is not None and len(cache.shape) == 4:
            dims = list(cache.shape.dims)
            cache.shape = ir.Shape([*dims[:-1], head_dim // 2 if self.bits == 4 else head_dim])
