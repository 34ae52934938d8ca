"""SplitFusedProjectionsPass on graphs built node by node: Slice and Split cuts, with and without bias."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rotgraph import io
from rotgraph.passes import SplitFusedProjectionsPass


def fused_graph(cut: str, bias: bool) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 12)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape(["n", 3, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(
        name="w", shape=ir.Shape([8, 12]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w)
    )
    nodes = [ir.Node("", "MatMul", [x, weight], name="fused")]
    inits = [weight]
    if bias:
        bv = ir.Value(name="b", shape=ir.Shape([12]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(b))
        inits.append(bv)
        nodes.append(ir.Node("", "Add", [bv, nodes[-1].outputs[0]], name="bias"))  # bias first: either order
    y = nodes[-1].outputs[0]
    y.shape = ir.Shape(["n", 3, 12])
    if cut == "split":
        sizes = ir.Value(name="sizes", const_value=ir.tensor(np.array([6, 3, 3], np.int64)))
        inits.append(sizes)
        nodes.append(ir.Node("", "Split", [y, sizes], [ir.AttrInt64("axis", -1)], num_outputs=3))
        outs = list(nodes[-1].outputs)
    else:
        outs = []
        for i, (lo, hi) in enumerate([(0, 6), (6, -3), (-3, np.iinfo(np.int64).max)]):
            consts = [
                ir.Value(name=f"s{i}{k}", const_value=ir.tensor(np.array([v], np.int64)))
                for k, v in enumerate((lo, hi, 2))
            ]
            inits += consts
            nodes.append(ir.Node("", "Slice", [y, *consts]))
            outs.append(nodes[-1].outputs[0])
        # an unrelated consumer of one part
        nodes.append(ir.Node("", "Relu", [outs[1]]))
        outs[1] = nodes[-1].outputs[0]
    for i, out in enumerate(outs):
        out.name = f"part{i}"
    graph = ir.Graph([x], outs, nodes=nodes, initializers=inits, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10), w, b


def run(model: ir.Model, x: np.ndarray, tmp_path, name: str) -> list[np.ndarray]:
    path = tmp_path / f"{name}.onnx"
    io.save_model(model, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("cut", ["split", "slice"])
@pytest.mark.parametrize("bias", [False, True])
def test_split_keeps_the_function_and_removes_the_cut(tmp_path, cut: str, bias: bool) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    model, w, b = fused_graph(cut, bias)
    before = run(model, x, tmp_path, "before")
    assert SplitFusedProjectionsPass()(model).modified
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") == 3 and "Split" not in ops and "Slice" not in ops
    assert sorted(v.const_value.shape[1] for v in model.graph.initializers.values() if v.name.startswith("w")) == [
        3,
        3,
        6,
    ]
    after = run(model, x, tmp_path, "after")
    reference = x.astype(np.float64) @ w + (b if bias else 0)
    for got, expected, (lo, hi) in zip(after, before, [(0, 6), (6, 9), (9, 12)], strict=True):
        np.testing.assert_array_equal(got, expected)
        if cut == "split" or lo != 6:
            np.testing.assert_allclose(got, reference[..., lo:hi], rtol=1e-5, atol=1e-5)


def test_a_projection_read_whole_is_left_alone(tmp_path) -> None:
    model, _, _ = fused_graph("split", bias=False)
    fused_out = model.graph.node("fused").outputs[0]
    extra = ir.Node("", "Identity", [fused_out])
    model.graph.append(extra)
    extra.outputs[0].name = "whole"
    model.graph.outputs.append(extra.outputs[0])
    assert not SplitFusedProjectionsPass()(model).modified
