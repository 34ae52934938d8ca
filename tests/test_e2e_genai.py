"""End to end: rotgraph's onnxruntime-genai folder of the default model against the onnxruntime-genai
model builder's own int4 folder of the same Hugging Face folder (issue 16's e2e tests).

The builder runs from its pinned venv under build/fixture-venvs/ (scripts/test.sh makes it before an e2e
run; a missing venv fails the test). benchmarks/genai.py's own builder command is used, so the test and the
benchmark compare the same folders. References: the builder's folder scored by the same evaluation, and
rotgraph's own greedy loop on rotgraph's folder for onnxruntime-genai's tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from rotgraph.cli import main
from rotgraph.evaluate import evaluate, windows
from rotgraph.export import export
from rotgraph.genai import model_in
from rotgraph.generate import generate
from rotgraph.text import load_text
from rotgraph.tokenize import encode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import exporters  # benchmarks/exporters.py
import genai  # benchmarks/genai.py

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tool_venvs: None) -> tuple[Path, Path]:
    """(the builder's int4 folder, rotgraph's `--format genai --recipe int4` folder), both of SmolLM2."""
    work = tmp_path_factory.mktemp("genai-e2e")
    hf = exporters.hf_folder(work, reuse=False)
    genai.builder(hf, work / "builder-int4", "int4", reuse=False)
    source = work / "export" / "model.onnx"
    export(str(hf), source, with_past=True)
    ours = work / "rotgraph-int4"
    assert main(["quantize", str(source), "-o", str(ours), "--format", "genai", "--recipe", "int4"]) == 0
    return work / "builder-int4", ours


def test_the_w4a8_folder_beats_the_builders_int4_perplexity(folders: tuple[Path, Path]) -> None:
    builder, ours = folders
    tokens = windows(encode(ours / "tokenizer.json", load_text("evaluation")), 8, 512)
    theirs, mine = evaluate([model_in(builder), model_in(ours)], tokens, progress=False)
    assert mine.perplexity < theirs.perplexity, (mine.perplexity, theirs.perplexity)
    size = sum(f.stat().st_size for f in ours.glob("model.onnx*"))
    builder_size = sum(f.stat().st_size for f in builder.glob("model.onnx*"))
    assert size <= 1.1 * builder_size, (size, builder_size)


def test_the_folder_answers_the_chat_prompt_in_onnxruntime_genai(folders: tuple[Path, Path]) -> None:
    """onnxruntime-genai's generator on rotgraph's folder (its kernel library registered from the config)
    gives rotgraph's own greedy tokens, and they answer the question."""
    import onnxruntime_genai as og

    _, ours = folders
    run = generate(model_in(ours), "What is the capital of France?", 24, chat=True)
    model = og.Model(str(ours))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(run.prompt_tokens) + 24, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(run.prompt_tokens, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    new = [int(t) for t in generator.get_sequence(0)][len(run.prompt_tokens) :]
    assert new == run.new_tokens[: len(new)] and len(new) > 3
    assert "Paris" in og.Tokenizer(model).decode(np.array(new, dtype=np.int32))
