"""Calibration: statistics of the projection inputs on calibration text, X^T X (GPTQ), per-channel
maxima (SmoothQuant) and the clip ratio of each input's per-token quantizer, measured with one probe
run (`rotgraph.probe`).

Statistics are keyed by structural site, not by value name: (block index, "qkv" | "o" | "gate_up" |
"down"), the four distinct inputs of a block's projections. The same key finds the statistic again
after rotation, smoothing or activation quantizers have renamed or wrapped the values, and in another
load of the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import grid
from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec
from rotgraph.probe import BlockRunner, probe, runs_by_block, window_feeds
from rotgraph.results import Calibration, Site
from rotgraph.segments import Cut, boundaries
from rotgraph.structure import Block, Linear, ModelDescription, before_fake_quant, discover, distinct
from rotgraph.weights import read_float64

logger = logging.getLogger(__name__)

CHECK_WINDOWS = 2  # calibration windows on which each quantized block is compared with the float one

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


def _accumulate(
    model: ir.Model,
    token_windows: np.ndarray,
    add: Callable[[Site, int, np.ndarray], None],
    scratch: Path | None,
    what: str,
) -> int:
    """Call `add(site, window, rows)` with each projection input site's rows [tokens, channels] on each
    window (each site's windows in order; sites may interleave); returns the tokens seen per site."""
    sites = projection_inputs(discover(model))
    keys = list(sites)
    tokens = 0
    values = [sites[k].input for k in keys]
    for p in probe(model, values, token_windows, scratch=scratch, optimization="basic", what=what, progress=True):
        x = p.array
        add(keys[p.value], p.window, np.asarray(x, dtype=np.float32).reshape(-1, x.shape[-1]))
        tokens += int(np.prod(x.shape[:-1])) if p.value == 0 else 0
    logger.info("%s: %d projection inputs on %d tokens", what, len(keys), tokens)
    return tokens


def input_hessians(model: ir.Model, token_windows: np.ndarray, scratch: Path | None = None) -> dict[Site, np.ndarray]:
    """X^T X / tokens (float64) of each projection input site over all windows."""
    grams = Grams()
    tokens = _accumulate(model, token_windows, lambda site, _, x: grams.add(site, x), scratch, "calibrate (GPTQ)")
    return grams.result(tokens)


GRAM_ROWS = 2048  # rows of X^T X computed at once (float32): up to 117 MB for a 14336-wide input
GRAM_TOKENS = 2048  # input rows (tokens) per float32 product: several windows, one float64 accumulation for them


def add_gram(sums: dict[Site, np.ndarray], site: Site, x: np.ndarray) -> None:
    """sums[site] += X^T X of rows `x` [tokens, n], on and below the diagonal (the upper triangle is
    `finish_grams`'s: half the products): float32 for these rows, accumulated in float64 in place,
    GRAM_ROWS rows of the product at a time (an 8B down_proj's sum is 1.6 GB: no float64 copy of the
    rows' product, no new sum, and its float32 product is made a slab at a time, not 0.8 GB at once)."""
    n = x.shape[1]
    total = sums.get(site)
    if total is None:
        total = sums[site] = np.zeros((n, n), dtype=np.float64)
    for r in range(0, n, GRAM_ROWS):
        e = min(r + GRAM_ROWS, n)
        total[r:e, :e] += x[:, r:e].T @ x[:, :e]


class Grams:
    """X^T X / tokens (float64) per site from rows given window by window: each site's rows are held until
    `GRAM_TOKENS` have come, then `add_gram` adds their product (float32, one product for several windows:
    the float64 accumulation, which moves 24 bytes per element of the sum, runs once per `GRAM_TOKENS`
    rows instead of once per window; `GRAM_TOKENS` x the channels x 4 bytes held per site)."""

    def __init__(self) -> None:
        self.sums: dict[Site, np.ndarray] = {}
        self.held: dict[Site, list[np.ndarray]] = {}

    def add(self, site: Site, x: np.ndarray) -> None:
        """Rows [tokens, channels] (float32) of `site`."""
        held = self.held.setdefault(site, [])
        held.append(x)
        if sum(len(h) for h in held) >= GRAM_TOKENS:
            self._flush(site)

    def _flush(self, site: Site) -> None:
        held = self.held.pop(site, [])
        if held:
            add_gram(self.sums, site, held[0] if len(held) == 1 else np.concatenate(held))

    def result(self, tokens: int) -> dict[Site, np.ndarray]:
        """The sums, symmetric, divided by `tokens`."""
        for site in list(self.held):
            self._flush(site)
        finish_grams(self.sums, tokens)
        return self.sums


def finish_grams(sums: dict[Site, np.ndarray], tokens: int) -> None:
    """Sums of `add_gram` -> X^T X / tokens, symmetric, in place (the upper triangle copied from the lower
    a slab at a time)."""
    for h in sums.values():
        n = len(h)
        for r in range(0, n, GRAM_ROWS):
            e = min(r + GRAM_ROWS, n)
            h[r:e, r:e] = np.tril(h[r:e, r:e]) + np.tril(h[r:e, r:e], -1).T
            h[r:e, e:] = h[e:, r:e].T
        h /= tokens


def input_absmax(model: ir.Model, token_windows: np.ndarray, scratch: Path | None = None) -> dict[Site, np.ndarray]:
    """max |x| per channel (float64) of each projection input site over all windows."""
    maxima: dict[Site, np.ndarray] = {}

    def add(site: Site, window: int, x: np.ndarray) -> None:
        m = np.abs(x).max(axis=0).astype(np.float64)
        maxima[site] = np.maximum(maxima[site], m) if site in maxima else m

    _accumulate(model, token_windows, add, scratch, "calibrate (activation ranges)")
    return maxima


class BlockHessians:
    """X^T X / tokens (float64) of one block's projection inputs at a time, the model run block by block
    (`rotgraph.probe.BlockRunner`), so GPTQ holds one block's Hessians, never the whole model's.

    `sequential` (GPTQ's sequential mode): each block's inputs come from the earlier blocks as the graph
    has them when the block runs, i.e. with their quantized weights (`QuantizeWeightsPass` calls `done`
    after each block) and activation quantizers; otherwise from the model as it is at `start` (the
    statistics of `input_hessians` exactly, whatever stages run between `start` and the quantizer).
    A projection's input is read before its own activation quantizer (as `input_hessians` reads it,
    before any is inserted). The sums are accumulated as `input_hessians` does (`Grams`: float32 per
    `GRAM_TOKENS` rows, float64 across them).
    """

    def __init__(self, tokens: np.ndarray, scratch: Path | None, sequential: bool) -> None:
        self.tokens, self.scratch, self.sequential = tokens, scratch, sequential
        self.runner: BlockRunner | None = None
        self.live: tuple[ir.Model, list[Cut]] | None = None  # the model being quantized, and its cuts
        # Per block (not sequential): ||quantized - float block output||^2 / ||float output - input||^2 on
        # the first CHECK_WINDOWS windows, the block's error relative to what it adds to the residual stream.
        self.errors: dict[int, float] = {}

    def start(self, model: ir.Model, desc: ModelDescription) -> None:
        """Cut `model` (before any weight changes form) and run its embedding."""
        if len(self.tokens) == 0:
            raise RotgraphError("GPTQ needs calibration tokens")
        cuts: list[Cut] = [(v,) for v in boundaries(desc)]
        self.live = model, cuts
        feeds = window_feeds(model, self.tokens)
        self.runner = BlockRunner(model, cuts, feeds, self.scratch, frozen=not self.sequential)
        for _ in self.runner.run([], advance=True):
            pass

    def hessians(self, block: Block) -> dict[Site, np.ndarray]:
        """The Hessians of `block`'s input sites (the blocks before it have run)."""
        if self.runner is None or self.runner.segment != block.index + 1:
            raise RotgraphError(f"block {block.index}: the blocks before it have not run (call start, then done)")
        sites: dict[Site, ir.Value] = {}
        for role, lin in block_linears(block):
            sites.setdefault((block.index, ROLE_SITES[role]), before_fake_quant(lin.input))
        keys = list(sites)
        grams = Grams()
        tokens = 0
        for p in self.runner.run([sites[k] for k in keys], advance=not self.sequential):
            x = np.asarray(p.array, dtype=np.float32).reshape(-1, p.array.shape[-1])
            grams.add(keys[p.value], x)
            tokens += len(x) if p.value == 0 else 0
        return grams.result(tokens)

    def done(self, block: Block) -> None:
        """`block` has its final weights: in sequential mode, run it to feed the next block; otherwise
        compare it with the float block on the same inputs (`errors`)."""
        assert self.runner is not None and self.live is not None
        if self.sequential:
            for _ in self.runner.run([], advance=True):
                pass
            return
        model, cuts = self.live
        quantized = self.runner.replay(model, cuts, window_feeds(model, self.tokens[:CHECK_WINDOWS]))
        error = update = 0.0
        for q, f, x in zip(quantized, self.runner.residual, self.runner.entering, strict=False):
            for qv, fv, xv in zip(q, f, x, strict=True):
                error += float(np.sum((qv.astype(np.float64) - fv) ** 2))
                update += float(np.sum((fv.astype(np.float64) - xv) ** 2))
        self.errors[block.index] = error / max(update, 1e-30)

    def log_errors(self) -> None:
        """Log `errors`: the median and the worst blocks at INFO, every block at DEBUG."""
        if not self.errors:
            return
        worst = sorted(self.errors, key=self.errors.__getitem__, reverse=True)[:3]
        logger.info(
            "each quantized block against the float block on the same inputs (%d calibration windows), error / "
            "the block's update: median %.4f, worst %s",
            CHECK_WINDOWS,
            float(np.median(list(self.errors.values()))),
            ", ".join(f"{self.errors[b]:.4f} (block {b})" for b in worst),
        )
        logger.debug("per block: %s", {b: round(e, 6) for b, e in sorted(self.errors.items())})


CLIP_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(11))  # clip ratios searched, 0.50 ... 1.00
CLIP_WINDOWS = 8  # the first calibration windows, which the clip search reads
CLIP_ROWS = 1024  # input rows per site, spread evenly over those windows
CLIP_COLUMNS = 512  # output columns of the site's readers drawn to score a clip ratio


