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
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rotgraph import io, kernels
from rotgraph.constants import ROTGRAPH_DOMAIN
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
    with pytest.raises(RotgraphError, match="ROTGRAPH_KERNELS=0"):
        kernels.register(ort.SessionOptions(), path, True)
    monkeypatch.setenv("ROTGRAPH_KERNELS", "1")
    monkeypatch.setenv("ROTGRAPH_KERNELS_LIBRARY", str(tmp_path / "nowhere.so"))
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


def fake_quant_file(tmp_path: Path, spec: ActSpec, shape: list[int], dtype: ir.DataType = ir.DataType.FLOAT) -> Path:
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(dtype))
    model = graph_model([x])
    model.graph.outputs.append(insert_fake_quant(model, x, spec).outputs[0])
    path = tmp_path / f"fq_{spec.overload}_{dtype.name}.onnx"
    io.save_model(model, path)
    return path


def copy_library(tmp_path: Path, record: dict | None, content: bytes | None = None) -> Path:
    """A copy of the built library (or of `content`) in tmp_path, with `record` as its build record."""
    library = kernels.library_path()
    assert library is not None
    copy = tmp_path / "lib" / "librotgraph_ops.so"
    copy.parent.mkdir(exist_ok=True)
    copy.write_bytes(library.read_bytes() if content is None else content)
    if record is not None:
        kernels.build_record(copy).write_text(json.dumps(record))
    return copy


def test_the_library_is_the_package_copy_or_the_source_tree_build_with_its_build_record() -> None:
    # An installed package (setup.py's build) holds its own; a source tree, and so an editable install,
    # uses build/kernels/ (tests/test_install.py checks an installed wheel).
    library = kernels.library_path()
    expected = kernels.BUILD_LIBRARY if kernels.IN_SOURCE_TREE else kernels.PACKAGE_LIBRARY
    assert library is not None and library == expected
    if kernels.IN_SOURCE_TREE:
        assert not list(Path(kernels.__file__).parent.glob("*.so"))
    record = json.loads(kernels.build_record(library).read_text())
    assert record["machine"] == platform.machine()
    assert "-ffp-contract=off" in record["cxxflags"].split()
    if os.environ.get("ROTGRAPH_KERNEL_NATIVE") != "1" and platform.machine() == "x86_64":
        assert "-march=x86-64-v2" in record["cxxflags"].split()
        assert "avx2" not in record["cpu_flags"] and "sse4_2" in record["cpu_flags"]


def test_the_package_copy_comes_first_then_the_source_tree_then_the_environment_overrides_both(
    tmp_path, monkeypatch
) -> None:
    package, build = tmp_path / "pkg" / "librotgraph_ops.so", tmp_path / "build" / "librotgraph_ops.so"
    monkeypatch.setattr(kernels, "PACKAGE_LIBRARY", package)
    monkeypatch.setattr(kernels, "BUILD_LIBRARY", build)
    monkeypatch.setattr(kernels, "IN_SOURCE_TREE", True)
    monkeypatch.delenv("ROTGRAPH_KERNELS_LIBRARY", raising=False)
    assert kernels.library_path() is None and kernels.configured_library() == build
    for library in (build, package):
        library.parent.mkdir()
        library.write_bytes(b"")
        assert kernels.library_path() == library  # the package's, once it has one
    monkeypatch.setenv("ROTGRAPH_KERNELS_LIBRARY", str(tmp_path / "other.so"))
    assert kernels.library_path() is None and kernels.configured_library() == tmp_path / "other.so"
    monkeypatch.delenv("ROTGRAPH_KERNELS_LIBRARY")
    monkeypatch.setattr(kernels, "IN_SOURCE_TREE", False)  # an installed package never looks beside it
    package.unlink()
    assert kernels.library_path() is None and kernels.configured_library() == package


