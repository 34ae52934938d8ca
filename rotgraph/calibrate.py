"""Calibration statistics from onnxruntime runs: X^T X of every projection input (for GPTQ)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from rotgraph import io
from rotgraph.evaluate import make_session
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


def projection_inputs(model: ir.Model) -> list[tuple[ir.Value, int]]:
    """The distinct inputs of the block projections (Q/K/V, O, gate/up, down) and their widths."""
    desc = discover(model)
    linears = [lin for b in desc.blocks for lin in (b.attention.q, b.attention.o, b.mlp.gate, b.mlp.down)]
    return [(lin.input, lin.shape[0]) for lin in linears]


def input_hessians(model: ir.Model, token_windows: np.ndarray, progress: bool = True) -> dict[str, np.ndarray]:
    """X^T X / tokens (float64) for each projection input, keyed by value name, over all windows.

    The model (possibly rotated, weights still lazy) is saved once to a temporary folder with the
    inputs as extra graph outputs; `model` itself is left as it was.
    """
    probed = projection_inputs(model)
    probes = [v for v, _ in probed]
    added = [v for v in probes if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "calibration.onnx"
            io.save_model(model, path)
            session = make_session(path, "basic")
            names = [v.name or "" for v in probes]
            sums = {name: np.zeros((width, width)) for name, (_, width) in zip(names, probed, strict=True)}
            tokens = 0
            feed = session.get_inputs()[0].name
            for window in tqdm(token_windows, desc="calibrate", unit="window", disable=not progress, leave=False):
                outs = session.run(names, {feed: window[None, :].astype(np.int64)})
                for name, x in zip(names, outs, strict=True):
                    x = np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
                    sums[name] += (x.T @ x).astype(np.float64)  # float32 per window, float64 across windows
                tokens += window.size
            del session
    finally:
        for v in added:
            model.graph.outputs.remove(v)
    logger.info("calibrated %d projection inputs on %d tokens", len(probes), tokens)
    return {name: h / tokens for name, h in sums.items()}
