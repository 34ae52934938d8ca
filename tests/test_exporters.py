"""Graphs as other tools leave them: onnxruntime's fused norms and MatMuls, opset-23 RMSNormalization and
RotaryEmbedding, fused attention. The reference is the Hugging Face model."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from conftest import ort_logits, torch_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model
from rotgraph.structure import discover

ATOL = 2e-5


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def ort_fused_norms(path: Path, out: Path) -> collections.Counter:
    """onnxscript's onnxruntime fusions for RMSNorm, skip + RMSNorm and transposed MatMuls."""
    from onnxscript.rewriter.ort_fusions import fused_matmul_rule_sets, rms_normalization, skip_normalization

    model = io.load_model(path)
    common_passes.ShapeInferencePass()(model)
    rms_normalization.fuse_rms_normalization(model)
    skip_normalization.fuse_skip_rms_normalization(model)
    fused_matmul_rule_sets.fused_matmul_rule_sets().apply_to_model(model)
    io.save_model(model, out)
    return op_counts(model)


@pytest.mark.parametrize("with_past", [False, True])
def test_onnxruntime_fused_norms_and_matmuls(tiny, tokens, tmp_path, with_past: bool) -> None:
    folder, path = tiny("llama", "dynamo", with_past)
    fused = tmp_path / "fused.onnx"
    counts = ort_fused_norms(path, fused)
    assert counts["SkipSimplifiedLayerNormalization"] == 4 and counts["SimplifiedLayerNormalization"] == 1
    assert counts["FusedMatMul"] >= 1
    model = io.load_model(fused)
    rotate_model(model, RotateOptions(seed=6))
    after = op_counts(model)  # the fused norms come back (weightless: their scales are in the weights)
    assert after["SkipSimplifiedLayerNormalization"] == 4 and after["SimplifiedLayerNormalization"] == 1
    assert after["FusedMatMul"] == 0 and after["RMSNormalization"] == 0
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_opset23_rms_normalization_and_rotary_embedding(tiny, tokens, tmp_path) -> None:
    from onnxscript.rewriter.rules.fusion import _rotary_embedding

    folder, path = tiny("qwen2", "dynamo")
    model = io.load_model(path)
    canonicalize(model)  # opset 23 RMSNormalization
    assert _rotary_embedding.fuse_rotary_embedding(model) == 4
    opset23 = tmp_path / "opset23.onnx"
    io.save_model(model, opset23)
    model = io.load_model(opset23)
    assert op_counts(model)["RotaryEmbedding"] == 4 and op_counts(model)["RMSNormalization"] == 5
    rotate_model(model, RotateOptions(seed=7))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    one = tokens[:1]  # the fused graph's cos/sin caches have batch 1 (onnxruntime's kernel wants x's batch)
    np.testing.assert_allclose(ort_logits(out, one), torch_logits(folder, one), atol=ATOL)


def test_fused_attention_is_rotated_by_the_cli(tiny, tmp_path, capsys) -> None:
    """onnxscript's MultiHeadAttention fusion is read (tests/test_fused.py checks the logits against the Hugging
    Face model); the CLI validates the rotated graph against the fused input, and the attention stays fused."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, path = tiny("llama", "dynamo")
    model, counts = optimize_for_ort(io.load_model(path))
    assert counts["sdpa_via_mha"] + counts["gqa"] + counts["mha1"] + counts["mha2"] > 0
    fused = tmp_path / "ort.onnx"
    io.save_model(model, fused)
    out = tmp_path / "o" / "r.onnx"
    assert main(["rotate", str(fused), "-o", str(out)]) == 0, capsys.readouterr().err
    assert op_counts(io.load_model(out))["MultiHeadAttention"] == 2


def test_a_graph_without_type_information_is_read(tiny, tokens, tmp_path, capsys) -> None:
    """Exporters such as optimum write no value_info; the norm patterns need types, so rotgraph infers
    them first instead of asking the user to."""
    import onnx

    folder, path = tiny("llama", "dynamo")
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    onnx.save(proto, str(bare), save_as_external_data=True, location="model.onnx.data")
    assert main(["describe", str(bare)]) == 0, capsys.readouterr().err
    assert "decoder: 2 blocks" in capsys.readouterr().out
    model = io.load_model(bare)
    rotate_model(model, RotateOptions(seed=2))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_a_folder_without_tokenizer_exports_none_and_rotates(tiny, tokens, tmp_path, capsys, caplog) -> None:
    """Weights-only Hugging Face folders are common; export writes no tokenizer.json (one that encodes
    nothing would break validation) and rotate then validates on seeded token ids."""
    import shutil

    folder, _ = tiny("llama", "dynamo")
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (folder / name).is_file():
            shutil.copy(folder / name, bare / name)
    out = tmp_path / "onnx" / "model.onnx"
    assert main(["export", str(bare), "-o", str(out)]) == 0, capsys.readouterr().err
    assert "has no tokenizer" in caplog.text
    assert sorted(f.name for f in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(out), "-o", str(rotated)]) == 0, capsys.readouterr().err
    np.testing.assert_allclose(ort_logits(rotated, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_a_float16_graph_rotates_and_quantizes_in_float16(tiny, tokens, tmp_path) -> None:
    """float16 weights and activations: the weight math runs in float64 and is written back as float16,
    rotgraph's ops are float16 functions (the float32-only kernels are not used), the rotation is exact
    to float16 rounding against the Hugging Face model in float16, and quantization is validated."""
    import shutil

    import torch

    from rotgraph.export import ModelSource, load, to_onnx
    from rotgraph.quantize import QuantOptions, quantize

    folder, _ = tiny("llama", "dynamo")
    hf, _ = load(ModelSource(folder, None))
    source = tmp_path / "fp16" / "model.onnx"
    with io.staged_output(source) as staged:
        io.save_model(to_onnx(hf.half(), "dynamo"), staged)
    shutil.copy(folder / "tokenizer.json", source.parent / "tokenizer.json")
    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(source), "-o", str(rotated)]) == 0
    model, original = io.load_model(rotated), io.load_model(source)
    weights = [lin.weight for b in discover(model).blocks for lin in (b.attention.q, b.attention.o, b.mlp.down)]
    assert {w.dtype for w in weights} == {ir.DataType.FLOAT16}
    kept = set(model.graph.initializers) & set(original.graph.initializers)
    assert kept and all(model.graph.initializers[n].dtype == original.graph.initializers[n].dtype for n in kept)
    assert {f.outputs[0].dtype for f in model.functions.values()} <= {ir.DataType.FLOAT16, None}
    with torch.no_grad():
        reference = hf.half()(input_ids=torch.from_numpy(tokens), use_cache=False).logits.float().numpy()
    logits = ort_logits(rotated, tokens).astype(np.float32)
    assert logits.dtype == np.float32 and np.abs(logits - reference).max() < 5e-2 * max(1.0, np.abs(reference).max())
    for scheme, fmt in (("w4a4kv4", "qdq"), ("w4a8", "ort")):
        report = quantize(source, tmp_path / f"{scheme}-{fmt}" / "model.onnx", QuantOptions(scheme, group=16, fmt=fmt))
        assert report.validation is not None and report.validation.top1 > 0.9
