"""Graphs as other tools leave them: onnxruntime's fused norms and MatMuls, opset-23 RMSNormalization and
RotaryEmbedding, fused attention (refused clearly). The reference is the Hugging Face model."""

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
    assert not {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "FusedMatMul"} & set(
        op_counts(model)
    )
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


def test_fused_attention_is_refused_with_a_reason(tiny, tmp_path, capsys) -> None:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, path = tiny("llama", "dynamo")
    model, counts = optimize_for_ort(io.load_model(path))
    assert counts["sdpa_via_mha"] + counts["gqa"] + counts["mha1"] + counts["mha2"] > 0
    fused = tmp_path / "ort.onnx"
    io.save_model(model, fused)
    assert main(["rotate", str(fused), "-o", str(tmp_path / "o" / "r.onnx")]) == 1
    err = capsys.readouterr().err
    assert "attention is fused into com.microsoft" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


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
