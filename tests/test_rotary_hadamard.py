"""RotaryHadamardPass and rotgraph's RotaryHadamard op (RoPE, then the R3 Hadamard per head, in one op): the
fused op with the compiled kernel and with its ONNX function body against the four nodes it replaces
(onnxruntime, optimizations disabled) and against a float64 numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from test_kernels import HADAMARD_RTOL, float_input, run

from rotgraph import io
from rotgraph.constants import MS_DOMAIN
from rotgraph.hadamard import hadamard_factors
from rotgraph.online import insert_hadamard
from rotgraph.passes.ort.rotary_hadamard import RotaryHadamardPass, rotary_hadamard
from rotgraph.pipeline import run_passes

BATCH, SEQ, MAX_POSITION = 2, 3, 16


def unfused(head_dim: int, heads: int, rng: np.random.Generator) -> ir.Model:
    """x [batch, seq, heads * head_dim] -> RotaryEmbedding -> Reshape -> Hadamard -> Reshape, as
    RotaryEmbeddingPass writes it; cos/sin caches of random angles."""
    x = float_input("x", [BATCH, SEQ, heads * head_dim])
    positions = ir.Value(name="positions", shape=ir.Shape([BATCH, SEQ]), type=ir.TensorType(ir.DataType.INT64))
    graph = ir.Graph([x, positions], [], nodes=[], opset_imports={"": 23, MS_DOMAIN: 1}, name="g")
    model = ir.Model(graph, ir_version=10)
    angles = rng.uniform(0, 2 * np.pi, (MAX_POSITION, head_dim // 2))
    tables = []
    for name, array in (("cos", np.cos(angles)), ("sin", np.sin(angles)), ("heads", [0, 0, heads, head_dim])):
        dtype = np.float32 if name != "heads" else np.int64
        value = ir.Value(name=name, const_value=ir.Tensor(np.asarray(array, dtype), name=name))
        graph.register_initializer(value)
        tables.append(value)
    flat = ir.Value(name="flat", const_value=ir.Tensor(np.array([0, 0, heads * head_dim], np.int64), name="flat"))
    graph.register_initializer(flat)
    rotary = ir.Node(MS_DOMAIN, "RotaryEmbedding", [x, positions, *tables[:2]], [ir.AttrInt64("interleaved", 0)])
    split = ir.Node("", "Reshape", [rotary.outputs[0], tables[2]])
    graph.extend([rotary, split])
    factors = hadamard_factors(head_dim)
    assert factors is not None
    hadamard = insert_hadamard(model, split.outputs[0], factors)
    back = ir.Node("", "Reshape", [hadamard.outputs[0], flat])
    graph.append(back)
    back.outputs[0].name = "y"
    graph.outputs.append(back.outputs[0])
    return model


def reference(x: np.ndarray, positions: np.ndarray, model: ir.Model, head_dim: int) -> np.ndarray:
    """RoPE (halves not interleaved) and the orthonormal Hadamard matrix per head, in float64."""
    cos, sin = (model.graph.initializers[n].const_value.numpy().astype(np.float64) for n in ("cos", "sin"))  # type: ignore[union-attr]
    heads = x.reshape(BATCH, SEQ, -1, head_dim).astype(np.float64)
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    x1, x2 = heads[..., : head_dim // 2], heads[..., head_dim // 2 :]
    rotated = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    factors = hadamard_factors(head_dim)
    assert factors is not None
    return (rotated @ factors.matrix()).reshape(x.shape)


@pytest.mark.parametrize(("head_dim", "heads"), [(64, 3), (16, 2), (40, 2)])
def test_the_fused_op_computes_rope_then_the_hadamard(tmp_path: Path, head_dim: int, heads: int) -> None:
    rng = np.random.default_rng(head_dim)
    model = unfused(head_dim, heads, rng)
    before = tmp_path / "unfused.onnx"
    io.save_model(model, before)
    run_passes(model, [RotaryHadamardPass()])
    assert [n.op_type for n in model.graph] == ["RotaryHadamard"]
    after = tmp_path / "fused.onnx"
    io.save_model(model, after)
    feeds = {
        "x": rng.standard_normal((BATCH, SEQ, heads * head_dim)).astype(np.float32),
        "positions": rng.integers(0, MAX_POSITION, (BATCH, SEQ)),
    }
    (expected,), _ = run(before, feeds, False)
    (with_kernel,), ops = run(after, feeds, True, tmp_path)
    (with_body,), body_ops = run(after, feeds, False, tmp_path)
    assert "RotaryHadamard" in ops and "RotaryEmbedding" not in ops
    assert "RotaryHadamard" not in body_ops and "RotaryEmbedding" in body_ops
    exact = reference(feeds["x"], feeds["positions"], model, head_dim)
    atol = HADAMARD_RTOL * np.abs(exact).max()
    for got in (expected, with_kernel, with_body):
        np.testing.assert_allclose(got, exact, rtol=0, atol=atol)
    np.testing.assert_array_equal(with_body, expected)  # the body is the unfused graph
    np.testing.assert_allclose(with_kernel, expected, rtol=0, atol=atol)


def test_a_chain_with_another_reader_is_left_alone() -> None:
    model = unfused(16, 2, np.random.default_rng(0))
    rotary = next(n for n in model.graph if n.op_type == "RotaryEmbedding")
    model.graph.outputs.append(rotary.outputs[0])  # RoPE's output is also read elsewhere
    assert not RotaryHadamardPass()(model).modified
    assert [n.op_type for n in model.graph] == ["RotaryEmbedding", "Reshape", "Hadamard", "Reshape"]


@pytest.mark.parametrize("head_dim", [64, 40])
def test_the_packed_form_rotates_q_and_k_heads_and_passes_v(tmp_path: Path, head_dim: int) -> None:
    """rotated_heads (PackRotaryQKVPass's packed QKV): the first heads of each token as the op on them
    alone, the others copied; kernel, function body and numpy."""
    rng = np.random.default_rng(head_dim + 1)
    rotated, heads = 4, 5
    model = unfused(head_dim, rotated, rng)  # for its caches
    x = float_input("qkv", [BATCH, SEQ, heads * head_dim])
    graph = model.graph
    factors = hadamard_factors(head_dim)
    assert factors is not None
    node = rotary_hadamard(
        model, [x, graph.inputs[1], *(graph.initializers[n] for n in ("cos", "sin"))], factors, (rotated, heads)
    )
    graph.remove(list(graph), safe=False)
    graph.inputs[0] = x
    graph.outputs[0] = node.outputs[0]
    graph.append(node)
    path = tmp_path / "packed.onnx"
    io.save_model(model, path)
    feeds = {
        "qkv": rng.standard_normal((BATCH, SEQ, heads * head_dim)).astype(np.float32),
        "positions": rng.integers(0, MAX_POSITION, (BATCH, SEQ)),
    }
    (with_kernel,), ops = run(path, feeds, True, tmp_path)
    (with_body,), body_ops = run(path, feeds, False, tmp_path)
    assert "RotaryHadamard" in ops and "RotaryHadamard" not in body_ops
    split = rotated * head_dim
    exact = np.concatenate(
        [reference(feeds["qkv"][..., :split], feeds["positions"], model, head_dim), feeds["qkv"][..., split:]], axis=-1
    )
    atol = HADAMARD_RTOL * np.abs(exact).max()
    for got in (with_kernel, with_body):
        np.testing.assert_allclose(got, exact, rtol=0, atol=atol)
    np.testing.assert_array_equal(with_kernel[..., split:], feeds["qkv"][..., split:])
