"""SmoothQuant: migrate per-channel activation range into the weights that read the activation."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import SMOOTHQUANT_KEY
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.results import Calibration, Site
from rotgraph.structure import Linear, Norm, discover, distinct, is_rotgraph_op
from rotgraph.weights import read_float64, rewrite_initializer, row_wise, scale_rows

logger = logging.getLogger(__name__)


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (SmoothQuant, eq. 4), kept away from zero."""
    act = np.maximum(act_max, 1e-5)
    weight = np.maximum(weight_max, 1e-5)
    return np.maximum(act**alpha / weight ** (1.0 - alpha), 1e-5)


@row_wise
def _divide_last(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return w / s


@row_wise
def _divide_columns(w: np.ndarray, s: np.ndarray, columns: tuple[int, int] | None) -> np.ndarray:
    """w / s on the column range `columns` (V inside a packed QKV weight or bias), or on all of w."""
    if columns is None:
        return w / s
    out = w.copy()
    out[..., columns[0] : columns[1]] /= s
    return out


def _input_max(act_max: dict[Site, np.ndarray], block: int, site: str) -> np.ndarray:
    if (block, site) not in act_max:
        raise StructureError(f"block {block}: no calibrated activation range for the {site!r} projection input")
    return act_max[block, site]


def _row_max(linears: list[Linear]) -> np.ndarray:
    return np.max([np.abs(read_float64(lin.weight)).max(axis=1) for lin in linears], axis=0)


class SmoothQuantPass(ir.passes.InPlacePass):
    """Divide each smoothed activation by s per channel and multiply the weight rows that read it by s.

    Sites, in every block (X' = X / s, W' = diag(s) W, the product unchanged):
    - attention norm -> Q/K/V and MLP norm -> gate/up: 1/s goes into the norm's scale;
    - V -> O: 1/s goes into V's weight columns (and bias); attention is linear in V and never mixes
      channels, and with grouped-query attention each KV head's s is shared by the query heads
      that read it (their maxima are pooled);
    - up -> down: 1/s goes into up's weight columns (and bias); down reads silu(gate) * up, linear in
      up. Skipped when an online Hadamard (R4) sits before down: its input is then the Hadamard's
      output, which no foldable scale reaches.

    Requires `calibration.absmax` (`CalibratePass('absmax')`): max |x| per channel of each projection
    input, keyed by structural site (block index, "qkv" | "o" | "gate_up" | "down"), measured on this
    model as it is now. s follows SmoothQuant with migration strength `alpha`. Guarantees: exact in real
    arithmetic (float64, one rounding per rewritten tensor).
    """

    def __init__(self, calibration: Calibration, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise RotgraphError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
        self.calibration = calibration
        self.alpha = alpha

    def requires(self, model: ir.Model) -> None:
        self.calibration.need(self.calibration.absmax, "absmax", self)

    def _smooth_norm(self, norm: Norm, readers: list[Linear], act_max: np.ndarray) -> None:
        s = smoothing_scales(act_max, _row_max(readers), self.alpha)
        if len(norm.scale.uses()) > 1:
            raise StructureError(f"norm {norm.node.name!r} shares its scale initializer with another node")
        rewrite_initializer(norm.scale, functools.partial(_divide_last, s=s))
        for lin in readers:
            rewrite_initializer(lin.weight, functools.partial(scale_rows, s=s))

    def _smooth_value_output(
        self, v: Linear, o: Linear, act_max: np.ndarray, heads: int, kv_heads: int, head_dim: int
    ) -> None:
        group = heads // kv_heads  # query heads per KV head (query head h reads KV head h // group)
        pooled_act = act_max.reshape(kv_heads, group, head_dim).max(axis=1)
        pooled_weight = _row_max([o]).reshape(kv_heads, group, head_dim).max(axis=1)
        s_kv = smoothing_scales(pooled_act, pooled_weight, self.alpha).reshape(-1)
        s_q = np.repeat(s_kv.reshape(kv_heads, 1, head_dim), group, axis=1).reshape(-1)
        step = functools.partial(_divide_columns, s=s_kv, columns=v.columns)
        rewrite_initializer(v.weight, step)
        if v.bias is not None:
            rewrite_initializer(v.bias, step)
        rewrite_initializer(o.weight, functools.partial(scale_rows, s=s_q))

    def _smooth_up_down(self, up: Linear, down: Linear, act_max: np.ndarray) -> None:
        s = smoothing_scales(act_max, _row_max([down]), self.alpha)
        rewrite_initializer(up.weight, functools.partial(_divide_last, s=s))
        if up.bias is not None:
            rewrite_initializer(up.bias, functools.partial(_divide_last, s=s))
        rewrite_initializer(down.weight, functools.partial(scale_rows, s=s))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        act_max = self.calibration.need(self.calibration.absmax, "absmax", self)
        desc = discover(model)
        sites = 0
        skipped_down = skipped_o = 0
        for block in desc.blocks:
            a, m = block.attention, block.mlp
            i = block.index
            self._smooth_norm(block.attn_norm, distinct([a.q, a.k, a.v]), _input_max(act_max, i, "qkv"))
            if is_rotgraph_op(a.o.input.producer()):  # an online Hadamard mixes the heads O reads
                skipped_o += 1
            else:
                self._smooth_value_output(
                    a.v, a.o, _input_max(act_max, i, "o"), a.num_heads, a.num_kv_heads, a.head_dim
                )
                sites += 1
            self._smooth_norm(block.mlp_norm, [m.gate, m.up], _input_max(act_max, i, "gate_up"))
            sites += 2
            if is_rotgraph_op(m.down.input.producer()):
                skipped_down += 1
            else:
                self._smooth_up_down(m.up, m.down, _input_max(act_max, i, "down"))
                sites += 1
        model.metadata_props[SMOOTHQUANT_KEY] = json.dumps({"alpha": self.alpha, "sites": sites})
        logger.info(
            "SmoothQuant (alpha %.2f): %d sites; skipped for an online Hadamard before down_proj in %d blocks, "
            "before o_proj in %d",
            self.alpha,
            sites,
            skipped_down,
            skipped_o,
        )
        return ir.passes.PassResult(model, sites > 0)
