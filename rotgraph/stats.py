"""Activation outlier statistics: the picture rotation exists for.

For every block, two activations are recorded on real text with onnxruntime: the residual stream
entering the block and the input of down_proj (after the online Hadamard in a rotated model: what a
quantizer would see). For each: max|x| / RMS(x) over the whole tensor, and the per-token kurtosis
E[(x - mean)^4] / var^2 over channels, averaged over tokens (3 for a Gaussian).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rotgraph import io
from rotgraph.fakequant import ActSpec
from rotgraph.pipeline import canonicalize
from rotgraph.probe import probe


@dataclass
class _Accumulator:
    act: ActSpec | None = None  # per-token quantizer whose error is recorded
    max_abs: float = 0.0
    sum_sq: float = 0.0
    count: int = 0
    kurtosis_sum: float = 0.0
    tokens: int = 0
    channel_max: np.ndarray | None = None
    error_sq: float = 0.0

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        channel = np.abs(x).max(axis=0)
        self.channel_max = channel if self.channel_max is None else np.maximum(self.channel_max, channel)
        self.max_abs = max(self.max_abs, float(np.abs(x).max()))
        if self.act is not None:
            self.error_sq += float(((self.act.reference(x) - x) ** 2).sum())
        self.sum_sq += float((x**2).sum())
        self.count += x.size
        c = x - x.mean(axis=1, keepdims=True)
        var = (c**2).mean(axis=1)
        self.kurtosis_sum += float(((c**4).mean(axis=1) / np.maximum(var, 1e-30) ** 2).sum())
        self.tokens += x.shape[0]

    @property
    def max_over_rms(self) -> float:
        return self.max_abs / np.sqrt(self.sum_sq / self.count)

    @property
    def kurtosis(self) -> float:
        return self.kurtosis_sum / self.tokens

    @property
    def relative_error(self) -> float:
        """||Q(x) - x||^2 / ||x||^2 of the per-token quantizer over everything seen."""
        return self.error_sq / self.sum_sq


@dataclass(frozen=True)
class ActivationStats:
    layer: int
    residual_max_over_rms: float
    residual_kurtosis: float
    down_max_over_rms: float
    down_kurtosis: float
    residual_channel_max: np.ndarray = field(compare=False, repr=False)
    down_channel_max: np.ndarray = field(compare=False, repr=False)
    residual_quant_error: float | None = None  # relative squared error of `act` per-token quantization
    down_quant_error: float | None = None


def activation_stats(
    model_path: Path, token_windows: np.ndarray, act: ActSpec | None = None, scratch: Path | None = None
) -> list[ActivationStats]:
    """Per-block statistics of the residual stream entering each block and of down_proj's input, on
    `token_windows` [n, seq]; with `act`, also the relative error of that per-token quantizer on them.
    `scratch`: a folder for weights that canonicalization rewrote in memory (see `rotgraph.probe`)."""
    model = io.load_model(model_path)
    desc = canonicalize(model)
    values = [v for block in desc.blocks for v in (block.residual_in, block.mlp.down_input)]
    acc = [_Accumulator(act) for _ in values]
    for p in probe(model, values, token_windows, scratch=scratch, what="statistics"):
        acc[p.value].add(p.array)
    stats = []
    for i in range(len(desc.blocks)):
        res, down = acc[2 * i], acc[2 * i + 1]
        assert res.channel_max is not None and down.channel_max is not None
        stats.append(
            ActivationStats(
                i,
                res.max_over_rms,
                res.kurtosis,
                down.max_over_rms,
                down.kurtosis,
                res.channel_max,
                down.channel_max,
                res.relative_error if act else None,
                down.relative_error if act else None,
            )
        )
    return stats


def format_table(before: list[ActivationStats], after: list[ActivationStats] | None = None) -> str:
    """A markdown table of per-layer statistics, before -> after rotation when `after` is given."""
    head = "| layer | residual max/RMS | residual kurtosis | down_proj in max/RMS | down_proj in kurtosis |"
    rows = [head, "|---|---|---|---|---|"]
    for i, b in enumerate(before):
        if after is None:
            cells = [
                f"{b.residual_max_over_rms:.1f}",
                f"{b.residual_kurtosis:.1f}",
                f"{b.down_max_over_rms:.1f}",
                f"{b.down_kurtosis:.1f}",
            ]
        else:
            a = after[i]
            cells = [
                f"{b.residual_max_over_rms:.1f} -> {a.residual_max_over_rms:.1f}",
                f"{b.residual_kurtosis:.1f} -> {a.residual_kurtosis:.1f}",
                f"{b.down_max_over_rms:.1f} -> {a.down_max_over_rms:.1f}",
                f"{b.down_kurtosis:.1f} -> {a.down_kurtosis:.1f}",
            ]
        rows.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
