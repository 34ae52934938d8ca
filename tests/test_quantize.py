"""Quantization passes: the ONNX ops compute what the numpy quantizers compute, on real graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ort_logits

from rotgraph import io
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.pipeline import canonicalize
from rotgraph.quant import WeightSpec, quantize_rtn
from rotgraph.quantize import QuantOptions, Scheme, quantize_model
from rotgraph.structure import discover
from rotgraph.weights import read_float64


def run_single(tmp_path: Path, spec: ActSpec, widths: list[int], data: list[np.ndarray]) -> list[np.ndarray]:
    """A graph with one FakeQuant per input, all sharing one overload."""
    inputs = [
        ir.Value(name=f"x{i}", shape=ir.Shape(["b", w]), type=ir.TensorType(ir.DataType.FLOAT))
        for i, w in enumerate(widths)
    ]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 23}, name="g")
    model = ir.Model(graph, ir_version=10)
    for i, x in enumerate(inputs):
        node = insert_fake_quant(model, x, spec)
        node.outputs[0].name = f"y{i}"
        graph.outputs.append(node.outputs[0])
    path = tmp_path / "fq.onnx"
    io.save_model(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {f"x{i}": d for i, d in enumerate(data)})


@pytest.mark.parametrize(
    "spec",
    [ActSpec(8), ActSpec(4, clip=0.9), ActSpec(4, symmetric=False, clip=0.95), ActSpec(4, symmetric=False, group=16)],
    ids=lambda s: s.overload,
)
def test_fake_quant_op_matches_numpy_for_every_width(tmp_path, spec: ActSpec) -> None:
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((5, 48)).astype(np.float32), (3 * rng.standard_normal((5, 96))).astype(np.float32)]
    for got, x in zip(run_single(tmp_path, spec, [48, 96], data), data, strict=True):
        np.testing.assert_allclose(got, spec.reference(x), rtol=1e-5, atol=1e-6)
        assert len(np.unique(got[0])) <= 2**spec.bits * (x.shape[1] // (spec.group or x.shape[1]))


def test_scheme_parsing() -> None:
    assert Scheme.parse("w4a4kv4") == Scheme(4, 4, 4)
    assert Scheme.parse("w4a16") == Scheme(4, 16, None)
    with pytest.raises(Exception, match="expected w"):
        Scheme.parse("w3a4")


@pytest.mark.parametrize("group,symmetric", [(16, True), (0, True), (16, False)])
def test_weights_dequantize_to_the_rtn_result(tiny, tokens, tmp_path, group: int, symmetric: bool) -> None:
    _, path = tiny("llama", "dynamo")
    reference = io.load_model(path)
    canonicalize(reference)
    expected = {}
    for block in discover(reference).blocks:
        w = read_float64(block.mlp.down.weight)
        expected[block.index] = quantize_rtn(w.T, WeightSpec(4, symmetric, group or None)).dequantize().T
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w4a16", rotation="none", group=group, symmetric_weights=symmetric))
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    # Evaluate each down_proj's DequantizeLinear output with onnxruntime and compare to numpy.
    desc = discover(model)
    for block in desc.blocks:
        model.graph.outputs.append(block.mlp.down.weight)
    probe = tmp_path / "probe.onnx"
    io.save_model(model, probe)
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    names = [b.mlp.down.weight.name for b in desc.blocks]
    for block, got in zip(desc.blocks, session.run(names, {"input_ids": tokens}), strict=True):
        np.testing.assert_allclose(got, expected[block.index], rtol=1e-6, atol=1e-7)
    assert np.isfinite(ort_logits(out, tokens)).all()


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8kv8", "w4a4kv4"])
@pytest.mark.parametrize("rotation", ["none", "quarot"])
def test_schemes_build_and_stay_close_at_8_bits(tiny, tokens, tmp_path, scheme: str, rotation: str) -> None:
    _, path = tiny("qwen2", "torchscript")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme=scheme, rotation=rotation, group=16))
    counts = {op: sum(n.op_type == op for n in model.graph) for op in ("DequantizeLinear", "FakeQuant")}
    kv = 4 if "kv" in scheme else 0
    assert counts == {"DequantizeLinear": 14 + 2, "FakeQuant": 8 + kv}  # 7 projections x 2 blocks, embedding, lm_head
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    logits, reference = ort_logits(out, tokens), ort_logits(path, tokens)
    assert np.isfinite(logits).all()
    if scheme == "w8a8":  # 8 bits everywhere: a small perturbation of the float model
        assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4kv4"])
def test_gptq_pipeline_runs_on_calibration_tokens(tiny, tokens, tmp_path, scheme: str) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    calibration = np.random.default_rng(5).integers(0, 384, size=(4, 64))
    quantize_model(model, QuantOptions(scheme=scheme, rotation="quarot", weights="gptq", group=16), calibration)
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    assert np.isfinite(ort_logits(out, tokens)).all()


def test_quantizing_twice_is_refused(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w4a16", rotation="none", group=16))
    with pytest.raises(Exception, match="already"):
        quantize_model(model, QuantOptions(scheme="w4a16", rotation="none", group=16))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("scheme", "head_bits"), [("w4a16", 16), ("w4a16", 8), ("w8a16", 8)])
def test_ort_format_computes_what_the_qdq_format_computes(
    tiny, tokens, tmp_path, scheme: str, head_bits: int, symmetric: bool
) -> None:
    """MatMulNBits and GatherBlockQuantized with rotgraph's packed codes compute what DequantizeLinear +
    MatMul / Gather compute, to float rounding. 8-bit MatMulNBits are emitted with int8 activations
    (accuracy level 4, the only fast onnxruntime kernel for them); to check their codes, scales and
    zero points exactly the test sets every level to 0 (float compute) before running."""
    _, path = tiny("llama", "dynamo")
    outs = {}
    for fmt in ("qdq", "ort"):
        model = io.load_model(path)
        options = QuantOptions(scheme=scheme, group=16, symmetric_weights=symmetric, fmt=fmt, head_bits=head_bits)
        quantize_model(model, options)
        if fmt == "ort":
            ops = [n.op_type for n in model.graph]
            head = int(head_bits == 8)
            assert ops.count("MatMulNBits") == 14 + head and ops.count("GatherBlockQuantized") == head
            assert "DequantizeLinear" not in ops
            nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
            levels = {n.attributes.get_int("bits"): n.attributes.get_int("accuracy_level") for n in nbits}
            assert levels == ({4: 0} if scheme == "w4a16" else {}) | ({8: 4} if head or scheme == "w8a16" else {})
            for n in nbits:
                n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
        outs[fmt] = tmp_path / f"{fmt}.onnx"
        io.save_model(model, outs[fmt])
    np.testing.assert_allclose(ort_logits(outs["ort"], tokens), ort_logits(outs["qdq"], tokens), atol=1e-4)


def test_ort_format_w4a8_uses_int8_kernels(tiny, tokens, tmp_path) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w4a8", group=16, fmt="ort"))
    levels = {n.attributes.get_int("accuracy_level") for n in model.graph if n.op_type == "MatMulNBits"}
    assert levels == {4}
    assert not any(n.op_type == "FakeQuant" for n in model.graph)  # onnxruntime quantizes to int8 itself
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    assert np.isfinite(ort_logits(out, tokens)).all()


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_spilled_quantization_equals_the_in_memory_one(tiny, tokens, tmp_path, monkeypatch, fmt: str) -> None:
    """`quantize` writes quantized tensors to a scratch file as it goes; the saved model is the same."""
    from rotgraph.quantize import quantize
    from rotgraph.weights import SpillFile

    monkeypatch.setattr(SpillFile, "MIN_BYTES", 0)  # spill every tensor of the tiny model
    written: list[int] = []
    spill = SpillFile.spill
    monkeypatch.setattr(SpillFile, "spill", lambda self, graph: written.append(spill(self, graph)) or written[-1])
    _, path = tiny("llama", "dynamo")
    options = QuantOptions(scheme="w4a16", rotation="quarot", group=16, fmt=fmt)
    out = tmp_path / "out" / "spilled.onnx"
    quantize(path, out, options)
    assert sorted(f.name for f in out.parent.iterdir()) == ["spilled.onnx", "spilled.onnx.data", "tokenizer.json"]
    assert len(written) == 15 and all(n > 0 for n in written)  # after each of 14 projections, then the head
    model = io.load_model(path)
    quantize_model(model, options)
    memory = tmp_path / "memory.onnx"
    io.save_model(model, memory)
    spilled, held = io.load_model(out), io.load_model(memory)
    assert set(spilled.graph.initializers) == set(held.graph.initializers)
    for name, value in held.graph.initializers.items():
        assert spilled.graph.initializers[name].const_value.tobytes() == value.const_value.tobytes(), name
    np.testing.assert_array_equal(ort_logits(out, tokens), ort_logits(memory, tokens))


@pytest.mark.parametrize(("scheme", "per_layer"), [("w4a8", 1), ("w4a16", 1), ("w4a8kv4", 3), ("w4a4kv8", 3)])
def test_quantize_inserts_r3_only_for_a_quantized_kv_cache(tiny, scheme: str, per_layer: int) -> None:
    """R3 (Hadamard on Q and K) cancels exactly in Q K^T and only helps when the KV cache is quantized;
    R4 (before down_proj) is always there."""
    _, path = tiny("llama")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme, group=16))
    layers = len(canonicalize(io.load_model(path)).blocks)
    sizes = [n.overload for n in model.graph if n.op_type == "Hadamard"]
    assert len(sizes) == per_layer * layers
    head_dim = 16  # the tiny Llama's
    assert sizes.count(f"n{head_dim}") == (per_layer - 1) * layers