def test_an_install_that_could_not_build_the_library_says_why_once(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(kernels, "PACKAGE_LIBRARY", tmp_path / "librotgraph_ops.so")
    monkeypatch.setattr(kernels, "NOT_BUILT", tmp_path / "NOT_BUILT")
    monkeypatch.setattr(kernels, "IN_SOURCE_TREE", False)
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("ROTGRAPH_KERNELS_LIBRARY", raising=False)
    (tmp_path / "NOT_BUILT").write_text("build_kernels.sh: no working C++ compiler (CXX=/bin/false)\n")
    path = fake_quant_file(tmp_path, ActSpec(4), [4, 32])
    plain = graph_model([float_input("x", [4, 32])])  # no rotgraph ops: nothing is lost, nothing said
    plain.graph.outputs.append(plain.graph.inputs[0])
    io.save_model(plain, tmp_path / "plain.onnx")
    with caplog.at_level(logging.WARNING, logger="rotgraph.kernels"):
        assert not kernels.register(ort.SessionOptions(), tmp_path / "plain.onnx", None)
        assert not kernels.register(ort.SessionOptions(), path, None)
        assert not kernels.register(ort.SessionOptions(), path, None)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "not built when rotgraph was installed" in warning and "CXX=/bin/false" in warning
    with pytest.raises(RotgraphError, match="no working C"):
        kernels.register(ort.SessionOptions(), path, True)


def test_a_library_built_for_another_cpu_is_not_loaded(tmp_path, monkeypatch, caplog) -> None:
    path = fake_quant_file(tmp_path, ActSpec(4), [4, 32])
    # Not even an ELF file: were it loaded, onnxruntime would fail. The record asks for a CPU flag that no
    # CPU has, so rotgraph must refuse before loading it.
    library = copy_library(
        tmp_path, {"machine": platform.machine(), "cpu_flags": ["sse2", "rotgraph_test_flag"]}, b"not a library"
    )
    monkeypatch.setenv("ROTGRAPH_KERNELS_LIBRARY", str(library))
    monkeypatch.setattr(kernels, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="rotgraph.kernels"):
        assert not kernels.register(ort.SessionOptions(), path, None)
        assert not kernels.register(ort.SessionOptions(), path, None)
        session = make_session(path, "disable")  # runs on the function bodies
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rotgraph_test_flag" in warnings[0].getMessage()
    data = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": data})[0], ActSpec(4).reference(data, np.float32))
    with pytest.raises(RotgraphError, match="rotgraph_test_flag"):
        kernels.register(ort.SessionOptions(), path, True)

    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    kernels.build_record(library).write_text(json.dumps({"machine": other, "cpu_flags": []}))
    with pytest.raises(RotgraphError, match=f"built for {other}"):
        kernels.register(ort.SessionOptions(), path, True)
    kernels.build_record(library).unlink()
    with pytest.raises(RotgraphError, match="no readable build record"):
        kernels.register(ort.SessionOptions(), path, True)


def test_a_library_named_by_the_environment_is_used(tmp_path, monkeypatch) -> None:
    built = kernels.library_path()
    assert built is not None
    record = json.loads(kernels.build_record(built).read_text())
    monkeypatch.setenv("ROTGRAPH_KERNELS_LIBRARY", str(copy_library(tmp_path, record)))
    path = fake_quant_file(tmp_path, ActSpec(4), [4, 32])
    data = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    (out,), ops = run(path, {"x": data}, True, tmp_path)
    assert "FakeQuant" in ops
    np.testing.assert_array_equal(out, ActSpec(4).reference(data, np.float32))


def test_float16_models_run_on_the_function_bodies(tmp_path) -> None:
    path = fake_quant_file(tmp_path, ActSpec(8), [4, 32], ir.DataType.FLOAT16)
    assert not kernels.register(ort.SessionOptions(), path, None)
    with pytest.raises(RotgraphError, match="other values than float32"):
        kernels.register(ort.SessionOptions(), path, True)
    data = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float16)
    out = make_session(path, "disable").run(None, {"x": data})[0]  # kernels=None: the bodies, no load error
    np.testing.assert_allclose(out, ActSpec(8).reference(data), rtol=0, atol=2e-2)


