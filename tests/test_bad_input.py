"""Bad input: each case is one `rotgraph: error:` line, exit status 1, no traceback, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from rotgraph import io
from rotgraph.cli import main
from rotgraph.export import to_onnx


def fails_cleanly(argv: list[str], capsys, message: str, out_dir: Path) -> None:
    before = sorted(out_dir.iterdir()) if out_dir.exists() else []
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rotgraph: error: ") and message in last, err
    assert (sorted(out_dir.iterdir()) if out_dir.exists() else []) == before  # nothing written


def test_truncated_model_file(model_dir, tmp_path, capsys) -> None:
    path = model_dir / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fails_cleanly(
        ["rotate", str(path), "-o", str(tmp_path / "o" / "r.onnx")], capsys, "not a readable ONNX", tmp_path / "o"
    )


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_external_data(model_dir, tmp_path, capsys, damage: str) -> None:
    data = model_dir / "model.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    argv = ["quantize", str(model_dir / "model.onnx"), "-o", str(tmp_path / "o" / "q.onnx")]
    fails_cleanly(argv, capsys, f"external data file {data} is {damage}", tmp_path / "o")


@pytest.mark.parametrize("command", ["rotate", "quantize"])
def test_non_finite_weights(model_dir, tmp_path, capsys, command: str) -> None:
    model = io.load_model(model_dir / "model.onnx")
    value = next(
        v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.size > 1000
    )
    array = value.const_value.numpy().copy()  # type: ignore[union-attr]
    array.flat[7] = np.inf
    value.const_value = ir.Tensor(array, name=value.name)
    bad = tmp_path / "bad" / "model.onnx"
    bad.parent.mkdir()
    io.save_model(model, bad)
    argv = [
        command,
        str(bad),
        "-o",
        str(tmp_path / "o" / "out.onnx"),
        *(["--group", "16", "--activations", "dynamic"] if command == "quantize" else []),  # no text to calibrate on
    ]
    fails_cleanly([*argv, "--no-validate"] if command == "rotate" else argv, capsys, "non-finite", tmp_path / "o")


@pytest.mark.parametrize(
    "model_type,config,message",
    [
        ("gpt2", {"n_embd": 48, "n_layer": 1, "n_head": 3, "vocab_size": 384}, "LayerNormalization"),
        (
            "gemma2",
            {
                "hidden_size": 48,
                "intermediate_size": 96,
                "num_hidden_layers": 1,
                "num_attention_heads": 3,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "vocab_size": 384,
            },
            "sandwich norm",
        ),
    ],
)
def test_unsupported_graphs(tmp_path, capsys, model_type: str, config: dict, message: str) -> None:
    """LayerNorm decoders and post-norm (sandwich) decoders exported to ONNX are refused by pattern."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    hf.config.use_cache = False
    path = tmp_path / model_type / "model.onnx"
    path.parent.mkdir()
    io.save_model(to_onnx(hf), path)
    fails_cleanly(["describe", str(path)], capsys, message, tmp_path / "o")
    fails_cleanly(["rotate", str(path), "-o", str(tmp_path / "o" / "r.onnx")], capsys, message, tmp_path / "o")


def test_rotations_of_the_wrong_size(model_dir, tmp_path, capsys) -> None:
    import torch

    from rotgraph.rotations import save_rotations

    eye = torch.eye
    rotations = {"R1": eye(32, dtype=torch.float64), **{f"R2.{i}": eye(16, dtype=torch.float64) for i in range(2)}}
    file = tmp_path / "r.safetensors"
    save_rotations(file, rotations, {"model": "another"})
    argv = [
        "rotate",
        str(model_dir / "model.onnx"),
        "-o",
        str(tmp_path / "o" / "r.onnx"),
        "--rotation",
        "spinquant",
        "--rotations",
        str(file),
    ]
    fails_cleanly(argv, capsys, "R1 must be 48 x 48", tmp_path / "o")


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "{m}", "-o", "{o}", "--weights", "gptq", "--text", "{t}"],
        ["learn", "{m}", "-o", "{r}", "--text", "{t}"],
        ["inspect", "{m}", "--text", "{t}"],
    ],
)
def test_text_too_short(model_dir, tmp_path, capsys, argv: list[str]) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short.", encoding="utf-8")
    names = {
        "m": model_dir / "model.onnx",
        "o": tmp_path / "o" / "q.onnx",
        "r": tmp_path / "o" / "r.safetensors",
        "t": text,
    }
    fails_cleanly([a.format(**names) for a in argv], capsys, "text too short", tmp_path / "o")


@pytest.mark.parametrize("command", ["quantize", "learn"])
def test_missing_tokenizer(model_dir, tmp_path, capsys, command: str) -> None:
    (model_dir / "tokenizer.json").unlink()
    out = tmp_path / "o" / ("q.onnx" if command == "quantize" else "r.safetensors")
    extra = ["--weights", "gptq"] if command == "quantize" else []
    fails_cleanly([command, str(model_dir / "model.onnx"), "-o", str(out), *extra], capsys, "tokenizer", tmp_path / "o")


def test_generate_without_tokenizer(model_dir, capsys) -> None:
    (model_dir / "tokenizer.json").unlink()
    fails_cleanly(["generate", str(model_dir / "model.onnx"), "--prompt", "hi"], capsys, "no tokenizer", model_dir)


@pytest.mark.parametrize("command", ["rotate", "quantize"])
def test_output_equal_to_input(model_dir, capsys, command: str) -> None:
    path = str(model_dir / "model.onnx")
    fails_cleanly([command, path, "-o", path], capsys, "never overwrites its input", model_dir)


def test_export_into_the_source_folder(tiny, tmp_path, capsys) -> None:
    folder, _ = tiny("llama", "dynamo")
    source = tmp_path / "hf"
    shutil.copytree(folder, source)
    fails_cleanly(["export", str(source), "-o", str(source / "model.onnx")], capsys, "inside the model folder", source)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "--set", "activations.clip=1.5", "--group", "16"], "expected a ratio in (0, 1]"),
        (["quantize", "--set", "activations.clip=tight"], "expected a ratio such as 0.8, or `search`"),
        (["quantize", "--set", "activations.clip=search", "--scheme", "w4a16"], "has none"),
        (["quantize", "--set", "activations.clip=search", "--scheme", "w8a8", "--activations", "static"], "has none"),
        (["learn", "--act-clip", "0", "--objective", "output-error"], "expected a ratio in (0, 1]"),
        (
            ["quantize", "--set", "activations.asymmetric=true", "--scheme", "w4a4", "--activations", "static"],
            "static ones",
        ),
        (["quantize", "--set", "rotation.out_hadamard=true", "--rotation", "none"], "comes with a rotation"),
        (["learn", "--out-hadamard"], "only the output-error objective"),
        (["learn", "--act-asymmetric", "--scheme", "w4a16"], "keeps activations float"),
    ],
)
def test_bad_activation_clip(model_dir, tmp_path, capsys, argv: list[str], message: str) -> None:
    command, *rest = argv
    out = tmp_path / "o" / ("q.onnx" if command == "quantize" else "r.safetensors")
    fails_cleanly([command, str(model_dir / "model.onnx"), "-o", str(out), *rest], capsys, message, tmp_path / "o")
