"""The torch fake quantizers that rotations are learned through, with straight-through rounding.

Each computes the grid of the quantizer it stands for, on torch tensors so that gradients pass:
- `fake_quant`: the dynamic quantizer of activations and the KV cache (rotgraph's `FakeQuant` op,
  `rotgraph.fakequant.ActSpec`): per row of the last axis or per group, symmetric or asymmetric, with
  the spec's clipping ratio; `tests/test_learn.py` compares it with `ActSpec.reference`.
- `weight_fake_quant`: the weights' symmetric RTN in groups (`rotgraph.quant.quantize_rtn` without the
  clipping search), and `WeightQuantizer`, the same through `torch.compile`.
- `Quantizers`: a scheme's quantizers as the layer-wise output-error objective applies them.
The grids and the arithmetic are those of `rotgraph.grid`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rotgraph import grid
from rotgraph.fakequant import ActSpec

logger = logging.getLogger(__name__)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """`ActSpec.reference` in torch with straight-through rounding: per row of the last axis (or of
    `spec.group` elements), symmetric or asymmetric, with spec's clipping ratio."""
    g = spec.group or x.shape[-1]
    xr = x.reshape(-1, g)
    if spec.symmetric:
        scale = torch.clamp(xr.abs().amax(-1, keepdim=True) * grid.symmetric_ratio(spec.bits, spec.clip), min=grid.EPS)
        y = torch.clamp(round_ste(xr / scale), spec.qmin, spec.qmax) * scale
    else:
        hi = torch.clamp(xr.amax(-1, keepdim=True), min=0) * grid.clip_value(spec.clip)
        lo = torch.clamp(xr.amin(-1, keepdim=True), max=0) * grid.clip_value(spec.clip)
        scale = torch.clamp((hi - lo) / spec.qmax, min=grid.EPS)
        zero = round_ste(-lo / scale)
        y = (torch.clamp(round_ste(xr / scale) + zero, 0, spec.qmax) - zero) * scale
    return y.reshape(x.shape)


def weight_fake_quant(w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
    """Symmetric RTN of `w` in groups of `group` (0: the whole axis) along `axis`, straight-through."""
    axis %= w.dim()
    n = w.shape[axis]
    g = group or n
    grouped = w.reshape(*w.shape[:axis], n // g, g, *w.shape[axis + 1 :])  # a view: no transpose
    qmax = grid.qmax(bits, True)
    scale = torch.clamp(grouped.abs().amax(axis + 1, keepdim=True) / qmax, min=grid.EPS)
    q = torch.clamp(round_ste(grouped / scale), grid.qmin(bits, True), qmax) * scale
    return q.reshape(w.shape)


class WeightQuantizer:
    """`weight_fake_quant`, optionally through `torch.compile` (one graph for all weight shapes): the
    weights' RTN is about 25 elementwise passes over every weight per step, which the compiler fuses.
    Where compiling fails (no C++ compiler, an unsupported torch build) the first call says why, once,
    and every call runs eagerly; the results are the same either way."""

    def __init__(self, compiled: bool) -> None:
        self._fn: Callable[..., torch.Tensor] = weight_fake_quant
        if compiled:
            self._fn = torch.compile(weight_fake_quant, dynamic=True)

    def __call__(self, w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
        if self._fn is weight_fake_quant:
            return weight_fake_quant(w, bits, group, axis)
        try:
            return self._fn(w, bits, group, axis)
        except Exception as error:  # torch's compiler stack raises many kinds; the eager path is exact
            logger.warning("torch.compile of the weight quantizer failed, running it eagerly: %s", error)
            self._fn = weight_fake_quant
            return weight_fake_quant(w, bits, group, axis)


@dataclass(frozen=True)
class Quantizers:
    """The scheme's quantizers as the output-error objective applies them (None / 16: float)."""

    act: ActSpec | None
    kv: ActSpec | None
    weight_bits: int
    group: int
    # the orthonormal Hadamard [n, n] of the online transform before o_proj (`InsertOutHadamardPass`), or None
    out_hadamard: torch.Tensor | None = None

    def weights(self, w: torch.Tensor) -> torch.Tensor:
        """RTN of `w` [in, out] in groups along its input rows, as `rotgraph quantize` groups them."""
        return w if self.weight_bits >= 16 else weight_fake_quant(w, self.weight_bits, self.group, 0)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else fake_quant(x, self.act)

    def o_projection(self, z: torch.Tensor, w: torch.Tensor, center: bool = False) -> torch.Tensor:
        """O's quantized output for its input rows `z` and weight `w` [heads * d, out]; with the online
        Hadamard H before o_proj, O reads z H through H^T w; with `center`, the rows' mean is subtracted
        before the quantizer and added back through the float weight (`quantize --set activations.center=true`)."""
        mean = z.mean(0) if center else None
        x, wx = (z, w) if mean is None else (z - mean, w)
        if self.out_hadamard is not None:
            x, wx = x @ self.out_hadamard, self.out_hadamard.T @ wx
        out = self.activations(x) @ self.weights(wx)
        return out if mean is None else out + mean @ w