def tampered(path: Path, out: Path, **attributes: int | list[int]) -> Path:
    """The model at `path` with its rotgraph node's attributes replaced (the function body unchanged)."""
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.domain == ROTGRAPH_DOMAIN)
    for name, value in attributes.items():
        for a in [a for a in node.attribute if a.name == name]:
            node.attribute.remove(a)
        node.attribute.append(onnx.helper.make_attribute(name, value))
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"bits": 40}, "bits 40 outside"),
        ({"bits": 1}, "bits 1 outside"),
        ({"group": -4}, "group -4 is negative"),
        ({"group": 24}, "group 24 does not divide the last axis 32"),
    ],
)
def test_fake_quant_kernel_rejects_bad_attributes(tmp_path, attributes, message) -> None:
    path = tampered(fake_quant_file(tmp_path, ActSpec(4), [4, 32]), tmp_path / "bad.onnx", **attributes)
    with pytest.raises(Exception, match=message):
        run(path, {"x": np.ones((4, 32), np.float32)}, True)


def test_hadamard_and_cache_kernels_reject_bad_attributes(tmp_path) -> None:
    model = graph_model([float_input("x", [2, 24])])
    model.graph.outputs.append(insert_hadamard(model, model.graph.inputs[0], hadamard_factors(24)).outputs[0])  # type: ignore[arg-type]
    io.save_model(model, tmp_path / "h.onnx")
    x = {"x": np.ones((2, 24), np.float32)}
    with pytest.raises(Exception, match="not m x m"):
        run(tampered(tmp_path / "h.onnx", tmp_path / "h_short.onnx", a=[1] * 143), x, True)
    with pytest.raises(Exception, match="other than"):
        run(tampered(tmp_path / "h.onnx", tmp_path / "h_two.onnx", a=[2] * 144), x, True)

    spec = CacheSpec(4, 16, 0, 1.0)
    cache = graph_model([float_input("x", [1, 1, 3, 16])])
    add_functions(cache, spec)
    quantize = quantize_node(spec, cache.graph.inputs[0])
    cache.graph.append(quantize)
    cache.graph.outputs.extend(quantize.outputs)
    io.save_model(cache, tmp_path / "kv.onnx")
    feeds = {"x": np.ones((1, 1, 3, 16), np.float32)}
    for attributes, message in (
        ({"bits": 3}, "bits must be 4 or 8"),
        ({"group": 5}, "group 5 does not divide head_dim 16"),
        ({"head_dim": 0}, "head_dim must be positive"),
        ({"head_dim": 12}, "last axis is not head_dim"),
    ):
        with pytest.raises(Exception, match=message):
            run(tampered(tmp_path / "kv.onnx", tmp_path / "kv_bad.onnx", **attributes), feeds, True)


