"""Static activation quantization: QuantizeLinear/DequantizeLinear pairs with calibrated constant scales.

Two passes share one table of sites (`static_sites`): `CalibrateActivationsPass` measures the range of
each site on calibration windows (one probe run through onnxruntime, `rotgraph.probe`) into
`Calibration.ranges`, and `StaticActivationsPass` inserts a Q/DQ pair per site with the scale and zero
point of that range.

Sites are keyed by structure, as `rotgraph.calibrate` keys them: (block, "qkv" | "o" | "gate_up" |
"down") for the projection inputs (after any online Hadamard, so the rotated values are measured and
quantized) and (block, "k" | "v") for the keys after RoPE (and after R3) and the values in head
layout, where a KV cache stores them. The key survives the passes that run between calibration and
insertion.

Granularity: one range per projection input (per tensor, what an integer MatMul's activation operand
takes) and one per KV head for keys and values (per channel along the head axis, QuantizeLinear axis 1:
attention reads each head on its own).

Ranges: "minmax" is the running minimum and maximum; "percentile" and "entropy" are onnxruntime's own
histogram calibration (`onnxruntime.quantization.calibrate.HistogramCollector`, with the bins and
percentile of its `PercentileCalibrater` and `EntropyCalibrater`), fed with the probed arrays. rotgraph
collects the tensors itself rather than through onnxruntime's calibrater classes because those need a
model file and augment it with their own outputs, while the model here lives in memory with lazily
computed weights (the probe materializes them once into scratch) and its sites are structural.

Scales and zero points are those of `rotgraph.grid` applied to a range instead of a group: symmetric
scale = max|x| / qmax on the signed grid with zero point 0; asymmetric scale = (hi - lo) / qmax on the
unsigned grid over the range widened to contain 0, zero = round(-lo / scale).

Massive activations: a few tokens (the attention sink, usually a window's first token) can reach
100x the activation of every other token at the input of one or two down projections (SmolLM2-135M
rotated by QuaRot: layer 11's down_proj input has |x| up to 107 on the first token, 1.6 on every other;
measured in benchmarks/RESULTS.md, static QDQ section). A per-tensor 8-bit range that holds those
tokens leaves the rest a few codes; a range that clips them breaks the model (the sink's residual
is what later attention layers key on). `CalibrateActivationsPass` therefore also records each
projection input's spread, max |x| over the median token's max |x| (`TokenSpread`), and
`StaticActivationsPass(wide=RATIO)` gives a site whose spread exceeds RATIO 16-bit codes
(INT16/UINT16 Q/DQ, opset 21) over its full minmax range: the bulk keeps 8 bits or more of
resolution and the massive tokens are represented. Every other site keeps its `spec` (8-bit sites
still fuse into onnxruntime's integer MatMuls; a 16-bit site's projection runs in float).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import grid
from rotgraph.calibrate import projection_inputs
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.options import STATIC_RANGES as METHODS
from rotgraph.probe import probe
from rotgraph.results import Calibration, Ranges, Site, Spreads, TokenSpread
from rotgraph.structure import discover, is_hadamard
from rotgraph.weights import new_initializer

logger = logging.getLogger(__name__)

# onnxruntime's calibrater defaults (PercentileCalibrater, EntropyCalibrater)
_HISTOGRAM = {
    "percentile": {"num_bins": 2048, "num_quantized_bins": 128, "percentile": 99.999},
    "entropy": {"num_bins": 128, "num_quantized_bins": 128, "percentile": 99.999},
}


@dataclass(frozen=True)
class StaticSpec:
    """A static quantizer: `bits` (4 or 8), symmetric (signed codes, zero point 0) or not
    (unsigned codes and a zero point), and the calibration method that chooses its range."""

    bits: int
    symmetric: bool = True
    method: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise RotgraphError(f"static activations have 4, 8 or 16 bits, not {self.bits}")
        if self.method not in METHODS:
            raise RotgraphError(f"calibration method {self.method!r}: expected one of {', '.join(METHODS)}")

    @property
    def code_type(self) -> ir.DataType:
        if self.bits == 4:
            return ir.DataType.INT4 if self.symmetric else ir.DataType.UINT4
        if self.bits == 16:
            return ir.DataType.INT16 if self.symmetric else ir.DataType.UINT16
        return ir.DataType.INT8 if self.symmetric else ir.DataType.UINT8

    def params(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scales (float32) and zero points (int64) of the ranges [lo, hi] (scalars, or one per channel)."""
        qmax = grid.qmax(self.bits, self.symmetric)
        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        if self.symmetric:
            scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) / qmax, grid.EPS).astype(np.float32)
            return scale, np.zeros(scale.shape, np.int64)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = np.maximum((hi - lo) / qmax, grid.EPS).astype(np.float32)
        return scale, np.clip(np.round(-lo / scale.astype(np.float64)), 0, qmax).astype(np.int64)


