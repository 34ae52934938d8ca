"""Bad input: each case is one `rotgraph: error:` line, exit status 1, no traceback, nothing written."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

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


def save_graph(path: Path, nodes: list, inputs: list, outputs: list, initializers: list = (), opset: int = 17) -> Path:  # type: ignore[assignment]
    """A graph built node by node, saved at IR version 10 (onnxruntime 1.31+ rejects onnx 1.23's default, 14)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def embedding_graph(path: Path, outputs: bool = True, opset: int = 17) -> Path:
    """input_ids -> Gather(table) -> Expand(to its own shape) -> MatMul -> logits: no decoder, but well formed."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("Shape", ["h"], ["shape"]),
        helper.make_node("Expand", ["h", "shape"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["logits"]),
    ]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 32])
    return save_graph(path, nodes, [ids], [logits] if outputs else [], [table, w], opset)


def malformed(kind: str, folder: Path, model_dir: Path) -> Path:
    path = folder / "model.onnx"
    if kind == "not ONNX":
        path.parent.mkdir(parents=True)
        path.write_text("this is a text file\n", encoding="utf-8")
    elif kind == "empty graph":
        save_graph(path, [], [], [])
    elif kind == "no outputs":
        embedding_graph(path, outputs=False)
    elif kind == "opset 7":  # Expand came in opset 8: onnx cannot convert the graph to opset 23
        embedding_graph(path, opset=7)
    elif kind == "no ONNX opset":
        model = onnx.load(embedding_graph(path))
        model.opset_import[0].domain = "com.example"
        onnx.save(model, path)
    else:  # a projection weight that is not 2-D: q_proj of the tiny Llama as a vector
        model = io.load_model(model_dir / "model.onnx")
        weight = next(n.inputs[1] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer())
        assert weight is not None and weight.const_value is not None
        vector = weight.const_value.numpy().reshape(-1)
        weight.const_value = ir.Tensor(vector, name=weight.name)
        weight.shape = ir.Shape(vector.shape)
        path.parent.mkdir(parents=True)
        io.save_model(model, path)
    return path


MALFORMED = {
    "not ONNX": "not a readable ONNX model",
    "empty graph": "the graph has no nodes",
    "no outputs": "the graph has no outputs",
    "opset 7": "imports ONNX opset 7: rotgraph needs opset 23 (RMSNormalization) and could not convert the graph",
    "no ONNX opset": "the graph imports no ONNX opset (only ['com.example']): rotgraph needs opset 23",
    "1-D weight": "of shape (2304,): a projection's weight must be 2-D",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
@pytest.mark.parametrize("command", ["describe", "rotate", "quantize"])
def test_malformed_models(model_dir, tmp_path, capsys, kind: str, command: str) -> None:
    """Each is one error line saying what is wrong (no IndexError, ValueError or PassError as the cause)."""
    path = malformed(kind, tmp_path / "bad", model_dir)
    out = tmp_path / "o" / "out.onnx"
    argv = {
        "describe": ["describe", str(path)],
        "rotate": ["rotate", str(path), "-o", str(out)],
        "quantize": [
            "quantize",
            str(path),
            "-o",
            str(out),
            "--no-validate",
            "--activations",
            "dynamic",
            "--group",
            "16",
        ],
    }[command]
    fails_cleanly(argv, capsys, MALFORMED[kind], tmp_path / "o")


def test_a_graph_that_crashes_onnx_is_one_error_line(tmp_path) -> None:
    """A GatherND with batch_dims -999 segfaults onnx's shape inference and onnxruntime's session: rotgraph
    reads an input in a child process first, so the user sees one error line, and exit status 1."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])
    node = helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=-999)
    path = save_graph(tmp_path / "bad" / "model.onnx", [node], [x, i], [y])
    out = tmp_path / "o" / "r.onnx"
    for argv in (["describe", str(path)], ["rotate", str(path), "-o", str(out)], ["eval", str(path)]):
        done = subprocess.run(
            [sys.executable, "-m", "rotgraph.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"rotgraph: error: {path}: onnx's shape inference crashed (SIGSEGV)"), done.stderr
        assert not out.parent.exists()


def test_staging_folders_of_killed_runs_are_removed(tmp_path) -> None:
    """A run writing OUT removes the `.OUT.*` staging folders whose owner process is gone (here on this
    host), and keeps those of live processes, of other hosts and folders that are not rotgraph's."""
    out = tmp_path / "o" / "model.onnx"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    owners = {
        "dead": f"{host} {gone.stdout.strip()}",
        "live": f"{host} {os.getpid()}",
        "far": f"elsewhere {gone.stdout.strip()}",
    }
    for name, owner in [*owners.items(), ("foreign", None)]:
        stage = out.parent / f".{out.name}.{name}"
        stage.mkdir(parents=True)
        (stage / "model.onnx.data").write_bytes(b"partial")
        if owner is not None:
            (stage / io.STAGE_OWNER).write_text(owner, encoding="utf-8")
    with io.staged_output(out) as staged:
        staged.write_bytes(b"model")
        assert (staged.parent / io.STAGE_OWNER).read_text(encoding="utf-8").split() == [host, str(os.getpid())]
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == [".model.onnx.far", ".model.onnx.foreign", ".model.onnx.live", "model.onnx"], left


def test_an_unexpected_error_names_its_first_cause() -> None:
    """A pass manager's wrapper ("An error occurred at step 0") is not the reason: the line names the first cause."""
    from rotgraph.cli import _error_line

    try:
        try:
            raise KeyError("the real reason")
        except KeyError as e:
            raise RuntimeError("An error occurred at step 0") from e
    except RuntimeError as e:
        line = _error_line(e)
    assert line.startswith("KeyError: 'the real reason' (unexpected"), line


def test_bad_thread_count(model_dir, tmp_path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """ROTGRAPH_WORKERS is read when the work starts: a bad value is a one-line error and nothing is written."""
    monkeypatch.setenv("ROTGRAPH_WORKERS", "two")
    argv = ["rotate", str(model_dir / "model.onnx"), "-o", str(tmp_path / "o" / "r.onnx"), "--no-validate"]
    fails_cleanly(argv, capsys, "ROTGRAPH_WORKERS='two'", tmp_path / "o")
