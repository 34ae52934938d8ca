"""The command line as a user meets it: outputs, errors, nothing half-written, inputs untouched."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ort_logits

from rotgraph.cli import main, parser
from rotgraph.constants import QUANTIZATION_KEY
from rotgraph.testing import SAMPLE_TEXT


def digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    return path


def test_rotate_writes_a_validated_model_and_leaves_the_input_alone(model_dir, tmp_path, capsys, tokens) -> None:
    before = digest(model_dir)
    out = tmp_path / "out" / "rotated.onnx"
    assert main(["rotate", str(model_dir / "model.onnx"), "-o", str(out), "--seed", "4"]) == 0
    assert digest(model_dir) == before
    assert sorted(f.name for f in out.parent.iterdir()) == ["rotated.onnx", "rotated.onnx.data", "tokenizer.json"]
    assert "validated: max |logit difference|" in capsys.readouterr().out
    np.testing.assert_allclose(ort_logits(out, tokens), ort_logits(model_dir / "model.onnx", tokens), atol=2e-5)


def test_rotate_refuses_to_overwrite_its_input(model_dir, capsys) -> None:
    before = digest(model_dir)
    path = str(model_dir / "model.onnx")
    assert main(["rotate", path, "-o", path]) == 1
    err = capsys.readouterr().err
    assert "never overwrites its input" in err and "Traceback" not in err
    assert digest(model_dir) == before


def test_failed_validation_writes_nothing(model_dir, tmp_path, capsys) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(["rotate", str(model_dir / "model.onnx"), "-o", str(out_dir / "r.onnx"), "--tolerance", "0"]) == 1
    assert "nothing written" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []


def test_rotating_twice_is_refused(model_dir, tmp_path, capsys) -> None:
    first = tmp_path / "r1.onnx"
    assert main(["rotate", str(model_dir / "model.onnx"), "-o", str(first), "--no-validate"]) == 0
    assert main(["rotate", str(first), "-o", str(tmp_path / "r2.onnx"), "--no-validate"]) == 1
    assert "already rotated" in capsys.readouterr().err


def test_eval_json_compares_to_the_first_model(model_dir, tmp_path, text_file, capsys) -> None:
    rotated = tmp_path / "rotated.onnx"
    assert main(["rotate", str(model_dir / "model.onnx"), "-o", str(rotated), "--no-validate"]) == 0
    capsys.readouterr()
    args = [
        "eval",
        str(model_dir / "model.onnx"),
        str(rotated),
        "--text",
        str(text_file),
        "--windows",
        "3",
        "--seq-len",
        "32",
        "--json",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kl_to_reference"] is None for r in rows] == [True, False]
    for key in ("perplexity", "kl_to_reference", "top1_agreement", "tokens", "seconds"):
        assert key in rows[1]
    assert rows[0]["tokens"] == rows[1]["tokens"] == 3 * 31
    assert rows[1]["top1_agreement"] == 1.0 and rows[1]["kl_to_reference"] < 1e-8
    assert rows[0]["perplexity"] == pytest.approx(rows[1]["perplexity"], rel=1e-5)


def test_perplexity_matches_a_direct_computation(model_dir, text_file, capsys) -> None:
    from rotgraph.evaluate import windows
    from rotgraph.tokenize import encode

    path = model_dir / "model.onnx"
    assert main(["eval", str(path), "--text", str(text_file), "--windows", "2", "--seq-len", "16", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["perplexity"]
    ids = windows(encode(model_dir / "tokenizer.json", text_file.read_text()), 2, 16)
    logits = ort_logits(path, ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1).mean()
    assert got == pytest.approx(float(np.exp(nll)), rel=1e-9)


def test_text_too_short_is_one_clear_line(model_dir, text_file, capsys) -> None:
    assert main(["eval", str(model_dir / "model.onnx"), "--text", str(text_file), "--windows", "500"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rotgraph: error: text too short") and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["rotate", "missing.onnx", "-o", "x.onnx"], "no such model file"),
        (["export", "no/such/model", "-o", "x.onnx"], "no such model file or folder"),
        (["eval", "missing.onnx"], "no such model"),
    ],
)
def test_bad_paths(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_eval_without_tokenizer(model_dir, text_file, capsys) -> None:
    (model_dir / "tokenizer.json").unlink()
    assert main(["eval", str(model_dir / "model.onnx"), "--text", str(text_file)]) == 1
    assert "no tokenizer" in capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    assert main(["export", str(folder), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "'gpt2' is not supported" in capsys.readouterr().err


def test_corrupt_model(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert main(["rotate", str(bad), "-o", str(tmp_path / "out.onnx")]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_describe(model_dir, capsys) -> None:
    assert main(["describe", str(model_dir / "model.onnx")]) == 0
    assert "2 blocks" in capsys.readouterr().out


def test_inspect_shows_rotation_removes_outliers(model_dir, tmp_path, text_file, capsys) -> None:
    rotated = tmp_path / "rotated.onnx"
    assert main(["rotate", str(model_dir / "model.onnx"), "-o", str(rotated), "--no-validate"]) == 0
    capsys.readouterr()
    args = [
        "inspect",
        str(model_dir / "model.onnx"),
        "--rotated",
        str(rotated),
        "--text",
        str(text_file),
        "--windows",
        "2",
        "--seq-len",
        "32",
    ]
    assert main(args) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 0 ") or r.startswith("| 1 ")]
    assert len(rows) == 2
    before, after = (float(x) for x in rows[0].split("|")[2].split("->"))
    assert after < before  # the tiny models carry planted embedding outliers


def _quantization_options(path: Path) -> dict:
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(meta[QUANTIZATION_KEY])


def test_quantize_smooth_calibrates_on_the_given_text(model_dir, tmp_path, capsys, tokens) -> None:
    """--smooth --alpha reaches the pass (recorded in the output, changes the result), the w8a8 result stays
    near the float model, and the input folder is untouched."""
    text = tmp_path / "calibration.txt"
    text.write_text(SAMPLE_TEXT * 60, encoding="utf-8")
    before = digest(model_dir)
    outs = {}
    for name, extra in (("plain", []), ("smooth", ["--set", "activations.smooth=0.7"])):
        outs[name] = tmp_path / name / "q.onnx"
        argv = [
            "quantize",
            str(model_dir / "model.onnx"),
            "-o",
            str(outs[name]),
            "--scheme",
            "w8a8",
            "--recipe",
            "plain",
        ]
        argv += ["--rotation", "none", "--group", "16", "--text", str(text), "--set", "calibration.windows=1", *extra]
        argv += ["--activations", "dynamic"]  # per token: static per-tensor scales are far coarser without rotation
        assert main(argv) == 0, capsys.readouterr().err
    assert digest(model_dir) == before
    assert _quantization_options(outs["smooth"])["smooth"] == 0.7
    assert _quantization_options(outs["plain"])["smooth"] is None
    reference = ort_logits(model_dir / "model.onnx", tokens)
    smooth, plain = ort_logits(outs["smooth"], tokens), ort_logits(outs["plain"], tokens)
    assert np.abs(smooth - reference).max() < 0.05 * np.abs(reference).max()
    assert np.abs(smooth - plain).max() > 1e-4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "activations.smooth=1.5"], "alpha must be in [0, 1]"),
        (["--scheme", "w3a8"], "scheme 'w3a8'"),
        (["--group", "-1"], "group must be >= 0"),
    ],
)
def test_quantize_refuses_bad_options_before_any_work(model_dir, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "out" / "q.onnx"
    assert main(["quantize", str(model_dir / "model.onnx"), "-o", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_quantize_smooth_without_tokenizer(model_dir, tmp_path, capsys) -> None:
    (model_dir / "tokenizer.json").unlink()
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model_dir / "model.onnx"), "-o", str(out), "--set", "activations.smooth=0.5"]) == 1
    assert "tokenizer" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_error_is_one_line_and_exit_status_1(model_dir, tmp_path, verbose: bool) -> None:
    """A failure rotgraph does not anticipate (here an OSError: the text file is a folder) is still one
    `rotgraph: error:` line and exit status 1, run as a real process; -v adds the traceback before it."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "rotgraph.cli", *(["-v"] if verbose else [])]
    command += ["eval", str(model_dir / "model.onnx"), "--text", str(tmp_path), "--windows", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("rotgraph: error: IsADirectoryError:"), done.stderr
    assert ("Traceback" in done.stderr) == verbose
    if not verbose:
        assert len([line for line in lines if "error" in line]) == 1, done.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_other_libraries_output_only_with_verbose(tmp_path, verbose: bool) -> None:
    """Without -v a command prints rotgraph's lines only: no Python warnings, no other library's log
    records or progress bars (torch's exporter, transformers, tqdm); -v shows them."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import logging, sys, warnings
        from rotgraph import cli

        def noisy(args):
            warnings.warn("a library's FutureWarning", FutureWarning)
            logging.getLogger("onnxscript.optimizer").warning("a library's log record")
            from tqdm import tqdm
            list(tqdm(range(3), desc="a library's bar"))
            logging.getLogger("rotgraph.pipeline").info("rotgraph's line")

        cli.cmd_describe = noisy
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    argv = [*(["-v"] if verbose else []), "describe", str(tmp_path / "model.onnx")]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    if verbose:
        assert all(s in done.stderr for s in ("FutureWarning", "a library's log record", "a library's bar")), (
            done.stderr
        )
    else:
        assert done.stderr == "rotgraph: rotgraph's line\n"


def test_learn_help_says_what_each_option_does_and_its_default(capsys) -> None:
    """`rotgraph learn --help`: every option has a help text, and a default with a value is shown (not the
    None / False of options that are unset or off)."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["learn"]
    assert all(a.help for a in sub._actions if a.option_strings), [a.dest for a in sub._actions if not a.help]
    with pytest.raises(SystemExit):
        main(["learn", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: w4a4kv4)", "(default: 0.0)", "(default: 32)", "(default: 16)", "(default: 10)"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
