"""Graph-walking matchers: linear projections, norms, residual Adds, and rotgraph's own ops, which
discovery looks through (an online Hadamard or a FakeQuant between a norm and its readers changes no
structure)."""

from __future__ import annotations

import onnx_ir as ir

from rotgraph.constants import ROTGRAPH_DOMAIN
from rotgraph.errors import StructureError
from rotgraph.structure.model import Linear, Norm, is_quantized_weight

# Ops that move or repeat data without computing on the last axis; the walk back to RoPE steps over them.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten", "Cast"})
# Ops whose non-first inputs are shapes or indices: data flows only through input 0.
DATA_FIRST_OPS = frozenset({"Reshape", "Expand", "Slice", "Gather", "Tile", "Unsqueeze", "Squeeze", "Pad"})
SHAPE_OPS = frozenset({"Shape", "Size"})


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def is_norm(node: ir.Node) -> bool:
    """RMSNormalization (opset 23) or onnxruntime's SimplifiedLayerNormalization."""
    if node.op_type == "RMSNormalization" and is_default_domain(node):
        return True
    return node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx", "com.microsoft")


def is_hadamard(node: ir.Node | None) -> bool:
    return node is not None and node.domain == ROTGRAPH_DOMAIN and node.op_type == "Hadamard"


def is_rotgraph_op(node: ir.Node | None) -> bool:
    """rotgraph's own single-input ops (Hadamard, FakeQuant): transparent to structure discovery."""
    return node is not None and node.domain == ROTGRAPH_DOMAIN


def data_consumers(value: ir.Value) -> list[ir.Node]:
    """Consumers of `value` that use it as data (shape-reading ops are left out)."""
    return [n for n in value.consumers() if n.op_type not in SHAPE_OPS]


def describe(value: ir.Value | None) -> str:
    """`value` and its producer, for error messages."""
    if value is None:
        return "<none>"
    producer = value.producer()
    by = f" produced by {producer.op_type} node {producer.name!r}" if producer is not None else ""
    return f"value {value.name!r}{by}"


def is_constant_shift(node: ir.Node | None) -> bool:
    """Sub(x, constant): keys moved by their calibrated mean (`SubtractKeyMeanPass`) or a projection's
    input by its own (`CenterActivationsPass`), transparent to the walks between RoPE, the KV cache and
    the score MatMul and to those between a norm (or the gating Mul) and the projections."""
    return (
        node is not None
        and node.op_type == "Sub"
        and is_default_domain(node)
        and len(node.inputs) == 2
        and node.inputs[1] is not None
        and node.inputs[1].const_value is not None
    )


def through_rotgraph_ops(value: ir.Value) -> list[ir.Node]:
    """Data consumers of `value`, looking through chains of rotgraph ops and constant shifts."""
    nodes = []
    for node in data_consumers(value):
        transparent = is_rotgraph_op(node) or (is_constant_shift(node) and node.inputs[0] is value)
        nodes += through_rotgraph_ops(node.outputs[0]) if transparent else [node]
    return nodes


def before_rotgraph_ops(value: ir.Value) -> ir.Value:
    """The value a chain of rotgraph ops and constant shifts ending in `value` started from."""
    while is_rotgraph_op(value.producer()) or is_constant_shift(value.producer()):
        producer = value.producer()
        assert producer is not None and producer.inputs[0] is not None
        value = producer.inputs[0]
    return value


def before_fake_quant(value: ir.Value) -> ir.Value:
    """The value a chain of rotgraph FakeQuant ops ending in `value` started from."""
    producer = value.producer()
    while is_rotgraph_op(producer) and producer is not None and producer.op_type == "FakeQuant":
        assert producer.inputs[0] is not None
        value = producer.inputs[0]
        producer = value.producer()
    return value


def as_linear(node: ir.Node, *, allow_tied: bool = False) -> Linear | None:
    """`node` as x @ W (+ b): a MatMul by a 2-D initializer (or a quantized one; with `allow_tied`, a
    Transpose of one), with the bias Add that follows it, if any."""
    if node.op_type != "MatMul" or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None:
        return None
    if weight.const_value is None or not weight.is_initializer():
        producer = weight.producer()
        tied = (
            allow_tied
            and producer is not None
            and producer.op_type == "Transpose"
            and producer.inputs[0] is not None
            and producer.inputs[0].is_initializer()
        )
        if not tied and not is_quantized_weight(weight):
            return None
    if len(weight.shape or ()) != 2 and weight.const_value is not None:
        return None
    bias = bias_node = None
    consumers = node.outputs[0].consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        if other is not None and other.is_initializer() and len(other.shape or ()) == 1:
            bias, bias_node = other, add
    return Linear(node, weight, bias, bias_node)


def linear_producing(value: ir.Value | None) -> Linear | None:
    """The Linear whose (biased) output is `value`."""
    if value is None:
        return None
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "Add":
        for inp in producer.inputs:
            if inp is not None and inp.producer() is not None:
                lin = as_linear(inp.producer())  # type: ignore[arg-type]
                if lin is not None and lin.bias_node is producer:
                    return lin
    lin = as_linear(producer)
    if lin is not None and lin.bias_node is None:
        return lin
    return None


def norm_reading(value: ir.Value, where: str) -> Norm | None:
    """The RMSNorm that reads the residual stream `value`, if any; more than one is an error."""
    norms = [n for n in data_consumers(value) if is_norm(n) and n.inputs[0] is value]
    if len(norms) > 1:
        raise StructureError(f"{where}: expected one RMSNorm reading the residual stream, found {len(norms)}")
    if not norms:
        return None
    node = norms[0]
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is None or not scale.is_initializer():
        raise StructureError(f"{where}: the RMSNorm {node.name!r} has no initializer scale")
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and axis != (len(value.shape) - 1 if value.shape is not None else None):
        raise StructureError(f"{where}: RMSNorm {node.name!r} normalizes axis {axis}, expected the last axis")
    return Norm(node, scale)


def residual_add(value: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    """The one Add reading the residual stream `value`, and its other operand."""
    adds = [n for n in data_consumers(value) if n.op_type == "Add" and is_default_domain(n)]
    if len(adds) != 1:
        return None
    add = adds[0]
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    assert other is not None
    return add, other


def reader_linears(norm: Norm, where: str) -> list[Linear]:
    """The Linears reading `norm`'s output (through rotgraph ops); anything else is an error."""
    out = norm.node.outputs[0]
    linears = []
    for node in through_rotgraph_ops(out):
        lin = as_linear(node)
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if lin is None and weight is not None and weight.const_value is not None and len(weight.const_value.shape) != 2:
            raise StructureError(
                f"{where}: MatMul node {node.name!r} multiplies by the weight {weight.name!r} of shape "
                f"{tuple(weight.const_value.shape)}: a projection's weight must be 2-D (in x out)"
            )
        if lin is None or before_rotgraph_ops(lin.input) is not out:
            raise StructureError(
                f"{where}: the RMSNorm output {out.name!r} feeds {node.op_type} node {node.name!r}; "
                "expected only MatMuls with initializer weights"
            )
        linears.append(lin)
    return linears
