"""float16 and bfloat16 models (issue 28): weights read, rotated and quantized in float64, written back in the
input's dtype; rotgraph's ops and onnxruntime's contrib ops typed for float16 activations."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import mean_kl, ort_logits

from rotgraph.cli import main
from rotgraph.evaluate import make_session, run_logits
from rotgraph.export import export
from rotgraph.pipeline import default_tolerance

IDS = np.random.default_rng(11).integers(0, 384, size=(2, 64))
F16, BF16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def float16_model(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the float32 export with a KV cache, the float16 export of the same Hugging Face model with one)."""
    hf, float32 = tiny("llama", "dynamo", with_past=True)
    path = tmp_path_factory.mktemp("float16") / "model.onnx"
    export(str(hf), path, "dynamo", with_past=True, dtype="float16")
    return float32, path


def _graph(path: Path) -> onnx.GraphProto:
    return onnx.load(str(path), load_external_data=False).graph


def _weights(path: Path) -> dict[str, int]:
    """{name: element type} of the float initializers of rank 2 and more (weights, not the exporter's scalars)."""
    return {
        i.name: i.data_type for i in _graph(path).initializer if i.data_type in (F16, BF16, F32) and len(i.dims) > 1
    }


def test_the_export_is_float16(float16_model: tuple[Path, Path]) -> None:
    _, path = float16_model
    graph = _graph(path)
    assert graph.output[0].type.tensor_type.elem_type == F16
    assert set(_weights(path).values()) == {F16}
    assert all(i.type.tensor_type.elem_type == F16 for i in graph.input if i.name.startswith("past_key_values."))


def test_a_float16_model_rotates_within_the_float16_tolerance(float16_model, tmp_path: Path) -> None:
    _, source = float16_model
    out = tmp_path / "rotated.onnx"
    assert main(["rotate", str(source), "-o", str(out)]) == 0
    assert set(_weights(out).values()) == {F16}  # the rotated weights, written back as float16
    assert _graph(out).output[0].type.tensor_type.elem_type == F16
    reference, rotated = ort_logits(source, IDS), ort_logits(out, IDS)
    assert rotated.dtype == np.float16
    diff = float(np.abs(reference.astype(np.float64) - rotated).max())
    scale = float(np.abs(reference.astype(np.float64)).max())
    assert 0 < diff <= default_tolerance(ir.DataType.FLOAT16, scale)
    # float16 rounding, not a wrong rotation: a tenth of the logits' scale would be
    assert diff < 0.02 * scale


def _quantize(source: Path, out: Path, scheme: str, fmt: str) -> Path:
    argv = ["quantize", str(source), "-o", str(out), "--scheme", scheme, "--format", fmt, "--group", "16"]
    assert main([*argv, "--set", "calibration.windows=2"]) == 0
    return out / "model.onnx" if fmt == "genai" else out


