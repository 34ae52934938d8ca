"""The float rotation check tells rounding from error: its tolerance grows with the logits' scale."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
from conftest import edited_export

from rotgraph.evaluate import logit_difference
from rotgraph.pipeline import RotateOptions, default_tolerance, rotate


def test_a_correct_rotation_of_large_logits_passes_and_a_wrong_one_fails(tmp_path: Path) -> None:
    """Logits scaled to thousands (the final norm's weights x 3000): float32 rounding in the rotated graph
    exceeds the old absolute 1e-3, a correct rotation still passes, and a 1% error in one weight fails."""

    def loud(model: object) -> None:
        model.model.norm.weight.mul_(3000.0)  # type: ignore[attr-defined]

    source = edited_export(tmp_path, "llama", 3, loud)
    tokens = np.random.default_rng(0).integers(0, 384, size=(1, 64))
    out = tmp_path / "rotated" / "model.onnx"
    report = rotate(source, out, RotateOptions(seed=1))
    assert report.max_abs_logit_diff is not None and report.tolerance > 1e-3
    diff, scale = logit_difference(source, out, tokens)
    assert scale > 1e3 and diff <= default_tolerance(ir.DataType.FLOAT, scale)
    # the same graph with one projection weight off by 1%: an error, not rounding
    broken = tmp_path / "broken"
    shutil.copytree(out.parent, broken)
    model = onnx.load(broken / "model.onnx")
    # an MLP projection: a matrix of two different widths, neither the vocabulary
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2 and 16 < min(t.dims) < max(t.dims) < 384)
    array = onnx.numpy_helper.to_array(weight) * np.float32(1.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, broken / "model.onnx")
    bad, scale = logit_difference(source, broken / "model.onnx", tokens)
    assert bad > default_tolerance(ir.DataType.FLOAT, scale)
