"""Calibration statistics from onnxruntime runs of the projection inputs: X^T X (for GPTQ) and
per-channel maxima (for SmoothQuant)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from rotgraph import io
from rotgraph.evaluate import make_session, model_feeds
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


def projection_inputs(model: ir.Model) -> list[tuple[ir.Value, int]]:
    """The distinct inputs of the block projections (Q/K/V, O, gate/up, down) and their widths."""
    desc = discover(model)
    linears = [lin for b in desc.blocks for lin in (b.attention.q, b.attention.o, b.mlp.gate, b.mlp.down)]
    return [(lin.input, lin.shape[0]) for lin in linears]


def _reduce_probes(
    model: ir.Model,
    token_windows: np.ndarray,
    accumulate: Callable[[str, np.ndarray], None],
    progress: bool,
    what: str,
) -> int:
    """Run `model` on every window with the projection inputs as extra graph outputs, handing each
    input (as [tokens, width] float32) to `accumulate`; returns the number of tokens seen.

    The model (possibly rotated, weights still lazy) is saved once to a temporary folder; `model`
    itself is left as it was.
    """
    probes = [v for v, _ in projection_inputs(model)]
    added = [v for v in probes if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    tokens = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "calibration.onnx"
            io.save_model(model, path)
            session = make_session(path, "basic")
            names = [v.name or "" for v in probes]
            for window in tqdm(token_windows, desc=what, unit="window", disable=not progress, leave=False):
                outs = session.run(names, model_feeds(session, window[None, :]))
                for name, x in zip(names, outs, strict=True):
                    accumulate(name, np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
                tokens += window.size
            del session
    finally:
        for v in added:
            model.graph.outputs.remove(v)
    logger.info("%s: %d projection inputs on %d tokens", what, len(probes), tokens)
    return tokens


def input_hessians(model: ir.Model, token_windows: np.ndarray, progress: bool = True) -> dict[str, np.ndarray]:
    """X^T X / tokens (float64) for each projection input, keyed by value name, over all windows."""
    sums = {v.name or "": np.zeros((width, width)) for v, width in projection_inputs(model)}

    def accumulate(name: str, x: np.ndarray) -> None:
        sums[name] += (x.T @ x).astype(np.float64)  # float32 per window, float64 across windows

    tokens = _reduce_probes(model, token_windows, accumulate, progress, "calibrate")
    return {name: h / tokens for name, h in sums.items()}


def input_absmax(model: ir.Model, token_windows: np.ndarray, progress: bool = True) -> dict[str, np.ndarray]:
    """max |x| per channel (float64) of each projection input, keyed by value name, over all windows."""
    maxima = {v.name or "": np.zeros(width) for v, width in projection_inputs(model)}

    def accumulate(name: str, x: np.ndarray) -> None:
        np.maximum(maxima[name], np.abs(x).max(axis=0), out=maxima[name])

    _reduce_probes(model, token_windows, accumulate, progress, "activation ranges")
    return maxima
