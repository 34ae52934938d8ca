"""Hugging Face optimum's export (tests/fixtures/optimum-llama: opset 18, no value_info, inputs input_ids,
attention_mask, position_ids and past_key_values.*), read as its users hand it over. References: the
Hugging Face model the fixture was exported from, and the unrotated graph itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import mean_kl, torch_logits

from rotgraph.cli import main
from rotgraph.evaluate import make_session, run_logits

FIXTURES = Path(__file__).parent / "fixtures"
SOURCE = FIXTURES / "optimum-llama" / "model.onnx"
HF = FIXTURES / "hf-llama"


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 384, size=(2, 20))


def logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    return run_logits(make_session(path, "disable"), tokens)


def decode_step(path: Path, tokens: np.ndarray) -> np.ndarray:
    """Logits of the last token fed alone with the present cache of a prefill over the others."""
    session = make_session(path, "disable")
    roles = session.roles
    prefill = roles.feeds(tokens[:, :-1])
    names = [o.name for o in session.get_outputs()]
    outs = dict(zip(names, session.run(None, prefill), strict=True))
    step = roles.feeds(tokens[:, -1:], past=roles.next_past(outs))
    assert roles.position_ids is None or step[roles.position_ids].tolist() == [[tokens.shape[1] - 1]] * len(tokens)
    return np.asarray(session.run(None, step)[0])


def test_rotation_is_exact_on_prefill_and_decoding(tmp_path, tokens, capsys) -> None:
    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(SOURCE), "-o", str(rotated)]) == 0, capsys.readouterr().err
    reference = torch_logits(HF, tokens)
    np.testing.assert_allclose(logits(rotated, tokens), reference, atol=2e-5)
    np.testing.assert_allclose(decode_step(rotated, tokens), reference[:, -1:], atol=2e-5)


def test_a_quantized_cache_is_stored_and_rotation_pays_at_4_bits(tmp_path, tokens, capsys) -> None:
    """w4a4kv4 stores the cache as codes (optimum's graph reads the past's full Shape for positions: it
    is restated from the codes), and the rotated graph is closer to float than the unrotated one."""
    reference = torch_logits(HF, tokens)
    kl = {}
    for rotation in ("none", "quarot"):
        out = tmp_path / rotation / "model.onnx"
        args = ["quantize", str(SOURCE), "-o", str(out), "--scheme", "w4a4kv4", "--group", "16", "--recipe", "plain"]
        args += ["--activations", "dynamic"]  # per token, the cache stored as codes (static: Q/DQ values)
        assert main([*args, "--rotation", rotation]) == 0, capsys.readouterr().err
        assert any(c.name.endswith("_scale") for c in make_session(out).roles.caches)
        kl[rotation] = mean_kl(reference, logits(out, tokens))
        assert np.isfinite(decode_step(out, tokens)).all()
    assert kl["quarot"] < kl["none"], kl


@pytest.fixture(scope="module")
def ort_optimized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """onnxruntime's transformer optimizer over the optimum export: com.microsoft RotaryEmbedding (shape
    inference sees nothing behind it), SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization."""
    import shutil

    from onnxruntime.transformers.optimizer import optimize_model

    folder = tmp_path_factory.mktemp("ort-optimized")
    optimized = optimize_model(str(SOURCE), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0)
    optimized.save_model_to_file(str(folder / "model.onnx"), use_external_data_format=True)
    shutil.copy(SOURCE.parent / "tokenizer.json", folder / "tokenizer.json")
    return folder / "model.onnx"


def test_onnxruntime_optimized_graph_rotates_and_quantizes(ort_optimized, tmp_path, tokens, capsys) -> None:
    import onnx

    ops = {n.op_type for n in onnx.load(str(ort_optimized), load_external_data=False).graph.node}
    assert {"RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops
    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(ort_optimized), "-o", str(rotated)]) == 0, capsys.readouterr().err
    reference = torch_logits(HF, tokens)
    np.testing.assert_allclose(logits(rotated, tokens), reference, atol=2e-5)
    np.testing.assert_allclose(decode_step(rotated, tokens), reference[:, -1:], atol=2e-5)
    kl = {}
    for rotation in ("none", "quarot"):
        out = tmp_path / f"kv4-{rotation}" / "model.onnx"
        args = [
            "quantize",
            str(ort_optimized),
            "-o",
            str(out),
            "--scheme",
            "w4a4kv4",
            "--group",
            "16",
            "--recipe",
            "plain",
        ]
        args += ["--activations", "dynamic"]  # rotgraph's ops: standard ONNX refuses com.microsoft RotaryEmbedding
        assert main([*args, "--rotation", rotation]) == 0, capsys.readouterr().err
        kl[rotation] = mean_kl(reference, logits(out, tokens))
    assert kl["quarot"] < kl["none"], kl


def test_left_padded_batches_on_the_rotated_optimized_graph(ort_optimized, tmp_path, capsys) -> None:
    """A left-padded batch through the rotated onnxruntime-optimized graph (RoPE as com.microsoft
    RotaryEmbedding fed by position_ids): each row's logits, prefill and one decode step, equal that row
    run alone through the unrotated graph."""
    from test_inputs import check_padding

    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(ort_optimized), "-o", str(rotated)]) == 0, capsys.readouterr().err
    check_padding(rotated, reference=ort_optimized)
