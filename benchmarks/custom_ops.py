"""rotgraph's ONNX-function ops against its compiled kernels and onnxruntime-extensions Python custom ops.

    pip install -e '.[bench]'   # onnxruntime-extensions
    python benchmarks/custom_ops.py

Times one session run of a single op, at the sizes decoding and prefill use on the default model, in
three forms: the ONNX function body onnxruntime inlines (standard MatMul/Reshape/BitShift... kernels);
the same model with rotgraph's compiled kernels registered (rotgraph/kernels, built by
scripts/build_kernels.sh against the onnxruntime C API headers of Debian's libonnxruntime-dev); and an
onnxruntime-extensions PyOp (a Python function registered as an onnxruntime kernel) whose body is the
fastest numpy code (fast Walsh-Hadamard butterflies; one vectorized unpack and scale), the option
rejected. Prints a markdown table of microseconds per run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from rotgraph import io
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.hadamard import hadamard_factors
from rotgraph.kvcache import CacheSpec, add_functions, dequantize_node
from rotgraph.online import insert_hadamard

CONTRIB = "ai.onnx.contrib"


def fwht_numpy(x: np.ndarray, n: int) -> np.ndarray:
    f = hadamard_factors(n)
    assert f is not None
    y = x.reshape(-1, f.m, f.p).astype(np.float32, copy=True)
    h = 1
    while h < f.p:
        y = y.reshape(-1, f.m, f.p // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = np.stack([a + b, a - b], axis=3)
        h *= 2
    y = y.reshape(-1, f.m, f.p)
    if f.m > 1:
        y = np.einsum("ji,rjk->rik", f.a.astype(np.float32), y)
    return (y / np.float32(np.sqrt(n))).reshape(x.shape)


def register_pyops() -> str:
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(
        op_type="Hadamard",
        inputs=[PyCustomOpDef.dt_float],
        outputs=[PyCustomOpDef.dt_float],
        attrs={"n": PyCustomOpDef.dt_int64},
    )
    def hadamard(x: np.ndarray, **attrs: int) -> np.ndarray:
        return fwht_numpy(x, int(attrs["n"]))

    @onnx_op(
        op_type="KVDequantize4",
        inputs=[PyCustomOpDef.dt_uint8, PyCustomOpDef.dt_float, PyCustomOpDef.dt_uint8],
        outputs=[PyCustomOpDef.dt_float],
    )
    def kv_dequantize(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        q = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float32)
        return (q - zero.astype(np.float32)) * scale

    return str(get_library_path())


def hadamard_model(n: int, shape: list[int], pyop: bool) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    model = ir.Model(ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g"), ir_version=10)
    node = insert_hadamard(model, x, hadamard_factors(n))  # type: ignore[arg-type]
    if pyop:
        model.functions.clear()
        node.domain, node.overload = CONTRIB, ""
        node.attributes["n"] = ir.AttrInt64("n", n)
        model.opset_imports[CONTRIB] = 1
    model.graph.outputs.append(node.outputs[0])
    return model


def dequantize_model(spec: CacheSpec, pyop: bool) -> ir.Model:
    dims = {
        "codes": (ir.DataType.UINT8, spec.code_width),
        "scale": (ir.DataType.FLOAT, 1),
        "zero": (ir.DataType.UINT8, 1),
    }
    inputs = [ir.Value(name=k, shape=ir.Shape([1, 3, "t", w]), type=ir.TensorType(t)) for k, (t, w) in dims.items()]
    model = ir.Model(ir.Graph(inputs, [], nodes=[], opset_imports={"": 23}, name="g"), ir_version=10)
    if pyop:
        node = ir.Node(CONTRIB, "KVDequantize4", inputs, num_outputs=1)
        model.opset_imports[CONTRIB] = 1
    else:
        add_functions(model, spec)
        node = dequantize_node(spec, *inputs)
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    return model


def time_us(
    model: ir.Model, feeds: dict[str, np.ndarray], library: str | None, repeats: int
) -> tuple[float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(library)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "op.onnx"
        io.save_model(model, path)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)[0]
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feeds)
        samples.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(samples), out


def fake_quant_model(spec: ActSpec, shape: list[int]) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    model = ir.Model(ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g"), ir_version=10)
    model.graph.outputs.append(insert_fake_quant(model, x, spec).outputs[0])
    return model


def main() -> None:
    from rotgraph.kernels import library_path

    compiled = library_path()
    if compiled is None:
        raise SystemExit("rotgraph's kernels are not built: bash scripts/build_kernels.sh")
    library = register_pyops()
    rng = np.random.default_rng(0)
    rows = []

    def row(what: str, model: ir.Model, feeds: dict[str, np.ndarray], repeats: int, pyop: ir.Model | None) -> None:
        base, y = time_us(model, feeds, None, repeats)
        kernel, y1 = time_us(model, feeds, str(compiled), repeats)
        custom, y2 = time_us(pyop, feeds, library, repeats) if pyop is not None else (float("nan"), y)
        rows.append((what, base, kernel, custom, float(np.abs(y - y1).max()), float(np.abs(y - y2).max())))

    for what, n, shape, repeats in (
        ("R3, one decode step (9 heads x 64)", 64, [1, 9, 1, 64], 400),
        ("R4, one decode step (1536)", 1536, [1, 1, 1536], 400),
        ("R4, prefill of 512 tokens", 1536, [1, 512, 1536], 10),
        ("576 = 36 x 16, prefill of 512 tokens", 576, [1, 512, 576], 10),
    ):
        x = rng.standard_normal(shape).astype(np.float32)
        row(what, hadamard_model(n, shape, False), {"x": x}, repeats, hadamard_model(n, shape, True))
    for what, shape, repeats in (
        ("a4 per token, one decode step (576)", [1, 1, 576], 400),
        ("a4 per token, prefill of 512 tokens (576)", [1, 512, 576], 20),
    ):
        x = rng.standard_normal(shape).astype(np.float32)
        row(what, fake_quant_model(ActSpec(4), shape), {"x": x}, repeats, None)
    spec = CacheSpec(4, 64, 0, 0.95)
    for context in (128, 1024):
        codes, scale, zero = spec.quantize(rng.standard_normal((1, 3, context, 64)).astype(np.float32))
        feeds = {"codes": codes, "scale": scale, "zero": zero}
        what = f"kv4 dequantize, one layer's keys at context {context}"
        row(what, dequantize_model(spec, False), feeds, 400, dequantize_model(spec, True))
    print(f"\n### One op per session run (onnxruntime {ort.__version__} CPU, 2 threads; median of 5)\n")
    print(
        "| op | ONNX function us | rotgraph kernel us | kernel / function | onnxruntime-extensions PyOp us "
        "| PyOp / function | max abs diff kernel | max abs diff PyOp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for what, base, kernel, custom, d1, d2 in rows:
        pyop = "- | -" if np.isnan(custom) else f"{custom:.1f} | {custom / base:.1f}x"
        pyop_diff = "-" if np.isnan(custom) else f"{d2:.1e}"
        print(f"| {what} | {base:.1f} | {kernel:.1f} | {kernel / base:.2f}x | {pyop} | {d1:.1e} | {pyop_diff} |")


if __name__ == "__main__":
    main()
