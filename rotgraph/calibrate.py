"""Calibration: statistics of the projection inputs on calibration text, X^T X (GPTQ) and per-channel
maxima (SmoothQuant), measured with one probe run (`rotgraph.probe`).

Statistics are keyed by structural site, not by value name: (block index, "qkv" | "o" | "gate_up" |
"down"), the four distinct inputs of a block's projections. The same key finds the statistic again
after rotation, smoothing or activation quantizers have renamed or wrapped the values, and in another
load of the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.probe import probe
from rotgraph.structure import Block, Linear, ModelDescription, discover

logger = logging.getLogger(__name__)

Site = tuple[int, str]
ROLE_SITES = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "qkv": "qkv",
    "o": "o",
    "gate": "gate_up",
    "up": "gate_up",
    "down": "down",
}


def block_linears(block: Block) -> list[tuple[str, Linear]]:
    """A block's projections with their roles, in a fixed order; a packed QKV MatMul once, as "qkv"."""
    a, m = block.attention, block.mlp
    qkv = [("qkv", a.q.whole)] if a.packed else [("q", a.q), ("k", a.k), ("v", a.v)]
    return [*qkv, ("o", a.o), ("gate", m.gate), ("up", m.up), ("down", m.down)]


def projection_inputs(desc: ModelDescription) -> dict[Site, Linear]:
    """One projection per distinct input site (Q for Q/K/V, gate for gate/up), keyed by site."""
    sites: dict[Site, Linear] = {}
    for block in desc.blocks:
        for role, lin in block_linears(block):
            sites.setdefault((block.index, ROLE_SITES[role]), lin)
    return sites


@dataclass
class Calibration:
    """Calibration windows and what the calibration stages measured on them; later stages read it."""

    tokens: np.ndarray  # [windows, seq_len]
    absmax: dict[Site, np.ndarray] = field(default_factory=dict)  # max |x| per channel, float64
    hessians: dict[Site, np.ndarray] = field(default_factory=dict)  # X^T X / tokens, float64


def _accumulate(
    model: ir.Model, token_windows: np.ndarray, add: Callable[[Site, np.ndarray], None], scratch: Path | None, what: str
) -> int:
    sites = projection_inputs(discover(model))
    keys = list(sites)
    tokens = 0
    values = [sites[k].input for k in keys]
    for outs in probe(model, values, token_windows, scratch=scratch, optimization="basic", what=what, progress=True):
        for key, x in zip(keys, outs, strict=True):
            add(key, np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
        tokens += int(np.prod(outs[0].shape[:-1]))
    logger.info("%s: %d projection inputs on %d tokens", what, len(keys), tokens)
    return tokens


def input_hessians(model: ir.Model, token_windows: np.ndarray, scratch: Path | None = None) -> dict[Site, np.ndarray]:
    """X^T X / tokens (float64) of each projection input site over all windows."""
    sums: dict[Site, np.ndarray] = {}

    def add(site: Site, x: np.ndarray) -> None:
        h = (x.T @ x).astype(np.float64)  # float32 per window, float64 across windows
        sums[site] = sums[site] + h if site in sums else h

    tokens = _accumulate(model, token_windows, add, scratch, "calibrate (GPTQ)")
    return {site: h / tokens for site, h in sums.items()}


def input_absmax(model: ir.Model, token_windows: np.ndarray, scratch: Path | None = None) -> dict[Site, np.ndarray]:
    """max |x| per channel (float64) of each projection input site over all windows."""
    maxima: dict[Site, np.ndarray] = {}

    def add(site: Site, x: np.ndarray) -> None:
        m = np.abs(x).max(axis=0).astype(np.float64)
        maxima[site] = np.maximum(maxima[site], m) if site in maxima else m

    _accumulate(model, token_windows, add, scratch, "calibrate (activation ranges)")
    return maxima


class CalibratePass(ir.passes.InPlacePass):
    """The calibration stage: measure `statistic` ("absmax" for SmoothQuant, "hessian" for GPTQ) of every
    projection input on `calibration.tokens` and store it in `calibration`, keyed by site.

    Rewrites nothing: the graph is unchanged; in-memory weights may move into `scratch` (computed once,
    see `rotgraph.probe.materialize`), which is why the result reports no modification.
    """

    def __init__(self, calibration: Calibration, statistic: str, scratch: Path | None = None) -> None:
        super().__init__()
        if statistic not in ("absmax", "hessian"):
            raise RotgraphError(f"unknown calibration statistic {statistic!r} (absmax, hessian)")
        self.calibration, self.statistic, self.scratch = calibration, statistic, scratch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Filled in place: the stages after this one hold these very dicts.
        if self.statistic == "absmax":
            self.calibration.absmax.clear()
            self.calibration.absmax.update(input_absmax(model, self.calibration.tokens, self.scratch))
        else:
            self.calibration.hessians.clear()
            self.calibration.hessians.update(input_hessians(model, self.calibration.tokens, self.scratch))
        return ir.passes.PassResult(model, False)