def _dtypes(path: Path, op_type: str, slot: int) -> set[int]:
    """Element types of input `slot` of every `op_type` node, where that input is an initializer."""
    graph = _graph(path)
    types = {i.name: i.data_type for i in graph.initializer}
    return {types[n.input[slot]] for n in graph.node if n.op_type == op_type and n.input[slot] in types}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "fmt"),
    [
        ("w4a8", "qdq"),
        ("w4a8", "ort"),
        ("w4a8", "genai"),
        ("w4a4kv4", "qdq"),
        ("w4a4kv4", "ort"),
        ("w4a4kv4", "genai"),
    ],
)
def test_float16_quantizes_to_float16(float16_model, tmp_path: Path, scheme: str, fmt: str) -> None:
    float32, float16 = float16_model
    out = _quantize(float16, tmp_path / "f16" / ("genai" if fmt == "genai" else "model.onnx"), scheme, fmt)
    graph = _graph(out)
    assert graph.output[0].type.tensor_type.elem_type == F16
    # the weights' scales in the activations' dtype (DequantizeLinear's x_scale; MatMulNBits, GatherBlockQuantized)
    scales = (
        _dtypes(out, "DequantizeLinear", 1) | _dtypes(out, "MatMulNBits", 2) | _dtypes(out, "GatherBlockQuantized", 2)
    )
    assert scales == {F16}
    assert set(_weights(out).values()) <= {F16}
    if scheme.endswith("kv4") and fmt != "genai":  # rotgraph's stored cache keeps its documented float32 scales
        assert {i.type.tensor_type.elem_type for i in graph.input if i.name.endswith("_scale")} == {F32}
    # what the user runs: onnxruntime at its default optimizations
    logits = run_logits(make_session(out, "all"), IDS)
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    reference = ort_logits(float16, IDS)
    kl = mean_kl(reference, logits)
    top1 = float((reference.argmax(-1) == logits.argmax(-1)).mean())
    # sanity bound: the same scheme from the float32 export of the same model
    out32 = _quantize(float32, tmp_path / "f32" / ("genai" if fmt == "genai" else "model.onnx"), scheme, fmt)
    reference32 = ort_logits(float32, IDS)
    kl32 = mean_kl(reference32, run_logits(make_session(out32, "all"), IDS))
    assert kl <= 2 * kl32 + 1e-4, (kl, kl32)
    assert top1 >= 0.95
    if fmt == "genai":  # onnxruntime-genai's own loop takes the float16 folder and decodes what rotgraph does
        from test_genai_format import genai_run, rotgraph_greedy

        tokens, _ = genai_run(out.parent, [5, 17, 200, 31], 6)
        assert tokens == rotgraph_greedy(out, [5, 17, 200, 31], 6)[0]


@pytest.mark.slow
def test_bfloat16_weights_rotate_in_float64_and_stay_bfloat16(tiny, tmp_path: Path) -> None:
    """onnxruntime's CPU provider does not run a bfloat16 decoder (no bfloat16 Where), so the weights are
    checked: the rotated bfloat16 weights are the rotated float32 weights of the same values, rounded once
    to bfloat16 (the float32 path is checked against torch elsewhere)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf, _ = tiny("llama", "dynamo")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():  # values bfloat16 holds exactly, so both exports start from the same numbers
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (hf / name).is_file():
            (folder / name).write_bytes((hf / name).read_bytes())
    rotated = {}
    for dtype in ("float32", "bfloat16"):
        source, out = tmp_path / dtype / "model.onnx", tmp_path / f"{dtype}-rotated" / "model.onnx"
        export(str(folder), source, "dynamo", dtype=dtype)
        argv = ["rotate", str(source), "-o", str(out)]
        if dtype == "bfloat16":
            assert main(argv) == 1  # validation cannot run it: the error says so, and nothing is written
            assert not out.exists()
            argv.append("--no-validate")
        assert main(argv) == 0
        rotated[dtype] = ir.load(out)
    assert _graph(tmp_path / "bfloat16-rotated" / "model.onnx").output[0].type.tensor_type.elem_type == BF16
    reference = {n: v for n, v in rotated["float32"].graph.initializers.items() if v.dtype == ir.DataType.FLOAT}
    found = rotated["bfloat16"].graph.initializers
    weights = [n for n, v in reference.items() if len(v.shape) > 1]
    assert len(weights) >= 14
    exact = total = 0
    for name in weights:
        assert found[name].dtype == ir.DataType.BFLOAT16, name
        a = reference[name].const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        b = found[name].const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        # within one bfloat16 unit of the float32 result (float64 -> float32 -> bfloat16 may round twice)
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(a), 1e-30))) - 7)
        assert np.all(np.abs(a - b) <= ulp), name
        exact += int((b == a.astype(ml_dtypes.bfloat16).astype(np.float64)).sum())
        total += a.size
    assert exact >= 0.99 * total  # one rounding from float64, not a bfloat16 computation
