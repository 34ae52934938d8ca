"""Quantize the projection weights of every block into standard block-wise DequantizeLinear."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from rotgraph import execution, grid
from rotgraph.calibrate import ROLE_SITES, BlockHessians, block_linears
from rotgraph.errors import RotgraphError
from rotgraph.passes.canonical.untie_embedding import embedding_map, map_tolerance
from rotgraph.quant import HessianFactor, QuantizedWeight, WeightSpec, gptq, hessian_factor, quantize_rtn
from rotgraph.results import Calibration, Site
from rotgraph.structure import Block, Linear, ModelDescription, discover, is_quantized_weight, transposed_initializer
from rotgraph.weights import (
    SpillFile,
    initializer_tensor,
    new_initializer,
    output_columns,
    read_float64,
    read_stored,
    release_stored,
    source,
    stored_rows,
)

logger = logging.getLogger(__name__)


def _code_type(spec: WeightSpec) -> ir.DataType:
    if spec.bits == 4:
        return ir.DataType.INT4 if spec.symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if spec.symmetric else ir.DataType.UINT8


def _dequantize_linear(
    graph: ir.Graph,
    name: str,
    codes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    axis: int,
    spec: WeightSpec,
    dtype: ir.DataType,
) -> ir.Node:
    """A DequantizeLinear node over new initializers `{name}.codes/.scale/.zero`: per-axis along `axis`
    when `scales` is 1-D, block-wise along `axis` (opset 21 block_size) when it has the codes' rank."""
    code_type = _code_type(spec)
    store = codes.astype(np.int8 if spec.symmetric else np.uint8, copy=False)
    inputs = [
        new_initializer(graph, f"{name}.codes", ir.Tensor(store, dtype=code_type, name=f"{name}.codes")),
        new_initializer(graph, f"{name}.scale", ir.Tensor(scales.astype(dtype.numpy()), name=f"{name}.scale")),
    ]
    if zeros is not None:
        z = ir.Tensor(zeros.astype(np.uint8), dtype=code_type, name=f"{name}.zero")
        inputs.append(new_initializer(graph, f"{name}.zero", z))
    attrs = [ir.AttrInt64("axis", axis)]
    if scales.ndim == codes.ndim:
        attrs.append(ir.AttrInt64("block_size", codes.shape[axis] // scales.shape[axis]))
    dq = ir.Node("", "DequantizeLinear", inputs, attrs, name=f"{name}.dequantize")
    dq.outputs[0].name = f"{name}.dequantized"
    dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(dtype), ir.Shape(list(codes.shape))
    return dq


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.name is not None and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def emit_dequantize(model: ir.Model, lin: Linear, q: QuantizedWeight, name: str) -> None:
    """Replace lin's float weight by DequantizeLinear(codes [in, out], scale[, zero point])."""
    per_channel = q.scales.shape[1] == 1
    scales = q.scales[:, 0] if per_channel else q.scales.T  # [out] or [groups, out]
    zeros = None if q.spec.symmetric else (q.zeros[:, 0] if per_channel else q.zeros.T)
    dtype = lin.weight.dtype or ir.DataType.FLOAT
    dq = _dequantize_linear(model.graph, name, q.codes.T, scales, zeros, 1 if per_channel else 0, q.spec, dtype)
    model.graph.insert_before(lin.node, dq)
    old = lin.weight
    lin.node.replace_input_with(1, dq.outputs[0])
    _drop_if_unused(model.graph, old)


def _ort_blocks(q: QuantizedWeight, name: str, op: str) -> int:
    """The block size of q's codes [rows, cols] for a com.microsoft block-quantized op."""
    g = q.codes.shape[1] // q.scales.shape[1]
    if g < 16 or g & (g - 1):
        raise RotgraphError(
            f"{name}: onnxruntime's {op} needs groups of a power of two >= 16 along the input axis "
            f"(got {g}); pass --group 16, 32, 64 or 128 dividing the hidden size"
        )
    return g


def _ort_codes(q: QuantizedWeight, g: int) -> np.ndarray:
    """Codes [rows, cols] -> uint8 [rows, cols/g, bytes per block] in the MatMulNBits/GatherBlockQuantized
    layout: unsigned (symmetric codes shifted by 2^(bits-1), the ops' default zero point), 4-bit values
    packed two per byte, low nibble first."""
    rows, cols = q.codes.shape
    # int8 codes wrap modulo 256 here, which leaves the uint8 value itself
    unsigned = (q.codes - (grid.qmin(q.spec.bits, True) if q.spec.symmetric else 0)).astype(np.uint8)
    if q.spec.bits == 4:
        unsigned = (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).astype(np.uint8)
    return unsigned.reshape(rows, cols // g, -1)


def _ort_zero_points(q: QuantizedWeight) -> np.ndarray:
    """Zero points [rows, blocks] -> uint8 [rows, ceil(blocks·bits/8)], 4-bit values packed per row (the
    MatMulNBits layout)."""
    zeros = q.zeros.astype(np.uint8)
    if q.spec.bits == 8:
        return zeros
    if zeros.shape[1] % 2:
        zeros = np.concatenate([zeros, np.zeros((zeros.shape[0], 1), np.uint8)], axis=1)
    return (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)


# onnxruntime 1.32's CPU MatMulNBits has a fast kernel for 8-bit weights only with int8 activations
# (accuracy_level 4): one 576 x 49152 lm_head call took 2.1 ms there and 156-220 ms at levels 0-3
# (measured here); 4-bit weights are fast at every level (5.5 ms at 0, 3.3 ms at 4).
INT8_WEIGHT_ACCURACY_LEVEL = 4


def emit_matmulnbits(model: ir.Model, lin: Linear, q: QuantizedWeight, name: str, accuracy_level: int) -> None:
    """Replace lin's MatMul by com.microsoft MatMulNBits (onnxruntime's int4/int8 kernel) with the same codes.
    8-bit weights always get `INT8_WEIGHT_ACCURACY_LEVEL` (int8 activations, per block)."""
    graph = model.graph
    if q.spec.bits == 8:
        accuracy_level = INT8_WEIGHT_ACCURACY_LEVEL
    n, k = q.codes.shape
    g = _ort_blocks(q, name, "MatMulNBits")
    dtype = lin.weight.dtype or ir.DataType.FLOAT
    inputs: list[ir.Value | None] = [
        lin.input,
        new_initializer(graph, f"{name}.packed", ir.Tensor(_ort_codes(q, g), name=f"{name}.packed")),
        new_initializer(
            graph, f"{name}.scales", ir.Tensor(q.scales.reshape(-1).astype(dtype.numpy()), name=f"{name}.scales")
        ),
    ]
    if not q.spec.symmetric:
        zp = _ort_zero_points(q).reshape(-1)
        inputs.append(new_initializer(graph, f"{name}.zeros", ir.Tensor(zp, name=f"{name}.zeros")))
    node = ir.Node("com.microsoft", "MatMulNBits", inputs, _nbits_attributes(k, n, q.spec.bits, g, accuracy_level))
    node.name = f"{name}.matmulnbits"
    _replace_node(model, lin.node, node)
    _drop_if_unused(graph, lin.weight)


def _nbits_attributes(k: int, n: int, bits: int, block: int, accuracy_level: int) -> list[ir.Attr]:
    return [
        ir.AttrInt64("K", k),
        ir.AttrInt64("N", n),
        ir.AttrInt64("bits", bits),
        ir.AttrInt64("block_size", block),
        ir.AttrInt64("accuracy_level", accuracy_level),
    ]


def _replace_node(model: ir.Model, old: ir.Node, new: ir.Node) -> None:
    """Put com.microsoft `new` in the place of `old` (one output, which keeps its name, type and uses)."""
    model.opset_imports.setdefault("com.microsoft", 1)
    out = old.outputs[0]
    _take_over(out, new.outputs[0])
    model.graph.insert_before(old, new)
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    model.graph.remove(old, safe=True)


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Give `new` the name, type and shape of the value it replaces (graph outputs keep their names)."""
    name = old.name
    old.name = f"{name}.replaced"
    new.name, new.type, new.shape = name, old.type, old.shape


def emit_gather_quantized(model: ir.Model, gather: ir.Node, q: QuantizedWeight, name: str) -> None:
    """Gather(E, ids) -> com.microsoft GatherBlockQuantized(codes, ids, scales): onnxruntime dequantizes
    only the gathered rows, where DequantizeLinear + Gather would dequantize the whole table per call."""
    graph = model.graph
    table = gather.inputs[0]
    assert table is not None and q.spec.symmetric
    g = _ort_blocks(q, name, "GatherBlockQuantized")
    dtype = table.dtype or ir.DataType.FLOAT
    rows = q.codes.shape[0]
    codes = ir.Tensor(_ort_codes(q, g).reshape(rows, -1), name=f"{name}.codes")
    inputs: list[ir.Value | None] = [
        new_initializer(graph, f"{name}.codes", codes),
        gather.inputs[1],
        new_initializer(graph, f"{name}.scales", ir.Tensor(q.scales.astype(dtype.numpy()), name=f"{name}.scales")),
    ]
    attrs = [
        ir.AttrInt64("bits", q.spec.bits),
        ir.AttrInt64("block_size", g),
        ir.AttrInt64("gather_axis", 0),
        ir.AttrInt64("quantize_axis", 1),
    ]
    node = ir.Node("com.microsoft", "GatherBlockQuantized", inputs, attrs, name=f"{name}.gather")
    _replace_node(model, gather, node)
    _drop_if_unused(graph, table)


def emit_embedding(model: ir.Model, gather: ir.Node, q: QuantizedWeight, name: str) -> None:
    """Gather(E, ids) -> Gather(DequantizeLinear(codes [vocab, hidden], scales along hidden), ids)."""
    table = gather.inputs[0]
    assert table is not None and q.spec.symmetric
    dq = _dequantize_linear(model.graph, name, q.codes, q.scales, None, 1, q.spec, table.dtype or ir.DataType.FLOAT)
    model.graph.insert_before(gather, dq)
    gather.replace_input_with(0, dq.outputs[0])
    _drop_if_unused(model.graph, table)


def embedding_rows(desc: ModelDescription) -> np.ndarray:
    """The embedding table [vocab, hidden] in float64, also when the Gather reads Transpose(W_lm) (the
    onnxruntime-genai builder's tied form)."""
    source = transposed_initializer(desc.embedding_table)
    return read_float64(source).T if source is not None else read_float64(desc.embedding_table)


def _drop_table(graph: ir.Graph, value: ir.Value) -> None:
    """Drop a replaced weight that nothing reads any more: an initializer, or a Transpose of one."""
    producer = value.producer()
    if producer is not None and not value.uses():
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        if source is not None:
            _drop_if_unused(graph, source)
    else:
        _drop_if_unused(graph, value)


def emit_shared_head(
    model: ir.Model, desc: ModelDescription, q: QuantizedWeight, mix: np.ndarray | None, fmt: str, accuracy_level: int
) -> None:
    """Embedding and lm_head read one quantized table (`q`: codes [vocab, hidden], groups along hidden).

    "ort": the codes in the MatMulNBits layout [vocab, blocks, bytes] feed lm_head's MatMulNBits and, through
    a Reshape to [vocab, hidden * bits / 8], the embedding's GatherBlockQuantized (the builder's tied form);
    both read the same scales [vocab, blocks]. "qdq": one DequantizeLinear feeds the Gather and, transposed,
    the lm_head MatMul. With `mix` (M of `embedding_map`, [hidden, hidden]), lm_head reads x @ M (a float
    MatMul) instead of x.
    """
    graph = model.graph
    gather, head = desc.embedding, desc.lm_head
    table, weight = desc.embedding_table, head.weight
    vocab, hidden = q.codes.shape
    dtype = head.weight.dtype or ir.DataType.FLOAT
    x = head.input
    if mix is not None:
        m = new_initializer(graph, "lm_head.mix", ir.Tensor(mix.astype(dtype.numpy()), name="lm_head.mix"))
        mixed = ir.Node("", "MatMul", [x, m], name="lm_head.mix.matmul")
        mixed.outputs[0].name, mixed.outputs[0].type = "lm_head.mixed", x.type
        mixed.outputs[0].shape = x.shape
        graph.insert_before(head.node, mixed)
        x = mixed.outputs[0]
    if fmt == "ort":
        g = _ort_blocks(q, "the shared embedding and lm_head", "MatMulNBits")
        codes = _ort_codes(q, g)
        packed = new_initializer(graph, "shared_head.packed", ir.Tensor(codes, name="shared_head.packed"))
        scales = ir.Tensor(q.scales.astype(dtype.numpy()), name="shared_head.scales")
        scale_value = new_initializer(graph, "shared_head.scales", scales)
        level = INT8_WEIGHT_ACCURACY_LEVEL if q.spec.bits == 8 else accuracy_level
        nbits = ir.Node(
            "com.microsoft",
            "MatMulNBits",
            [x, packed, scale_value],
            _nbits_attributes(hidden, vocab, q.spec.bits, g, level),
        )
        nbits.name = "lm_head.matmulnbits"
        _replace_node(model, head.node, nbits)
        shape = new_initializer(graph, "shared_head.rows", ir.Tensor(np.array([vocab, codes[0].size], np.int64)))
        rows = ir.Node("", "Reshape", [packed, shape], name="shared_head.reshape")
        rows.outputs[0].name = "shared_head.rows_packed"
        rows.outputs[0].type, rows.outputs[0].shape = ir.TensorType(ir.DataType.UINT8), ir.Shape([vocab, codes[0].size])
        attrs = [
            ir.AttrInt64("bits", q.spec.bits),
            ir.AttrInt64("block_size", g),
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
        ]
        lookup = ir.Node(
            "com.microsoft", "GatherBlockQuantized", [rows.outputs[0], gather.inputs[1], scale_value], attrs
        )
        lookup.name = "embedding.gather"
        graph.insert_before(gather, rows)
        _replace_node(model, gather, lookup)
    else:
        dq = _dequantize_linear(graph, "shared_head", q.codes, q.scales, None, 1, q.spec, dtype)
        graph.insert_before(gather, dq)
        gather.replace_input_with(0, dq.outputs[0])
        transpose = ir.Node("", "Transpose", [dq.outputs[0]], [ir.AttrInt64s("perm", [1, 0])], name="lm_head.transpose")
        transpose.outputs[0].name = "lm_head.weight.dequantized"
        transpose.outputs[0].type, transpose.outputs[0].shape = ir.TensorType(dtype), ir.Shape([hidden, vocab])
        graph.insert_before(head.node, transpose)
        head.node.replace_input_with(0, x)
        head.node.replace_input_with(1, transpose.outputs[0])
    _drop_table(graph, weight)
    _drop_table(graph, table)


TASK_ROWS = 1024  # output channels of a weight per Ray task
TABLE_ROWS = 8192  # rows of the embedding table or lm_head per Ray task (RTN)


def quantize_rows(
    weight: Any, factor: HessianFactor | None, spec: WeightSpec, start: int, stop: int, prefix: str, table: bool = False
) -> tuple[str, str, str]:
    """A Ray task: output channels start:stop of `weight` (`weights.source`; with `table`, rows start:stop of
    an embedding table as stored) quantized by GPTQ with `factor` (or RTN without), the same rows as the whole
    weight's quantizer gives; codes, scales and zero points written as .npy files `prefix`-*.npy, whose paths
    it returns."""
    wt = stored_rows(weight, start, stop) if table else output_columns(weight, start, stop)
    q = gptq(wt, factor, spec) if factor is not None else quantize_rtn(wt, spec)
    paths = []
    for part, array in (("codes", q.codes), ("scales", q.scales), ("zeros", q.zeros)):
        path = f"{prefix}-{part}.npy"
        with open(f"{path}.{os.getpid()}.part", "wb") as f:
            np.save(f, array)
        os.replace(f"{path}.{os.getpid()}.part", path)
        paths.append(path)
    return paths[0], paths[1], paths[2]


def submit_rows(
    runner: execution.RayRunner,
    value: ir.Value,
    factor: HessianFactor | None,
    spec: WeightSpec,
    step: int,
    prefix: Path,
    label: str,
    table: bool = False,
) -> list[execution.Task]:
    """`quantize_rows` tasks over the output channels of the weight `value` (with `table`, the rows of an
    embedding table), `step` at a time; their files are named from `prefix`, their messages from `label`."""
    weight = source(value)
    rows = int(initializer_tensor(value).shape.numpy()[0 if table else 1])
    return [
        runner.submit(
            quantize_rows,
            (weight, factor, spec, a, min(a + step, rows), f"{prefix}-{a}", table),
            f"{label} rows {a}:{min(a + step, rows)}",
        )
        for a in range(0, rows, step)
    ]


def joined(
    runner: execution.RayRunner, value: ir.Value, parts: list[tuple[str, str, str]], spec: WeightSpec
) -> QuantizedWeight:
    """The `QuantizedWeight` of the weight `value` whose row ranges `quantize_rows` wrote, in order (the files
    are read and removed; what the tasks read and wrote is added to the run's count)."""
    weight = source(value)
    runner.count(
        read=weight.base.nbytes * (len(parts) if weight.steps else 1),
        written=sum(os.path.getsize(p) for paths in parts for p in paths),
    )
    arrays = []
    for k in range(3):
        arrays.append(np.concatenate([np.load(p[k]) for p in parts]))
        for p in parts:
            os.unlink(p[k])
    return QuantizedWeight(arrays[0], arrays[1], arrays[2], spec)


def _log_block_seconds(seconds: list[tuple[float, float, float]], after: str) -> None:
    """Log the median block's wall time and its parts (INFO), every block's at DEBUG: where a long block-by-block
    run spends its time, and the per-block cost a deeper model multiplies."""
    if not seconds:
        return
    parts = np.median(np.array(seconds), axis=0)
    logger.info(
        "time per block (median of %d): %.1f s: calibration run and Hessians %.1f s, factors and quantization %.1f s, "
        "%s %.1f s",
        len(seconds),
        float(np.median([sum(s) for s in seconds])),
        *parts[:2],
        after,
        parts[2],
    )
    logger.debug(
        "seconds per block (Hessians, quantization, after): %s", [tuple(round(x, 1) for x in s) for s in seconds]
    )


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """W (float [in, out]) -> DequantizeLinear(int codes, scales[, zero points]) for every Q/K/V/O,
    gate/up/down MatMul (format "qdq"), or MatMul -> com.microsoft MatMulNBits with the same codes
    (format "ort", `accuracy_level` 0: float compute, 4: int8 activations; 8-bit weights always 4, the
    only fast onnxruntime kernel for them). With `head_spec` the
    embedding table and lm_head are quantized by RTN too: DequantizeLinear in "qdq"; in "ort"
    GatherBlockQuantized for the embedding and MatMulNBits for lm_head, so that onnxruntime never
    dequantizes the whole vocabulary table. Without it they stay float. With `shared_head` they read one
    quantized copy of the embedding table (`emit_shared_head`): directly when the graph ties them, through
    a float hidden x hidden map M before lm_head (`embedding_map`) when a rotation untied them.

    Methods: "rtn" (round to nearest, clipping ratio searched per group) or "gptq" (requires
    `calibration.hessians`, X^T X of each projection's input keyed by structural site: block index and
    "qkv" | "o" | "gate_up" | "down", from `CalibratePass('hessian')`). Codes are INT4/UINT4/INT8/UINT8,
    per output channel (axis=1) or block-wise along the input axis (opset 21 block_size). Guarantees:
    the dequantized weights equal the quantizer's output exactly; the graph is standard ONNX.
    """

    def __init__(
        self,
        spec: WeightSpec,
        method: str = "rtn",
        calibration: Calibration | None = None,
        damp: float = 0.01,
        act_order: bool = False,
        head_spec: WeightSpec | None = None,
        fmt: str = "qdq",
        accuracy_level: int = 0,
        spill_dir: Path | None = None,
        shared_head: bool = False,
        block_hessians: BlockHessians | None = None,
    ) -> None:
        super().__init__()
        self.block_hessians = block_hessians
        self.spill_dir = spill_dir
        if method not in ("rtn", "gptq"):
            raise RotgraphError(f"unknown weight quantizer {method!r} (rtn, gptq)")
        if method == "gptq" and calibration is None and block_hessians is None:
            raise RotgraphError("GPTQ needs calibration Hessians")
        if fmt not in ("qdq", "ort"):
            raise RotgraphError(f"unknown format {fmt!r} (qdq, ort)")
        self.spec, self.method, self.calibration, self.damp, self.act_order = spec, method, calibration, damp, act_order
        self.head_spec, self.fmt, self.accuracy_level = head_spec, fmt, accuracy_level
        if shared_head and head_spec is None:
            raise RotgraphError("a shared (tied) embedding and lm_head needs them quantized (head bits 4 or 8)")
        self.shared_head = shared_head

    def _started_block_hessians(self) -> BlockHessians | None:
        """Hessians computed block by block: sequential ones this pass starts, or the float model's ones
        `CalibratePass` started on a model it runs block by block."""
        if self.method != "gptq":
            return None
        if self.block_hessians is not None:
            return self.block_hessians
        return self.calibration.block_hessians if self.calibration is not None else None

    def requires(self, model: ir.Model) -> None:
        if self.method == "gptq" and self._started_block_hessians() is None:
            assert self.calibration is not None  # the constructor refuses gptq without it
            self.calibration.need(self.calibration.hessians, "hessians", self)

    def _factor(
        self, factors: dict[str, HessianFactor], hessians: dict[Site, np.ndarray], block: Block, role: str, own: bool
    ) -> HessianFactor:
        """The Hessian factor of `role`'s input, computed on first use (Q/K/V and gate/up share theirs)."""
        site = ROLE_SITES[role]
        if site not in factors:
            h = hessians.pop((block.index, site)) if own else hessians.get((block.index, site))
            if h is None:
                raise RotgraphError(f"block {block.index} {role}: no calibration Hessian for its input")
            # The whole model's Hessians may be reused by the caller: those are copied, not overwritten.
            factors[site] = hessian_factor(h, self.damp, self.act_order, overwrite=own)
            del h
        return factors[site]

    def _emit(self, model: ir.Model, block: Block, role: str, lin: Linear, q: QuantizedWeight) -> None:
        if self.fmt == "ort":
            emit_matmulnbits(model, lin, q, f"layers.{block.index}.{role}", self.accuracy_level)
        else:
            emit_dequantize(model, lin, q, f"layers.{block.index}.{role}")

    def _quantize_block(
        self,
        model: ir.Model,
        block: Block,
        hessians: dict[Site, np.ndarray] | None,
        own: bool,
        spill: SpillFile | None,
    ) -> int:
        """Quantize `block`'s projections (GPTQ with `hessians`, else RTN); returns how many. With `own`, the
        block's Hessians are its own (block by block): each is factored in place and dropped from
        `hessians`, and each factor is dropped after its last weight, so a block holds one down_proj-sized
        factor at a time and nothing of it outlives this call."""
        linears = block_linears(block)
        for role, _ in linears:
            if is_quantized_weight(_.weight):
                raise RotgraphError(f"block {block.index} {role}: the weight is already quantized")
        runner = execution.current()
        if runner is not None:
            return self._quantize_block_remotely(runner, model, block, hessians, own, spill)
        last = {ROLE_SITES[role]: i for i, (role, _) in enumerate(linears)}
        factors: dict[str, HessianFactor] = {}  # per input site: Q/K/V and gate/up share one
        for i, (role, lin) in enumerate(linears):
            wt = read_float64(lin.weight).T
            if hessians is not None:
                q = gptq(wt, self._factor(factors, hessians, block, role, own), self.spec)
                if last[ROLE_SITES[role]] == i:
                    del factors[ROLE_SITES[role]]
            else:
                q = quantize_rtn(wt, self.spec)
            del wt
            self._emit(model, block, role, lin, q)
            del q
            if spill is not None:
                spill.spill(model.graph)
        return len(linears)

    def _tables_rtn(self, value: ir.Value, table: bool) -> QuantizedWeight:
        """RTN (`head_spec`) of lm_head's weight [hidden, vocab] by output channel, or with `table` of the
        embedding table [vocab, hidden] by row; on a Ray run in tasks of TABLE_ROWS rows (the same codes; each
        task rewrites only its rows where the queued rewrites allow it, `weights.stored_rows`)."""
        assert self.head_spec is not None
        runner = execution.current()
        if runner is None or self.spill_dir is None:
            stored = read_stored(value)
            return quantize_rtn(stored if table else stored.T, self.head_spec)
        with execution.shared(self.spill_dir / f"table-{value.name}") as folder:
            tasks = submit_rows(
                runner, value, None, self.head_spec, TABLE_ROWS, folder / "rows", value.name or "", table
            )
            return joined(runner, value, runner.gather(tasks, "quantize"), self.head_spec)

    def _quantize_block_remotely(
        self,
        runner: execution.RayRunner,
        model: ir.Model,
        block: Block,
        hessians: dict[Site, np.ndarray] | None,
        own: bool,
        spill: SpillFile | None,
    ) -> int:
        """`_quantize_block` on a Ray cluster: each projection's output channels in tasks of TASK_ROWS
        (GPTQ and RTN quantize each channel on its own, so the parts are the whole weight's rows, bit for bit);
        the workers read the weights from their files and write the codes and scales into the block's folder
        in the staging folder, and the Hessian factors, computed here, reach them as files there."""
        if self.spill_dir is None:
            raise RotgraphError("internal: quantizing on Ray needs the staging folder (spill_dir)")
        linears = block_linears(block)
        with execution.shared(self.spill_dir / f"block-{block.index}") as folder:
            factors: dict[str, HessianFactor] = {}
            tasks: list[list[execution.Task]] = []
            for role, lin in linears:
                factor = None if hessians is None else self._factor(factors, hessians, block, role, own)
                label = f"block {block.index} {role}"
                tasks.append(submit_rows(runner, lin.weight, factor, self.spec, TASK_ROWS, folder / role, label))
            factors.clear()  # in their files until the tasks end
            done = runner.gather([t for parts in tasks for t in parts], "quantize")
            for (role, lin), parts in zip(linears, tasks, strict=True):
                q = joined(runner, lin.weight, [done.pop(0) for _ in parts], self.spec)
                self._emit(model, block, role, lin, q)
                del q
                if spill is not None:
                    spill.spill(model.graph)
        return len(linears)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        hessians = None
        desc = discover(model)
        by_block = self._started_block_hessians()
        if self.block_hessians is not None:
            self.block_hessians.start(model, desc)
        elif self.method == "gptq" and by_block is None:
            assert self.calibration is not None  # the constructor refuses gptq without it
            hessians = self.calibration.need(self.calibration.hessians, "hessians", self)
        spill = SpillFile(self.spill_dir) if self.spill_dir is not None else None
        count = 0
        blocks = tqdm(desc.blocks, desc="weights", unit="block", disable=by_block is None, leave=False)
        seconds: list[tuple[float, float, float]] = []  # per block: Hessians, quantization, the block's run after
        for block in blocks:
            start = time.perf_counter()
            if by_block is not None:
                hessians = by_block.hessians(block)
            summed = time.perf_counter()
            count += self._quantize_block(model, block, hessians, own=by_block is not None, spill=spill)
            quantized = time.perf_counter()
            if by_block is not None:
                by_block.done(block)
                hessians = None  # one block's at a time
            seconds.append((summed - start, quantized - summed, time.perf_counter() - quantized))
        if by_block is not None:
            by_block.log_errors()
            _log_block_seconds(seconds, "the next block's inputs" if by_block.sequential else "the check")
        if self.head_spec is not None and self.shared_head:
            rows = embedding_rows(desc)
            tolerance = map_tolerance(desc.lm_head.weight.dtype)
            mix = None if desc.lm_head_tied else embedding_map(rows, read_float64(desc.lm_head.weight), tolerance)
            emit_shared_head(model, desc, quantize_rtn(rows, self.head_spec), mix, self.fmt, self.accuracy_level)
            if spill is not None:
                spill.spill(model.graph)
            logger.info(
                "quantized the embedding and lm_head as one shared table (rtn, %d bits%s)",
                self.head_spec.bits,
                ", lm_head through a float hidden x hidden map" if mix is not None else "",
            )
        elif self.head_spec is not None:
            if desc.lm_head_tied:
                raise RotgraphError("quantizing lm_head needs it untied (UntieEmbeddingPass)")
            # One table at a time, read in its stored dtype (a 128256 x 4096 table is 4.2 GB in float64)
            head = self._tables_rtn(desc.lm_head.weight, table=False)
            release_stored(desc.lm_head.weight)  # its mapped pages (1 GB at 8B widths) leave the RSS now
            if self.fmt == "ort":
                emit_matmulnbits(model, desc.lm_head, head, "lm_head", self.accuracy_level)
            else:
                emit_dequantize(model, desc.lm_head, head, "lm_head")
            del head
            emb = self._tables_rtn(desc.embedding_table, table=True)
            release_stored(desc.embedding_table)
            if self.fmt == "ort":
                emit_gather_quantized(model, desc.embedding, emb, "embedding")
            else:
                emit_embedding(model, desc.embedding, emb, "embedding")
            del emb
            if spill is not None:
                spill.spill(model.graph)
            logger.info("quantized the embedding and lm_head (rtn, %d bits)", self.head_spec.bits)
        logger.info("quantized %d projection weights (%s, %d bits)", count, self.method, self.spec.bits)
        return ir.passes.PassResult(model, count > 0 or self.head_spec is not None)