def static_sites(model: ir.Model, kv: bool) -> dict[Site, ir.Value]:
    """The values to quantize, keyed by site: every block's projection inputs and, with `kv`, its keys
    (after RoPE and after R3 when present) and values in head layout."""
    desc = discover(model)
    sites = {site: lin.input for site, lin in projection_inputs(desc).items()}
    if kv:
        for block in desc.blocks:
            a = block.attention
            if a.k_rope is None or a.v_cache is None:
                raise StructureError(f"block {block.index}: cannot find where keys and values enter the cache")
            hadamards = [c for c in a.k_rope.consumers() if is_hadamard(c)]
            sites[block.index, "k"] = hadamards[0].outputs[0] if hadamards else a.k_rope
            sites[block.index, "v"] = a.v_cache
    return sites


HEAD_AXIS = 1  # keys and values are [batch, kv_heads, seq, head_dim]: a range per head


def _pieces(name: str, x: np.ndarray, per_head: bool) -> dict[str, np.ndarray]:
    """What one range is measured on: the whole tensor, or each KV head's slice."""
    if not per_head:
        return {name: x}
    return {f"{name}/{h}": np.take(x, h, axis=HEAD_AXIS) for h in range(x.shape[HEAD_AXIS])}


def measure_ranges(
    model: ir.Model,
    sites: dict[Site, ir.Value],
    tokens: np.ndarray,
    spec: StaticSpec,
    scratch: Path | None = None,
    spreads: Spreads | None = None,
) -> Ranges:
    """(lo, hi) of each site over all windows of `tokens`, by `spec.method`: one range per projection
    input, one per KV head for keys and values. With `spreads`, also fill it with each projection
    input's `TokenSpread`."""
    keys = list(sites)
    names = [f"{k[0]}/{k[1]}" for k in keys]
    per_head = [k[1] in ("k", "v") for k in keys]
    outputs = probe(
        model, [sites[k] for k in keys], tokens, scratch=scratch, optimization="basic", what="calibrate (static)"
    )
    token_max: dict[Site, list[np.ndarray]] = {}  # each token's max |x| (inputs are [..., tokens, features])
    extremes: dict[Site, tuple[float, float]] = {}  # minmax, whatever the method

    def windows() -> Iterator[dict[str, np.ndarray]]:
        """One site on one window at a time (the pieces of its heads for keys and values)."""
        for p in outputs:
            key, x, head = keys[p.value], p.array, per_head[p.value]
            if spreads is not None and not head:
                token_max.setdefault(key, []).append(np.abs(x).reshape(-1, x.shape[-1]).max(axis=-1))
                lo, hi = extremes.get(key, (np.inf, -np.inf))
                extremes[key] = (min(lo, float(x.min())), max(hi, float(x.max())))
            yield _pieces(names[p.value], x, head)

    pieces = windows()
    found: dict[str, tuple[float, float]] = {}
    if spec.method == "minmax":
        for window in pieces:
            for name, x in window.items():
                lo, hi = found.get(name, (np.inf, -np.inf))
                found[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
    else:
        from onnxruntime.quantization.calibrate import HistogramCollector

        collector = HistogramCollector(spec.method, spec.symmetric, scenario="same", **_HISTOGRAM[spec.method])
        with contextlib.redirect_stdout(io.StringIO()):  # the collector prints its progress
            for window in pieces:
                collector.collect({name: [np.asarray(x, np.float32)] for name, x in window.items()})
            result = collector.compute_collection_result()
        found = {name: (float(r[0]), float(r[1])) for name, r in result.items()}
    if spreads is not None:
        spreads.clear()
        for key, magnitudes in token_max.items():
            spreads[key] = TokenSpread(*extremes[key], float(np.median(np.concatenate(magnitudes))))
    for name, (lo_v, hi_v) in found.items():
        if not (np.isfinite(lo_v) and np.isfinite(hi_v)):
            raise RotgraphError(f"calibration: the range of {name} is not finite ({lo_v}, {hi_v})")
    logger.info("static %s ranges of %d sites on %d windows", spec.method, len(keys), len(tokens))
    ranges: Ranges = {}
    for key, name, head in zip(keys, names, per_head, strict=True):
        if head:
            heads = sum(p.startswith(f"{name}/") for p in found)
            parts = np.array([found[f"{name}/{h}"] for h in range(heads)])  # [heads, 2]
            ranges[key] = (parts[:, 0], parts[:, 1])
        else:
            ranges[key] = (np.asarray(found[name][0]), np.asarray(found[name][1]))
    return ranges


class CalibrateActivationsPass(ir.passes.InPlacePass):
    """Measure the range of every static site (`static_sites`) on `calibration.tokens` and set
    `calibration.ranges`. Rewrites nothing; in-memory weights may move into `scratch` (see
    `rotgraph.probe.materialize`). With `spreads`, also sets `calibration.spreads`: every projection
    input's `TokenSpread` (what `StaticActivationsPass(wide=...)` chooses 16-bit sites by)."""

    def __init__(
        self,
        calibration: Calibration,
        spec: StaticSpec,
        kv: bool,
        scratch: Path | None = None,
        spreads: bool = False,
    ) -> None:
        super().__init__()
        self.calibration, self.spec, self.kv, self.scratch, self.spreads = calibration, spec, kv, scratch, spreads

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        tokens = self.calibration.tokens
        if tokens.size == 0:
            raise RotgraphError("static activation scales need calibration tokens")
        sites = static_sites(model, self.kv)
        spreads: Spreads | None = {} if self.spreads else None
        self.calibration.ranges = measure_ranges(model, sites, tokens, self.spec, self.scratch, spreads)
        if spreads is not None:
            self.calibration.spreads = spreads
        return ir.passes.PassResult(model, False)


def insert_qdq(
    model: ir.Model, value: ir.Value, spec: StaticSpec, scale: np.ndarray, zero: np.ndarray, name: str
) -> None:
    """codes = QuantizeLinear(value, scale, zero) with constant scale and zero point (scalars, or one per
    KV head along axis 1), and one
    DequantizeLinear(codes, scale, zero) per consumer of `value`, which reads it instead (the form QDQ
    compilers fuse: each DQ belongs to one node)."""
    graph = model.graph
    uses = list(value.uses())
    dtype = value.dtype or ir.DataType.FLOAT
    s = new_initializer(graph, f"{name}.act_scale", ir.Tensor(scale.astype(dtype.numpy()), name=""))
    storage = (np.int16, np.uint16) if spec.bits == 16 else (np.int8, np.uint8)
    z_store = zero.astype(storage[0] if spec.symmetric else storage[1])
    z = new_initializer(graph, f"{name}.act_zero", ir.Tensor(z_store, dtype=spec.code_type, name=""))
    attrs = [ir.AttrInt64("axis", HEAD_AXIS)] if scale.ndim else []
    q = ir.Node("", "QuantizeLinear", [value, s, z], attrs, name=f"{name}.act_quantize")
    codes = q.outputs[0]
    codes.name, codes.type, codes.shape = f"{name}.act_codes", ir.TensorType(spec.code_type), value.shape
    nodes = [q]
    for i, use in enumerate(uses):
        suffix = f"_{i}" if i else ""
        dq = ir.Node("", "DequantizeLinear", [codes, s, z], attrs, name=f"{name}.act_dequantize{suffix}")
        out = dq.outputs[0]
        out.name, out.type, out.shape = f"{name}.act_dequantized{suffix}", value.type, value.shape
        use.node.replace_input_with(use.idx, out)
        nodes.append(dq)
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(graph[0], nodes)


class StaticActivationsPass(ir.passes.InPlacePass):
    """Insert a QuantizeLinear/DequantizeLinear pair with constant scale and zero point on every
    projection input (`spec`, per tensor) and, with `kv_spec`, on the keys and values the cache stores
    (per KV head).

    Requires `calibration.ranges`, each site's calibrated range (`CalibrateActivationsPass`).
    Guarantees: each site is quantized once, with the scale of its own range; lm_head's input stays
    float; every inserted op is standard ONNX (int4 and int16 codes need opset 21).

    `wide` (a ratio > 1; requires `calibration.spreads` from the same calibration): a projection input
    whose `TokenSpread.spread` exceeds it gets 16-bit codes (same symmetry) over its full minmax range
    instead of `spec` (see the module docstring: massive activations).
    """

    def __init__(
        self,
        calibration: Calibration,
        spec: StaticSpec,
        kv_spec: StaticSpec | None = None,
        wide: float | None = None,
    ) -> None:
        super().__init__()
        if wide is not None and not wide > 1.0:
            raise RotgraphError(f"wide sites need a spread ratio > 1 ({wide})")
        self.calibration, self.spec, self.kv_spec, self.wide = calibration, spec, kv_spec, wide

    def requires(self, model: ir.Model) -> None:
        self.calibration.need(self.calibration.ranges, "ranges", self)
        if self.wide is not None:
            self.calibration.need(self.calibration.spreads, "spreads", self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        ranges = self.calibration.need(self.calibration.ranges, "ranges", self)
        spreads = self.calibration.need(self.calibration.spreads, "spreads", self) if self.wide is not None else None
        sites = static_sites(model, self.kv_spec is not None)
        wide_spec = StaticSpec(16, self.spec.symmetric)
        widened = []
        for site, value in sites.items():
            if site not in ranges:
                raise RotgraphError(f"block {site[0]} {site[1]}: no calibrated range (run CalibrateActivationsPass)")
            spec = self.kv_spec if site[1] in ("k", "v") and self.kv_spec is not None else self.spec
            lo, hi = ranges[site]
            if self.wide is not None and site[1] not in ("k", "v"):
                assert spreads is not None
                if site not in spreads:
                    raise RotgraphError(f"block {site[0]} {site[1]}: no calibrated spread (CalibrateActivationsPass)")
                found = spreads[site]
                if found.spread > self.wide:
                    spec, lo, hi = wide_spec, np.asarray(found.lo), np.asarray(found.hi)
                    widened.append(f"{site[0]}/{site[1]} (spread {found.spread:.0f})")
            scale, zero = spec.params(lo, hi)
            insert_qdq(model, value, spec, scale, zero, f"layers.{site[0]}.{site[1]}")
        logger.info("static %d-bit activation quantization on %d sites", self.spec.bits, len(sites))
        if widened:
            logger.info("16-bit static activations (spread > %g): %s", self.wide, ", ".join(widened))
        return ir.passes.PassResult(model, bool(sites))
