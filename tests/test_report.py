"""`rotgraph inspect -o`: the report folder, its plots and page, and the numbers behind the outlier plot."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from rotgraph import io
from rotgraph.cli import main
from rotgraph.errors import RotgraphError
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model
from rotgraph.report import PLOTS, write_report
from rotgraph.weights import read_float64

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def models(tiny, tmp_path):  # type: ignore[no-untyped-def]
    _, path = tiny("llama", "dynamo")
    folder = tmp_path / "in"
    shutil.copytree(path.parent, folder)
    model = io.load_model(folder / "model.onnx")
    rotate_model(model, RotateOptions(seed=0))
    io.save_model(model, folder / "rotated.onnx")
    return folder / "model.onnx", folder / "rotated.onnx"


def test_report_writes_plots_and_a_page_that_links_them(models, tmp_path, capsys) -> None:
    model, rotated = models
    text = tmp_path / "text.txt"
    from rotgraph.testing import SAMPLE_TEXT

    text.write_text(SAMPLE_TEXT * 4, encoding="utf-8")
    out = tmp_path / "report"
    argv = [
        "inspect",
        str(model),
        "--rotated",
        str(rotated),
        "-o",
        str(out),
        "--text",
        str(text),
        "--windows",
        "2",
        "--seq-len",
        "64",
        "--group",
        "16",
    ]
    assert main(argv) == 0
    assert sorted(f.name for f in out.iterdir()) == sorted([*PLOTS, "index.html"])
    for plot in PLOTS:
        assert (out / plot).read_bytes()[:8] == PNG
    page = (out / "index.html").read_text(encoding="utf-8")
    assert set(re.findall(r'<img src="([^"]+)"', page)) == set(PLOTS)
    assert "model.onnx vs rotated.onnx" in page
    assert main(argv) == 0  # a report folder is replaced
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".report")]  # no staging left behind


def test_report_refuses_a_folder_that_is_not_a_report(models, tmp_path) -> None:
    model, _ = models
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RotgraphError, match="not a rotgraph report"):
        write_report(out, model, np.zeros((1, 8), np.int64))
    assert (out / "notes.txt").read_text() == "keep me"


def test_outlier_numbers_are_the_embedding_rows(models, tmp_path) -> None:
    """Layer 0's residual input is the embedding of the tokens: its per-channel max is known directly."""
    from rotgraph.options import Scheme
    from rotgraph.report import measure

    model, rotated = models
    tokens = np.random.default_rng(3).integers(0, 384, size=(2, 16))
    for path in (model, rotated):
        table = read_float64(canonicalize(io.load_model(path)).embedding_table)
        side = measure(path, tokens, Scheme.parse("w4a4"), 16)
        np.testing.assert_allclose(
            side.activations[0].residual_channel_max, np.abs(table[tokens.reshape(-1)]).max(axis=0), rtol=1e-6
        )
        assert len(side.weight_error) == 2 and all(0 < e < 1 for e in side.weight_error)
