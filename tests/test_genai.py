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


def step_logits(folder: Path, ids: list[int], new: int) -> np.ndarray:
    """[steps, vocab]: the last position's logits at each step of onnxruntime-genai's greedy loop."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    steps = []
    while not generator.is_done():
        logits = np.array(generator.get_output("logits"))
        steps.append(logits.reshape(-1, logits.shape[-1])[-1].copy())
        generator.generate_next_token()
    return np.stack(steps)


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
    args = [
        "quantize",
        str(source / "model.onnx"),
        "-o",
        str(out),
        "--scheme",
        "w4a16",
        "--format",
        "ort",
        "--recipe",
        "plain",
    ]
    assert main([*args, "--group", "16"]) == 0
    assert len(greedy(out.parent, [5, 17, 200, 31], 8)) == 8


def test_rope_moved_out_and_r3_run_in_genai_with_the_same_logits(source: Path, tmp_path: Path) -> None:
    """SplitRotaryPass, then R1-R4 with R3 between the new RotaryEmbedding and GroupQueryAttention: in
    onnxruntime-genai's own loop (shared past/present buffer, positions from its mask) every step's logits
    equal the builder graph's."""
    from rotgraph import io
    from rotgraph.passes.canonical.split_rotary import SplitRotaryPass
    from rotgraph.pipeline import RotateOptions, rotate_model

    out = tmp_path / "r3"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.onnx*"))
    model = io.load_model(source / "model.onnx")
    SplitRotaryPass()(model)
    rotate_model(model, RotateOptions(seed=1))
    assert [n.op_type for n in model.graph].count("Hadamard") == 2 * 2 + 2
    io.save_model(model, out / "model.onnx")
    for ids in ([5, 17, 200, 31], [300, 2, 99, 150, 7, 64]):
        reference = step_logits(source, ids, 6)
        np.testing.assert_allclose(step_logits(out, ids, 6), reference, atol=1e-4 * np.abs(reference).max())