def relative_output_error(x_hat: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    """Mean over rows of ||x_hat w - x w||^2 / ||x w||^2: the readers' error, each token alike."""
    y = x @ w
    return float(((((x_hat @ w) - y) ** 2).sum(-1) / ((y**2).sum(-1) + 1e-12)).mean())


def best_clip(x: np.ndarray, w: np.ndarray, spec: ActSpec) -> float:
    """The ratio of `CLIP_GRID` whose per-token quantization of `x` (`spec`'s bits and symmetry) gives
    `x @ w` the smallest `relative_output_error`; ties go to the larger ratio."""
    errors = [relative_output_error(grid.fake_quant(x, spec.bits, spec.symmetric, c), x, w) for c in CLIP_GRID]
    return CLIP_GRID[len(errors) - 1 - int(np.argmin(errors[::-1]))]


def activation_clips(
    model: ir.Model, token_windows: np.ndarray, spec: ActSpec, scratch: Path | None = None, seed: int = 0
) -> dict[Site, float]:
    """Per projection input site, the clip ratio from `CLIP_GRID` of `spec`'s per-token quantizer that
    gives the site's readers (Q/K/V, O, gate/up or down, float weights) the smallest relative output
    error on `CLIP_ROWS` sampled input rows; ties go to the larger ratio."""
    desc = discover(model)
    readers: dict[Site, list[Linear]] = {}
    for block in desc.blocks:
        for role, lin in block_linears(block):
            readers.setdefault((block.index, ROLE_SITES[role]), []).append(lin)
    rng = np.random.default_rng([seed, 17])
    per_window = -(-CLIP_ROWS // len(token_windows))
    rows_per_window = token_windows.shape[1]  # one window per run: [1, seq, channels] -> seq rows
    picks = {  # drawn window by window, site by site, whatever order the probe runs in
        (w, site): rng.choice(rows_per_window, min(per_window, rows_per_window), replace=False)
        for w in range(len(token_windows))
        for site in projection_inputs(desc)
    }
    rows: dict[Site, list[np.ndarray]] = {}

    def add(site: Site, window: int, x: np.ndarray) -> None:
        rows.setdefault(site, []).append(x[picks[window, site]])

    _accumulate(model, token_windows, add, scratch, "calibrate (activation clip)")
    clips: dict[Site, float] = {}
    for site in projection_inputs(desc):  # the columns are drawn in site order
        parts = rows[site]
        w = np.concatenate([read_float64(lin.weight) for lin in distinct(readers[site])], axis=1)
        w = w[:, rng.choice(w.shape[1], min(CLIP_COLUMNS, w.shape[1]), replace=False)]
        clips[site] = best_clip(np.concatenate(parts)[:CLIP_ROWS], w.astype(np.float32), spec)
    logger.info("activation clip ratios: %s", sorted(clips.values()))
    return clips


class CalibratePass(ir.passes.InPlacePass):
    """The calibration stage: measure `statistic` ("absmax" for SmoothQuant, "hessian" for GPTQ, "clip"
    for the clip ratios of the per-token activation quantizer `spec`) of every projection input on
    `calibration.tokens` and set its field (`absmax`, `hessians` or `clips`), keyed by site.

    Rewrites nothing: the graph is unchanged; in-memory weights may move into `scratch` (computed once,
    see `rotgraph.probe.materialize`), which is why the result reports no modification.
    """

    def __init__(
        self, calibration: Calibration, statistic: str, scratch: Path | None = None, spec: ActSpec | None = None
    ) -> None:
        super().__init__()
        if statistic not in ("absmax", "hessian", "clip"):
            raise RotgraphError(f"unknown calibration statistic {statistic!r} (absmax, hessian, clip)")
        if statistic == "clip" and spec is None:
            raise RotgraphError("the clip statistic needs the activation quantizer's spec")
        self.calibration, self.statistic, self.scratch, self.spec = calibration, statistic, scratch, spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.statistic == "absmax":
            self.calibration.absmax = input_absmax(model, self.calibration.tokens, self.scratch)
        elif self.statistic == "clip":
            assert self.spec is not None
            tokens = self.calibration.tokens[:CLIP_WINDOWS]
            self.calibration.clips = activation_clips(model, tokens, self.spec, self.scratch)
        elif runs_by_block(model, "GPTQ"):
            # One block's Hessians at a time (an 8B block's take 2 GB): the quantizer reads them block by block.
            hessians = BlockHessians(self.calibration.tokens, self.scratch, sequential=False)
            hessians.start(model, discover(model))
            self.calibration.block_hessians = hessians
            logger.info("GPTQ Hessians block by block, each computed as its block is quantized")
        else:
            self.calibration.hessians = input_hessians(model, self.calibration.tokens, self.scratch)
        return ir.passes.PassResult(model, False)
