"""Quantize the projection weights of every block into standard block-wise DequantizeLinear."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.quant import QuantizedWeight, WeightSpec, gptq, quantize_rtn
from rotgraph.structure import Linear, discover, is_quantized_weight
from rotgraph.weights import new_initializer, read_float64

logger = logging.getLogger(__name__)


def _code_type(spec: WeightSpec) -> ir.DataType:
    if spec.bits == 4:
        return ir.DataType.INT4 if spec.symmetric else ir.DataType.UINT4
    return ir.DataType.INT8 if spec.symmetric else ir.DataType.UINT8


def emit_dequantize(model: ir.Model, lin: Linear, q: QuantizedWeight, name: str) -> None:
    """Replace lin's float weight by DequantizeLinear(codes [in, out], scale[, zero point])."""
    graph = model.graph
    spec = q.spec
    dtype = lin.weight.dtype or ir.DataType.FLOAT
    code_type = _code_type(spec)
    codes = q.codes.T  # [in, out]
    store = codes.astype(np.int8) if spec.symmetric else codes.astype(np.uint8)
    codes_v = new_initializer(graph, f"{name}.codes", ir.Tensor(store, dtype=code_type, name=f"{name}.codes"))
    per_channel = q.scales.shape[1] == 1
    scales = q.scales[:, 0] if per_channel else q.scales.T  # [out] or [groups, out]
    scale_v = new_initializer(graph, f"{name}.scale", ir.Tensor(scales.astype(dtype.numpy()), name=f"{name}.scale"))
    inputs = [codes_v, scale_v]
    if not spec.symmetric:
        zeros = q.zeros[:, 0] if per_channel else q.zeros.T
        zero_v = new_initializer(
            graph, f"{name}.zero", ir.Tensor(zeros.astype(np.uint8), dtype=code_type, name=f"{name}.zero")
        )
        inputs.append(zero_v)
    attrs = [ir.AttrInt64("axis", 1)] if per_channel else [ir.AttrInt64("axis", 0)]
    if not per_channel:
        attrs.append(ir.AttrInt64("block_size", codes.shape[0] // scales.shape[0]))
    dq = ir.Node("", "DequantizeLinear", inputs, attrs, name=f"{name}.dequantize")
    dq.outputs[0].name = f"{name}.dequantized"
    dq.outputs[0].type = ir.TensorType(dtype)
    dq.outputs[0].shape = ir.Shape(list(codes.shape))
    graph.insert_before(lin.node, dq)
    old = lin.weight
    lin.node.replace_input_with(1, dq.outputs[0])
    if not old.uses() and old.name is not None and old.name in graph.initializers:
        graph.initializers.pop(old.name)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """W (float [in, out]) -> DequantizeLinear(int codes, scales[, zero points]) for every Q/K/V/O,
    gate/up/down MatMul; the embedding and lm_head stay float.

    Methods: "rtn" (round to nearest, clipping ratio searched per group) or "gptq" (needs `hessians`,
    X^T X of each projection's input keyed by the input value's name). Codes are INT4/UINT4/INT8/UINT8,
    per output channel (axis=1) or block-wise along the input axis (opset 21 block_size). Guarantees:
    the dequantized weights equal the quantizer's output exactly; the graph is standard ONNX.
    """

    def __init__(
        self,
        spec: WeightSpec,
        method: str = "rtn",
        hessians: Mapping[str, np.ndarray] | None = None,
        damp: float = 0.01,
        act_order: bool = False,
    ) -> None:
        super().__init__()
        if method not in ("rtn", "gptq"):
            raise RotgraphError(f"unknown weight quantizer {method!r} (rtn, gptq)")
        if method == "gptq" and hessians is None:
            raise RotgraphError("GPTQ needs calibration Hessians")
        self.spec, self.method, self.hessians, self.damp, self.act_order = spec, method, hessians, damp, act_order

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        count = 0
        for block in desc.blocks:
            a, m = block.attention, block.mlp
            for role, lin in (
                ("q", a.q),
                ("k", a.k),
                ("v", a.v),
                ("o", a.o),
                ("gate", m.gate),
                ("up", m.up),
                ("down", m.down),
            ):
                if is_quantized_weight(lin.weight):
                    raise RotgraphError(f"block {block.index} {role}: the weight is already quantized")
                wt = read_float64(lin.weight).T
                if self.method == "gptq":
                    assert self.hessians is not None
                    h = self.hessians.get(lin.input.name or "")
                    if h is None:
                        raise RotgraphError(
                            f"block {block.index} {role}: no calibration Hessian for {lin.input.name!r}"
                        )
                    q = gptq(wt, h, self.spec, damp=self.damp, act_order=self.act_order)
                else:
                    q = quantize_rtn(wt, self.spec)
                emit_dequantize(model, lin, q, f"layers.{block.index}.{role}")
                count += 1
        logger.info("quantized %d weights (%s, %d bits)", count, self.method, self.spec.bits)
        return ir.passes.PassResult(model, True)