# Above the row split's threshold (rotgraph_ops.cc `for_rows`: rows * work per row >= 2 * 2^16), so that
# onnxruntime's intra-op threads each take a batch of rows.
@pytest.mark.parametrize("threads", [2, 4])
def test_kernels_split_over_threads_give_the_single_thread_results(tmp_path, threads: int) -> None:
    rng = np.random.default_rng(threads)
    factors = hadamard_factors(1536)
    assert factors is not None and factors.m > 1
    x = float_input("x", [64, 1536])
    model = graph_model([x])
    model.graph.outputs.append(insert_hadamard(model, x, factors).outputs[0])
    io.save_model(model, tmp_path / "h.onnx")
    data = rng.standard_normal((64, 1536)).astype(np.float32)
    (split,) = make_session(tmp_path / "h.onnx", "disable", threads=threads, kernels=True).run(None, {"x": data})
    (single,) = make_session(tmp_path / "h.onnx", "disable", threads=1, kernels=True).run(None, {"x": data})
    np.testing.assert_array_equal(split, single)
    reference = data.astype(np.float64) @ factors.matrix()
    np.testing.assert_allclose(split, reference, rtol=0, atol=HADAMARD_RTOL * np.abs(reference).max())

    for spec in (ActSpec(4, True, 0, 0.9), ActSpec(4, False, 32, 1.0)):
        path = fake_quant_file(tmp_path, spec, [1024, 256])
        data = (rng.standard_normal((1024, 256)) * 3).astype(np.float32)
        data[::97, 5] = np.nan  # a NaN group now and then: the split must not move it
        (split,) = make_session(path, "disable", threads=threads, kernels=True).run(None, {"x": data})
        (body,) = make_session(path, "disable", threads=threads, kernels=False).run(None, {"x": data})
        np.testing.assert_array_equal(split, body)
        np.testing.assert_array_equal(split, spec.reference(data, np.float32))

    cache = CacheSpec(4, 64, 16, 1.0)
    kv = graph_model([float_input("x", [1, 8, 256, 64])])
    add_functions(kv, cache)
    quantize = quantize_node(cache, kv.graph.inputs[0])
    dequantize = dequantize_node(cache, *quantize.outputs)
    kv.graph.extend([quantize, dequantize])
    kv.graph.outputs.extend([*quantize.outputs, dequantize.outputs[0]])
    io.save_model(kv, tmp_path / "kv.onnx")
    data = rng.standard_normal((1, 8, 256, 64)).astype(np.float32)
    split_outputs = make_session(tmp_path / "kv.onnx", "disable", threads=threads, kernels=True).run(None, {"x": data})
    body_outputs = make_session(tmp_path / "kv.onnx", "disable", threads=threads, kernels=False).run(None, {"x": data})
    codes, scale, zero = cache.quantize(data)
    for got, body, want in zip(
        split_outputs, body_outputs, [codes, scale, zero, cache.dequantize(codes, scale, zero)], strict=True
    ):
        np.testing.assert_array_equal(got, body)
        np.testing.assert_array_equal(got, want)


def test_the_baseline_and_avx2_builds_of_the_hadamard_transform_agree(tmp_path) -> None:
    """The library carries the transform twice (baseline and AVX2, chosen by CPUID); a process told to keep
    to the baseline (ROTGRAPH_KERNEL_BASELINE=1) must give the same bits."""
    paths = []
    for n in (1536, 4096, 32, 40):
        factors = hadamard_factors(n)
        assert factors is not None
        x = float_input("x", [33, n])
        model = graph_model([x])
        model.graph.outputs.append(insert_hadamard(model, x, factors).outputs[0])
        io.save_model(model, tmp_path / f"h{n}.onnx")
        paths.append(tmp_path / f"h{n}.onnx")
    script = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from rotgraph.evaluate import make_session\n"
        "for p in sys.argv[2:]:\n"
        "    s = make_session(Path(p), 'disable', threads=1, kernels=True)\n"
        "    n = s.get_inputs()[0].shape[1]\n"
        "    x = np.random.default_rng(n).standard_normal((33, n)).astype(np.float32)\n"
        "    np.save(Path(sys.argv[1]) / (Path(p).stem + '.npy'), s.run(None, {'x': x})[0])\n"
    )
    outputs = {}
    for baseline in ("0", "1"):
        folder = tmp_path / f"out{baseline}"
        folder.mkdir()
        env = {**os.environ, "ROTGRAPH_KERNEL_BASELINE": baseline}
        subprocess.run([sys.executable, "-c", script, str(folder), *map(str, paths)], check=True, env=env)
        outputs[baseline] = {p.stem: np.load(folder / f"{p.stem}.npy") for p in paths}
    for p in paths:
        np.testing.assert_array_equal(outputs["0"][p.stem], outputs["1"][p.stem], err_msg=p.stem)
