"""Standard ONNX at a chosen opset: no local functions, no custom domains."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass, ShapeInferencePass

from rotgraph.errors import RotgraphError
from rotgraph.online import FunctionBuilder
from rotgraph.options import INT4_OPSET, MAX_OPSET, REDUCE_AXES_INPUT_OPSET, RMS_NORM_OPSET, check_opset, setting

logger = logging.getLogger(__name__)

_REDUCE_OPS = (
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)
_INT4 = (ir.DataType.INT4, ir.DataType.UINT4)


def _decompose_rms_norm(graph: ir.Graph, node: ir.Node, opset: int) -> None:
    """RMSNormalization(x, w) -> x / sqrt(mean(x^2 over the last axis) + eps) * w, in float32 (the
    op's default stash type) for narrower inputs."""
    x, w = node.inputs[0], node.inputs[1]
    assert x is not None and w is not None
    axis = node.attributes.get_int("axis", -1)
    rank = len(x.shape) if x.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        raise RotgraphError(
            f"RMSNormalization {node.name!r} normalizes from axis {axis}: only the last axis is lowered"
        )
    eps = node.attributes.get_float("epsilon", 1e-5)
    b = FunctionBuilder()
    f = np.float32
    dtype = x.dtype or ir.DataType.FLOAT
    xf = x if dtype == ir.DataType.FLOAT else b.op("Cast", x, to=ir.DataType.FLOAT)
    square = b.op("Mul", xf, xf)
    if opset >= REDUCE_AXES_INPUT_OPSET:
        mean = b.op("ReduceMean", square, b.const(f"{node.name}_axes", np.array([-1], np.int64)), keepdims=1)
    else:
        mean = b.op("ReduceMean", square, axes=[-1], keepdims=1)
    rms = b.op("Sqrt", b.op("Add", mean, b.const(f"{node.name}_eps", np.array(eps, f))))
    y = b.op("Div", xf, rms)
    if dtype != ir.DataType.FLOAT:
        y = b.op("Cast", y, to=dtype)
    y = b.op("Mul", y, w)
    out = node.outputs[0]
    y.name, y.type, y.shape = f"{out.name}_decomposed", out.type, out.shape
    graph.insert_before(node, b.nodes)
    out.replace_all_uses_with(y, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _axes_to_attribute(node: ir.Node) -> bool:
    """Reduce*(x, axes) with a constant axes input -> Reduce*(x) with an axes attribute (opset < 18);
    whether there was such an input."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    axes = ir.convenience.get_const_tensor(node.inputs[1])
    if axes is None:
        raise RotgraphError(f"{node.op_type} {node.name!r}: axes are computed at run time; opset 17 needs constants")
    node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes.numpy().reshape(-1)])
    node.resize_inputs(1)
    return True


class StandardOpsPass(ir.passes.InPlacePass):
    """Rewrite the model into standard ONNX at `opset` (17 to 23).

    Inlines every local function (rotgraph's Hadamard, FakeQuant and KV-cache ops become the standard
    ops of their bodies: the Hadamard stays the Kronecker form x -> reshape [.., m, 2^k] -> MatMul by
    the Sylvester factor -> MatMul by the m-order factor -> reshape back); below opset 23 writes
    RMSNormalization decomposed; below 18 moves the Reduce ops' constant axes inputs into attributes;
    then sets the default opset to `opset`, drops unused opset imports and infers shapes (the onnx
    checker wants a shape on every graph output).

    Guarantees: no functions remain, every node is in the default domain and defined at `opset`.
    Refuses (RotgraphError) a node of another domain (e.g. onnxruntime's fused attention), and INT4 or
    block-wise quantization below opset 21.
    """

    def __init__(self, opset: int = MAX_OPSET) -> None:
        super().__init__()
        check_opset(opset)
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = InlinePass()(model).modified
        modified |= RemoveUnusedFunctionsPass()(model).modified
        graph = model.graph
        foreign = sorted({f"{n.domain}.{n.op_type}" for n in graph if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise RotgraphError(
                f"standard ONNX was asked for, but the graph holds non-standard ops: {', '.join(foreign)}"
            )
        decomposed = moved = 0
        for node in list(graph):
            if node.op_type == "RMSNormalization" and self.opset < RMS_NORM_OPSET:
                _decompose_rms_norm(graph, node, self.opset)
                decomposed += 1
            elif node.op_type in _REDUCE_OPS and self.opset < REDUCE_AXES_INPUT_OPSET:
                moved += _axes_to_attribute(node)
        if self.opset < INT4_OPSET:
            modified |= self._refuse_int4(graph)
        imports = dict(model.opset_imports)
        model.opset_imports[""] = self.opset
        RemoveUnusedOpsetsPass()(model)
        model.opset_imports[""] = self.opset
        # graph outputs need shapes (the stored KV cache's)
        modified |= ShapeInferencePass(strict_mode=False)(model).modified
        missing = sorted({n.op_type for n in graph if not onnx.defs.has(n.op_type, self.opset, "")})
        if missing:
            raise RotgraphError(
                f"opset {self.opset} does not define {', '.join(missing)}: ask for a higher opset ({setting('opset')})"
            )
        logger.info("standard ONNX at opset %d (%d RMSNorms decomposed)", self.opset, decomposed)
        modified |= bool(decomposed or moved) or dict(model.opset_imports) != imports
        return ir.passes.PassResult(model, modified)

    def _refuse_int4(self, graph: ir.Graph) -> bool:
        """Refuse 4-bit codes and block-wise scales; whether a one-block scale was rewritten per channel."""
        rewritten = False
        for node in graph:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                continue
            if "block_size" in node.attributes:
                rewritten |= _one_block_per_channel(node)
            types = [v.dtype for v in (*node.inputs, *node.outputs) if v is not None]
            if any(t in _INT4 for t in types) or "block_size" in node.attributes:
                raise RotgraphError(
                    f"{node.op_type} {node.name!r}: 4-bit codes and block-wise scales need opset {INT4_OPSET}, "
                    f"not {self.opset} (use 8 bits per channel: --scheme w8.. {setting('group', 0)})"
                )
        return rewritten


def _one_block_per_channel(node: ir.Node) -> bool:
    """A 2-D block-wise DequantizeLinear whose one block spans its axis (scales [1, n] or [n, 1]) is
    per-channel along the other axis: rewrite it so (1-D scales and zero points, no block_size); whether it was."""
    axis = node.attributes.get_int("axis", 1)
    scale = node.inputs[1]
    tensor = ir.convenience.get_const_tensor(scale) if scale is not None else None
    if tensor is None or len(tensor.shape) != 2 or tensor.shape[axis] != 1:
        return False
    for i in (1, 2):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None or value.const_value is None:
            continue
        flat = value.const_value.numpy().reshape(-1)
        value.const_value = ir.Tensor(flat, dtype=value.const_value.dtype, name=value.name)
        value.shape = ir.Shape(list(flat.shape))
    node.attributes["axis"] = ir.AttrInt64("axis", 1 - axis % 2)
    del node.attributes["block_size"]
    return True
