"""rotgraph's `Hadamard` op: an online orthonormal Hadamard transform on the last axis.

The op lives in the `rotgraph` domain with one overload per size (`n576`, `n1536`, ...). Each overload
is carried in the model as an ONNX function written in standard ops, so any runtime executes it:
X -> Reshape [-1, m, p] -> MatMul(., B) -> MatMul(A^T, .) -> Reshape back, which is x @ kron(A, B) /
sqrt(n) with B a Sylvester matrix of order p = 2**k and A a Hadamard matrix of order m (see
`hadamard.HadamardFactors`); this costs n * (m + p) multiply-adds per vector instead of n**2. For
n = 2**k (m = 1, e.g. R3 on head_dim 64) the body is the single MatMul(X, B).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir

from rotgraph.constants import ROTGRAPH_DOMAIN
from rotgraph.errors import StructureError
from rotgraph.hadamard import HadamardFactors, HadamardRotation, hadamard_factors
from rotgraph.structure.match import is_hadamard
from rotgraph.structure.model import Linear
from rotgraph.weights import multiply_left, rewrite_initializer

FUNCTION_OPSET = 23


def factors_for(n: int, what: str) -> HadamardFactors:
    factors = hadamard_factors(n)
    if factors is None:
        raise StructureError(
            f"{what}: no Hadamard matrix of order {n} is known to rotgraph, so no online transform can be "
            "inserted (`rotgraph rotate --no-online`, `rotgraph quantize --set rotation.online=false`)"
        )
    return factors


def constant_node(name: str, array: np.ndarray) -> ir.Node:
    """A Constant node holding `array` (for function bodies)."""
    return ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.Tensor(array, name=name))], name=name)


class FunctionBuilder:
    """Nodes in standard ops, collected in order: ONNX function bodies (rotgraph's Hadamard, FakeQuant,
    KV-cache ops) and small subgraphs a pass inserts."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, *inputs: ir.Value, **attrs: int | list[int]) -> ir.Value:
        node = ir.Node(
            "",
            op_type,
            list(inputs),
            [ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) for k, v in attrs.items()],
        )
        self.nodes.append(node)
        return node.outputs[0]

    def text_op(self, op_type: str, *inputs: ir.Value, **attrs: str) -> ir.Value:
        node = ir.Node("", op_type, list(inputs), [ir.AttrString(k, v) for k, v in attrs.items()])
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, name: str, value: np.ndarray) -> ir.Value:
        node = constant_node(name, value)
        self.nodes.append(node)
        return node.outputs[0]

    def function(self, name: str, overload: str, inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Function:
        graph = ir.Graph(inputs, outputs, nodes=self.nodes, opset_imports={"": FUNCTION_OPSET}, name=name)
        return ir.Function(ROTGRAPH_DOMAIN, name, overload, graph=graph, attributes=[])


def _function(factors: HadamardFactors, dtype: ir.DataType) -> ir.Function:
    np_dtype = dtype.numpy()
    x = ir.Value(name="X")
    nodes: list[ir.Node] = []
    if factors.m == 1:  # a power of two: one MatMul on the last axis, no reshapes (fewer kernel launches)
        b = constant_node("B", (factors.b / np.sqrt(factors.p)).astype(np_dtype))
        right = ir.Node("", "MatMul", [x, b.outputs[0]], name="right")
        right.outputs[0].name = "Y"
        graph = ir.Graph([x], [right.outputs[0]], nodes=[b, right], opset_imports={"": FUNCTION_OPSET}, name="Hadamard")
        return ir.Function(ROTGRAPH_DOMAIN, "Hadamard", f"n{factors.n}", graph=graph, attributes=[])
    shape = ir.Node("", "Shape", [x], name="shape")
    split = constant_node("split_shape", np.array([-1, factors.m, factors.p], dtype=np.int64))
    b = constant_node("B", (factors.b / np.sqrt(factors.p)).astype(np_dtype))
    nodes += [shape, split, b]
    reshaped = ir.Node("", "Reshape", [x, split.outputs[0]], name="split")
    right = ir.Node("", "MatMul", [reshaped.outputs[0], b.outputs[0]], name="right")
    nodes += [reshaped, right]
    current = right.outputs[0]
    if factors.m > 1:
        a_t = constant_node("A_T", (factors.a.T / np.sqrt(factors.m)).astype(np_dtype))
        left = ir.Node("", "MatMul", [a_t.outputs[0], current], name="left")
        nodes += [a_t, left]
        current = left.outputs[0]
    back = ir.Node("", "Reshape", [current, shape.outputs[0]], name="merge")
    nodes.append(back)
    back.outputs[0].name = "Y"
    graph = ir.Graph([x], [back.outputs[0]], nodes=nodes, opset_imports={"": FUNCTION_OPSET}, name="Hadamard")
    return ir.Function(ROTGRAPH_DOMAIN, "Hadamard", f"n{factors.n}", graph=graph, attributes=[])


def insert_after_value(model: ir.Model, value: ir.Value, node: ir.Node, suffix: str) -> None:
    """Place the single-output `node` (already reading `value`) right after `value`'s producer and
    make every other consumer of `value` read the node's output instead."""
    model.opset_imports.setdefault(ROTGRAPH_DOMAIN, 1)
    out = node.outputs[0]
    out.name = f"{value.name}_{suffix}"
    out.shape = value.shape
    out.type = value.type
    value.replace_all_uses_with(out)
    node.replace_input_with(0, value)
    producer = value.producer()
    graph = model.graph
    if producer is not None:
        graph.insert_after(producer, node)
    elif len(graph):
        graph.insert_before(graph[0], node)
    else:
        graph.append(node)


def hadamard_attributes(factors: HadamardFactors) -> list[ir.Attr]:
    """What the compiled kernel (rotgraph/kernels) needs beyond the input: the +-1 matrix A, row-major
    (absent for a power of two). The function body ignores it; it has the same matrix as a constant."""
    if factors.m == 1:
        return []
    return [ir.AttrInt64s("a", [int(v) for v in factors.a.reshape(-1)])]


def insert_hadamard(model: ir.Model, value: ir.Value, factors: HadamardFactors) -> ir.Node:
    """Insert y = Hadamard(value) and make every former consumer of `value` read y instead."""
    key = (ROTGRAPH_DOMAIN, "Hadamard", f"n{factors.n}")
    if key not in model.functions:
        model.functions[key] = _function(factors, value.dtype or ir.DataType.FLOAT)
    node = ir.Node(
        ROTGRAPH_DOMAIN, "Hadamard", [value], hadamard_attributes(factors), overload=f"n{factors.n}", num_outputs=1
    )
    insert_after_value(model, value, node, suffix="hadamard")
    return node


def hadamard_before(model: ir.Model, lin: Linear, what: str) -> HadamardFactors:
    """x @ W -> Hadamard(x) @ (H^T W) for the projection `lin` (exact in real arithmetic; the weight
    rewrite costs one float32 rounding); refused where `lin` already reads an online Hadamard."""
    if is_hadamard(lin.input.producer()):
        raise StructureError(f"{what}: the projection {lin.node.name!r} already reads an online Hadamard")
    factors = factors_for(lin.shape[0], what)
    insert_hadamard(model, lin.input, factors)
    # W -> H^T W as a fast transform of each column: no n x n matrix (at n = 18944 it would take 2.9 GB)
    rewrite_initializer(lin.weight, functools.partial(multiply_left, m=HadamardRotation(factors).T))
    return factors
