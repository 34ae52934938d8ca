"""Pack the Q, K and V projections of onnxruntime's GroupQueryAttention into one MatMul."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.passes.ort.group_query_attention import MS_DOMAIN
from rotgraph.structure.match import is_rotgraph_op

logger = logging.getLogger(__name__)

_ATTRS = ("K", "bits", "block_size", "accuracy_level")


@dataclass(frozen=True)
class Projection:
    node: ir.Node  # MatMul(x, W [in, out]) or com.microsoft MatMulNBits(x, B, scales[, zero_points])
    bias: ir.Node | None  # Add(projection, b [out]) after it


def _array(value: ir.Value | None) -> np.ndarray | None:
    return np.asarray(value.const_value.numpy()) if value is not None and value.const_value is not None else None


def projection(value: ir.Value | None, readers: int = 1) -> Projection | None:
    """The projection that computes `value` and is read there only (by `readers` nodes), if `value` is one."""
    node = value.producer() if value is not None else None
    if node is None or len(list(value.uses())) != readers:  # type: ignore[union-attr]
        return None
    bias = None
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        constants = [_array(i) for i in node.inputs]
        inner = node.inputs[0] if constants[1] is not None else node.inputs[1]
        if sum(c is not None for c in constants) != 1 or inner is None or len(list(inner.uses())) != 1:
            return None
        bias, node = node, inner.producer()
        if node is None:
            return None
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        extra = node.inputs[4:]
        if any(i is not None for i in extra) or any(i is not None and i.const_value is None for i in node.inputs[1:]):
            return None  # g_idx or a bias input, or weights computed at run time
        return Projection(node, bias)
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            return None
        return Projection(node, bias)
    return None


def same_kind(projections: list[Projection]) -> bool:
    first = projections[0].node
    for p in projections:
        node = p.node
        if node.op_type != first.op_type or node.inputs[0] is not first.inputs[0]:
            return False
        if (p.bias is None) != (projections[0].bias is None):
            return False
        if node.op_type == "MatMulNBits":
            attrs = [node.attributes.get_int(a, 0) for a in _ATTRS]
            if attrs != [first.attributes.get_int(a, 0) for a in _ATTRS]:
                return False
            if _zero_points(node) != _zero_points(first):
                return False
    return True


def _zero_points(node: ir.Node) -> bool:
    return len(node.inputs) > 3 and node.inputs[3] is not None


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer of `graph` holding `array`, its shape and type set."""
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def unpacked_attentions(graph: ir.Graph) -> list[ir.Node]:
    """The com.microsoft GroupQueryAttention nodes that read separate query, key and value."""
    return [
        n
        for n in graph
        if n.op_type == "GroupQueryAttention"
        and n.domain == MS_DOMAIN
        and len(n.inputs) >= 3
        and n.inputs[1] is not None
        and n.inputs[2] is not None
    ]


