"""Quantize the projection weights of every block into standard block-wise DequantizeLinear."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import grid
from rotgraph.calibrate import ROLE_SITES, block_linears
from rotgraph.errors import RotgraphError
from rotgraph.quant import QuantizedWeight, WeightSpec, gptq, quantize_rtn
from rotgraph.structure import Linear, discover, is_quantized_weight
from rotgraph.weights import SpillFile, new_initializer, read_float64

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
    store = codes.astype(np.int8 if spec.symmetric else np.uint8)
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
    attrs = [
        ir.AttrInt64("K", k),
        ir.AttrInt64("N", n),
        ir.AttrInt64("bits", q.spec.bits),
        ir.AttrInt64("block_size", g),
        ir.AttrInt64("accuracy_level", accuracy_level),
    ]
    node = ir.Node("com.microsoft", "MatMulNBits", inputs, attrs, name=f"{name}.matmulnbits")
    model.opset_imports.setdefault("com.microsoft", 1)
    out = lin.node.outputs[0]
    _take_over(out, node.outputs[0])
    graph.insert_before(lin.node, node)
    out.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
    old = lin.weight
    graph.remove(lin.node, safe=True)
    _drop_if_unused(graph, old)


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
    model.opset_imports.setdefault("com.microsoft", 1)
    out = gather.outputs[0]
    _take_over(out, node.outputs[0])
    graph.insert_before(gather, node)
    out.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
    graph.remove(gather, safe=True)
    _drop_if_unused(graph, table)


def emit_embedding(model: ir.Model, gather: ir.Node, q: QuantizedWeight, name: str) -> None:
    """Gather(E, ids) -> Gather(DequantizeLinear(codes [vocab, hidden], scales along hidden), ids)."""
    table = gather.inputs[0]
    assert table is not None and q.spec.symmetric
    dq = _dequantize_linear(model.graph, name, q.codes, q.scales, None, 1, q.spec, table.dtype or ir.DataType.FLOAT)
    model.graph.insert_before(gather, dq)
    gather.replace_input_with(0, dq.outputs[0])
    _drop_if_unused(model.graph, table)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """W (float [in, out]) -> DequantizeLinear(int codes, scales[, zero points]) for every Q/K/V/O,
    gate/up/down MatMul (format "qdq"), or MatMul -> com.microsoft MatMulNBits with the same codes
    (format "ort", `accuracy_level` 0: float compute, 4: int8 activations; 8-bit weights always 4, the
    only fast onnxruntime kernel for them). With `head_spec` the
    embedding table and lm_head are quantized by RTN too: DequantizeLinear in "qdq"; in "ort"
    GatherBlockQuantized for the embedding and MatMulNBits for lm_head, so that onnxruntime never
    dequantizes the whole vocabulary table. Without it they stay float.

    Methods: "rtn" (round to nearest, clipping ratio searched per group) or "gptq" (needs `hessians`,
    X^T X of each projection's input keyed by structural site: block index and "qkv" | "o" | "gate_up" |
    "down", see `rotgraph.calibrate`; it may be filled by an earlier calibration stage after this pass is
    constructed). Codes are INT4/UINT4/INT8/UINT8,
    per output channel (axis=1) or block-wise along the input axis (opset 21 block_size). Guarantees:
    the dequantized weights equal the quantizer's output exactly; the graph is standard ONNX.
    """

    def __init__(
        self,
        spec: WeightSpec,
        method: str = "rtn",
        hessians: Mapping[tuple[int, str], np.ndarray] | None = None,
        damp: float = 0.01,
        act_order: bool = False,
        head_spec: WeightSpec | None = None,
        fmt: str = "qdq",
        accuracy_level: int = 0,
        spill_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.spill_dir = spill_dir
        if method not in ("rtn", "gptq"):
            raise RotgraphError(f"unknown weight quantizer {method!r} (rtn, gptq)")
        if method == "gptq" and hessians is None:
            raise RotgraphError("GPTQ needs calibration Hessians")
        if fmt not in ("qdq", "ort"):
            raise RotgraphError(f"unknown format {fmt!r} (qdq, ort)")
        self.spec, self.method, self.hessians, self.damp, self.act_order = spec, method, hessians, damp, act_order
        self.head_spec, self.fmt, self.accuracy_level = head_spec, fmt, accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        spill = SpillFile(self.spill_dir) if self.spill_dir is not None else None
        count = 0
        for block in desc.blocks:
            for role, lin in block_linears(block):
                if is_quantized_weight(lin.weight):
                    raise RotgraphError(f"block {block.index} {role}: the weight is already quantized")
                wt = read_float64(lin.weight).T
                if self.method == "gptq":
                    assert self.hessians is not None
                    h = self.hessians.get((block.index, ROLE_SITES[role]))
                    if h is None:
                        raise RotgraphError(f"block {block.index} {role}: no calibration Hessian for its input")
                    q = gptq(wt, h, self.spec, damp=self.damp, act_order=self.act_order)
                else:
                    q = quantize_rtn(wt, self.spec)
                if self.fmt == "ort":
                    emit_matmulnbits(model, lin, q, f"layers.{block.index}.{role}", self.accuracy_level)
                else:
                    emit_dequantize(model, lin, q, f"layers.{block.index}.{role}")
                if spill is not None:
                    spill.spill(model.graph)
                count += 1
        if self.head_spec is not None:
            if desc.lm_head_tied:
                raise RotgraphError("quantizing lm_head needs it untied (UntieEmbeddingPass)")
            head = quantize_rtn(read_float64(desc.lm_head.weight).T, self.head_spec)
            emb = quantize_rtn(read_float64(desc.embedding_table), self.head_spec)
            if self.fmt == "ort":
                emit_matmulnbits(model, desc.lm_head, head, "lm_head", self.accuracy_level)
                emit_gather_quantized(model, desc.embedding, emb, "embedding")
            else:
                emit_dequantize(model, desc.lm_head, head, "lm_head")
                emit_embedding(model, desc.embedding, emb, "embedding")
            if spill is not None:
                spill.spill(model.graph)
            logger.info("quantized the embedding and lm_head (rtn, %d bits)", self.head_spec.bits)
        logger.info("quantized %d projection weights (%s, %d bits)", count, self.method, self.spec.bits)
        return ir.passes.PassResult(model, True)
