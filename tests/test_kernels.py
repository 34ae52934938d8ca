"""rotgraph's compiled onnxruntime kernels against numpy references and against the ONNX function bodies.

The library is built by scripts/setup.sh (scripts/build_kernels.sh); these tests fail, not skip, when it
is missing. Each op is checked three ways: the kernel really runs (onnxruntime's profile names the op
itself, where the function path shows the inlined standard ops), its output equals an independent numpy
computation, and it equals the function body's output (exactly for the quantizers, to float rounding
for the Hadamard transform). A whole quantized decoder with a 4-bit KV cache gives the same tokens both
ways.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rotgraph import io, kernels
from rotgraph.errors import RotgraphError
from rotgraph.evaluate import make_session, run_logits
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.generate import generate
from rotgraph.hadamard import hadamard_factors
from rotgraph.kvcache import CacheSpec, add_functions, dequantize_node, quantize_node
from rotgraph.online import insert_hadamard
from rotgraph.quantize import QuantOptions, quantize_model

# Hadamard kernel vs function body: both are float32 sums of the same terms in different orders.
HADAMARD_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def library() -> Path:
    path = kernels.library_path()
    assert path is not None, f"rotgraph's kernels are not built: {kernels.BUILD_HINT}"
    return path


def graph_model(inputs: list[ir.Value]) -> ir.Model:
    return ir.Model(ir.Graph(inputs, [], nodes=[], opset_imports={"": 23}, name="g"), ir_version=10)


def float_input(name: str, shape: list[int]) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))


def run(path: Path, feeds: dict[str, np.ndarray], use_kernels: bool, profile_dir: Path | None = None):  # type: ignore[no-untyped-def]
    """Outputs of one run, and the op types onnxruntime executed (from its profile) when profiling."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert kernels.register(options, path, use_kernels) == use_kernels
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_dir / f"profile_{int(use_kernels)}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    ops: set[str] = set()
    if profile_dir is not None:
        events = json.loads(Path(session.end_profiling()).read_text())
        ops = {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}
    return outputs, ops


@pytest.mark.parametrize("n", [16, 32, 64, 1536, 576, 40, 12])
def test_hadamard_kernel_matches_numpy_and_the_function(tmp_path, n: int) -> None:
    factors = hadamard_factors(n)
    assert factors is not None
    x = float_input("x", [2, 5, n])
    model = graph_model([x])
    model.graph.outputs.append(insert_hadamard(model, x, factors).outputs[0])
    path = tmp_path / "h.onnx"
    io.save_model(model, path)
    data = np.random.default_rng(n).standard_normal((2, 5, n)).astype(np.float32)
    (with_kernel,), ops = run(path, {"x": data}, True, tmp_path)
    (with_function,), function_ops = run(path, {"x": data}, False, tmp_path)
    assert "Hadamard" in ops and "MatMul" not in ops
    assert "Hadamard" not in function_ops and "MatMul" in function_ops
    reference = data.astype(np.float64) @ factors.matrix()  # the dense orthonormal matrix, float64
    np.testing.assert_allclose(with_kernel, reference, rtol=0, atol=HADAMARD_RTOL * np.abs(reference).max())
    np.testing.assert_allclose(with_kernel, with_function, rtol=0, atol=HADAMARD_RTOL * np.abs(reference).max())


@pytest.mark.parametrize(
    "spec", [ActSpec(4, True, 0, 0.9), ActSpec(8, True, 0, 1.0), ActSpec(4, False, 32, 0.95), ActSpec(3, False, 0, 1.0)]
)
def test_fake_quant_kernel_equals_the_function_and_numpy(tmp_path, spec: ActSpec) -> None:
    x = float_input("x", [3, 7, 96])
    model = graph_model([x])
    model.graph.outputs.append(insert_fake_quant(model, x, spec).outputs[0])
    path = tmp_path / "fq.onnx"
    io.save_model(model, path)
    data = (np.random.default_rng(spec.bits).standard_normal((3, 7, 96)) * 4).astype(np.float32)
    data[0, 0, 5] = 60.0  # an outlier, so the clip and the scale matter
    (with_kernel,), ops = run(path, {"x": data}, True, tmp_path)
    (with_function,), _ = run(path, {"x": data}, False)
    assert "FakeQuant" in ops
    np.testing.assert_array_equal(with_kernel, with_function)
    step = np.abs(data).max() / spec.qmax
    np.testing.assert_allclose(with_kernel, spec.reference(data), rtol=0, atol=1e-5 * step)


