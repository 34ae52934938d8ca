"""onnxruntime-genai runs what rotgraph makes of a builder folder (tests/fixtures/genai-llama-fp32: the
model builder's float graph with genai_config.json and tokenizer files), as it ran the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rotgraph.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "genai-llama-fp32"


def greedy(folder: Path, ids: list[int], new: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai's own generator."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(ids) :]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("genai") / "source"
    shutil.copytree(FIXTURE, folder)
    return folder


def test_a_rotated_builder_folder_runs_in_genai_with_the_same_tokens(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "rotated" / "rotated.onnx"
    assert main(["rotate", str(source / "model.onnx"), "-o", str(out)]) == 0
    carried = {p.name for p in source.iterdir()} - {"model.onnx", "model.onnx.data"}
    assert carried and carried <= {p.name for p in out.parent.iterdir()}
    prompts = [[5, 17, 200, 31], [300, 2, 99, 150, 7, 64]]
    for ids in prompts:
        assert greedy(out.parent, ids, 12) == greedy(source, ids, 12)


def test_a_quantized_builder_folder_runs_in_genai(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4a16" / "model.onnx"
    args = ["quantize", str(source / "model.onnx"), "-o", str(out), "--scheme", "w4a16", "--format", "ort"]
    assert main([*args, "--group", "16"]) == 0
    assert len(greedy(out.parent, [5, 17, 200, 31], 8)) == 8