class PackQKVPass(ir.passes.InPlacePass):
    """Q, K and V projections of a GroupQueryAttention -> one projection, the attention in packed-QKV form.

    Where the query, key and value operands of a com.microsoft GroupQueryAttention are each computed by a
    projection of the same input that nothing else reads (MatMulNBits with the same K, bits, block size
    and accuracy level, or MatMul by a constant [in, out] weight; each optionally followed by the Add of a
    constant bias), the three become one: the weights (MatMulNBits codes, scales and zero points, rows
    per output channel; or MatMul columns) and biases concatenated in Q, K, V order, and the attention
    reads the packed [batch, seq, (heads + 2 kv_heads) * head_dim] as its query with no key and value,
    which is how onnxruntime's GroupQueryAttention takes packed QKV. Weights are moved byte for byte, so
    the function is the same to float rounding (each output channel is computed as before). A layer
    whose projections differ in kind is left as it is (logged).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packed = 0
        for node in unpacked_attentions(graph):
            found = [projection(node.inputs[i]) for i in range(3)]
            projections = [p for p in found if p is not None]
            if len(projections) != 3 or not same_kind(projections):
                # RoPE and R3 between Q/K and the attention (a kv scheme): PackRotaryQKVPass packs them later
                rotated = any(v is not None and is_rotgraph_op(v.producer()) for v in node.inputs[:2])
                log = logger.debug if rotated else logger.info
                log("%s: Q, K and V are not three projections of one kind: left unpacked", node.name)
                continue
            output = pack_projections(graph, projections, f"qkv_{packed}")
            node.replace_input_with(0, output)
            node.replace_input_with(1, None)  # type: ignore[arg-type]
            node.replace_input_with(2, None)  # type: ignore[arg-type]
            packed += 1
        if packed:
            RemoveUnusedNodesPass()(model)
            logger.info("Q, K and V packed into one projection in %d layers", packed)
        return ir.passes.PassResult(model, packed > 0)


@dataclass(frozen=True)
class Packing:
    """One projection computing several side by side on the last axis: its op, its attributes, its constant
    inputs after x (an initializer name suffix and the projections' arrays concatenated, or None where the
    input is absent) and the concatenated bias."""

    domain: str
    op_type: str
    attributes: tuple[ir.Attr, ...]
    constants: tuple[tuple[str, np.ndarray] | None, ...]
    bias: np.ndarray | None


def packing(projections: list[Projection]) -> Packing:
    """The packed projection of `projections` (of one kind, `same_kind`): MatMul weights by columns,
    MatMulNBits codes, scales and zero points by output channel (byte for byte), biases concatenated."""
    first = projections[0].node
    attributes: tuple[ir.Attr, ...] = ()
    if first.op_type == "MatMul":
        weight = np.concatenate([_array(p.node.inputs[1]) for p in projections], axis=1)  # type: ignore[misc]
        constants: list[tuple[str, np.ndarray] | None] = [("weight", weight)]
    else:
        constants = []
        for index, what in ((1, "packed"), (2, "scales"), (3, "zero_points")):
            if index >= len(first.inputs) or first.inputs[index] is None:
                constants.append(None)
                continue
            parts = []
            for p in projections:
                array = _array(p.node.inputs[index])
                assert array is not None
                n = p.node.attributes.get_int("N", 0)
                parts.append(array.reshape(n, *array.shape[1:]) if array.ndim > 1 else array.reshape(n, -1))
            joined = np.concatenate(parts, axis=0)
            original = _array(first.inputs[index])
            assert original is not None
            constants.append((what, joined.reshape(-1) if original.ndim == 1 else joined))
        while constants[-1] is None:
            constants.pop()
        attrs = {a.name: a for a in first.attributes.values()}
        attrs["N"] = ir.AttrInt64("N", sum(p.node.attributes.get_int("N", 0) for p in projections))
        attributes = tuple(attrs.values())
    bias = None
    if projections[0].bias is not None:
        biases = []
        for p in projections:
            assert p.bias is not None
            biases.append(next(a for a in map(_array, p.bias.inputs) if a is not None).reshape(-1))
        bias = np.concatenate(biases)
    return Packing(first.domain, first.op_type, attributes, tuple(constants), bias)


def pack_projections(graph: ir.Graph, projections: list[Projection], name: str) -> ir.Value:
    """One projection computing `projections` side by side on the last axis (`packing`), inserted before the
    first; returns its output."""
    first = projections[0].node
    packed = packing(projections)
    inputs = [first.inputs[0]]
    inputs += [new_initializer(graph, f"{name}.{c[0]}", c[1]) if c is not None else None for c in packed.constants]
    node = ir.Node(packed.domain, packed.op_type, inputs, packed.attributes, name=name)
    out = node.outputs[0]
    out.name = f"{name}_out"
    graph.insert_before(first, node)
    if packed.bias is not None:
        add = ir.Node("", "Add", [out, new_initializer(graph, f"{name}.bias", packed.bias)], name=f"{name}_bias")
        graph.insert_after(node, add)
        out = add.outputs[0]
        out.name = f"{name}_biased"
    return out