@pytest.mark.parametrize("spec", [CacheSpec(4, 16, 0, 1.0), CacheSpec(8, 16, 0, 1.0), CacheSpec(4, 64, 16, 0.9)])
def test_kv_cache_kernels_store_the_reference_codes(tmp_path, spec: CacheSpec) -> None:
    x = float_input("x", [2, 3, 9, spec.head_dim])
    model = graph_model([x])
    add_functions(model, spec)
    quantize = quantize_node(spec, x)
    dequantize = dequantize_node(spec, *quantize.outputs)
    model.graph.extend([quantize, dequantize])
    model.graph.outputs.extend([*quantize.outputs, dequantize.outputs[0]])
    path = tmp_path / "kv.onnx"
    io.save_model(model, path)
    data = np.random.default_rng(spec.head_dim).standard_normal((2, 3, 9, spec.head_dim)).astype(np.float32)
    with_kernel, ops = run(path, {"x": data}, True, tmp_path)
    with_function, _ = run(path, {"x": data}, False)
    assert {"KVQuantize", "KVDequantize"} <= ops
    codes, scale, zero = spec.quantize(data)  # numpy reference
    for got, want in zip(with_kernel[:3], (codes, scale, zero), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(with_kernel[3], spec.dequantize(codes, scale, zero))
    for a, b in zip(with_kernel, with_function, strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantized_decoder_gives_the_same_tokens_with_and_without_kernels(tiny, tokens, tmp_path) -> None:
    _, past = tiny("llama", with_past=True)
    model = io.load_model(past)
    quantize_model(model, QuantOptions(scheme="w4a4kv4", group=16))
    shutil.copytree(past.parent, tmp_path / "q")  # the tokenizer beside the model
    path = tmp_path / "q" / "quantized.onnx"
    io.save_model(model, path)
    with_kernels = run_logits(make_session(path, "disable", kernels=True), tokens)
    without = run_logits(make_session(path, "disable", kernels=False), tokens)
    # Activations are re-quantized after each Hadamard; a float-rounding difference can flip a 4-bit code,
    # so compare the logits to their scale rather than exactly.
    assert np.abs(with_kernels - without).max() <= 0.05 * np.abs(without).max()
    runs = [generate(path, "The quick brown fox", 10, kernels=k) for k in (True, False)]
    assert runs[0].new_tokens == runs[1].new_tokens


def test_register_uses_the_library_only_when_it_can(tmp_path, monkeypatch) -> None:
    x = float_input("x", [4, 32])
    model = graph_model([x])
    model.graph.outputs.append(insert_fake_quant(model, x, ActSpec(4)).outputs[0])
    path = tmp_path / "fq.onnx"
    io.save_model(model, path)
    assert kernels.register(ort.SessionOptions(), path, None)
    assert not kernels.register(ort.SessionOptions(), path, False)

    old = onnx.load(str(path))  # as an older rotgraph wrote it: no attributes on the node
    del old.graph.node[0].attribute[:]
    old_path = tmp_path / "old.onnx"
    onnx.save(old, str(old_path))
    assert kernels.missing_attributes(old_path) == [old.graph.node[0].name or "FakeQuant"]
    assert not kernels.register(ort.SessionOptions(), old_path, None)
    with pytest.raises(RotgraphError, match="lack the attributes"):
        kernels.register(ort.SessionOptions(), old_path, True)
    data = np.ones((4, 32), np.float32)
    np.testing.assert_allclose(make_session(old_path, "disable").run(None, {"x": data})[0], data, rtol=1e-6)

    hadamard = graph_model([float_input("x", [4, 24])])  # 24 = 12 * 2: the kernel needs the matrix
    hadamard.graph.outputs.append(insert_hadamard(hadamard, hadamard.graph.inputs[0], hadamard_factors(24)).outputs[0])  # type: ignore[arg-type]
    io.save_model(hadamard, tmp_path / "h.onnx")
    stripped = onnx.load(str(tmp_path / "h.onnx"))
    assert not kernels.missing_attributes(tmp_path / "h.onnx")
    del stripped.graph.node[0].attribute[:]
    onnx.save(stripped, str(tmp_path / "h_old.onnx"))
    assert len(kernels.missing_attributes(tmp_path / "h_old.onnx")) == 1

    monkeypatch.setenv("ROTGRAPH_KERNELS", "0")
    assert not kernels.register(ort.SessionOptions(), path, None)
    with pytest.raises(RotgraphError, match="not built"):
        kernels.register(ort.SessionOptions(), path, True)


def test_hadamard_kernel_rejects_a_size_it_was_not_built_for(tmp_path) -> None:
    factors = hadamard_factors(24)  # m = 12, p = 2
    assert factors is not None and factors.m == 12
    x = float_input("x", [1, "n"])  # type: ignore[list-item]
    model = graph_model([x])
    model.graph.outputs.append(insert_hadamard(model, x, factors).outputs[0])
    path = tmp_path / "h.onnx"
    io.save_model(model, path)
    with pytest.raises(Exception, match="not a multiple of m"):
        run(path, {"x": np.ones((1, 30), np.float32)}, True)
