"""Learned per-channel scaling, folded exactly beside the rotations (OSTQuant's scaling matrices)."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import SCALES_KEY
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.rotations import Scales
from rotgraph.structure import Norm, discover, distinct, r2_pairs
from rotgraph.weights import rewrite_initializer, row_wise, scale_rows

logger = logging.getLogger(__name__)


@row_wise
def divide_columns(w: np.ndarray, s: np.ndarray, columns: tuple[int, int] | None) -> np.ndarray:
    """w / s on the last axis, on the column range `columns` (V inside a packed QKV) or on all of w."""
    out = w.copy()
    if columns is None:
        out /= s
    else:
        out[..., columns[0] : columns[1]] /= s
    return out


def query_head_scales(s_kv: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """V's scale per KV-head channel repeated for the query heads that read each KV head (O's rows)."""
    group = num_heads // num_kv_heads
    return np.repeat(s_kv.reshape(num_kv_heads, 1, head_dim), group, axis=1).reshape(-1)


class ScaleChannelsPass(ir.passes.InPlacePass):
    """Divide activations by learned positive scales per channel and multiply the weight rows reading them.

    Sites per layer (`scales[(layer, site)]`, any subset):
    - "attn", "mlp": the norm's output. The norm's scale (ones after `FuseNormScalesPass`, the rotated
      stream's norm) becomes g / s and the rows of Q/K/V, resp. gate/up, are multiplied by s;
    - "v": V's output columns per KV head (and bias) are divided by s and O's rows per query head
      multiplied by the s of the KV head it reads; attention is linear in V and mixes no channels.
    Run after R1/R2 (the scales act on the rotated basis). Guarantees: exact in real arithmetic (float64,
    one rounding per rewritten tensor); a scale of the wrong size or an unknown layer is refused.
    """

    def __init__(self, scales: Scales) -> None:
        super().__init__()
        self.scales = scales

    def _norm(self, norm: Norm, readers: list, s: np.ndarray, where: str) -> None:
        if len(norm.scale.uses()) > 1:
            raise StructureError(f"norm {norm.node.name!r} shares its scale initializer with another node")
        size = norm.scale.shape[-1] if norm.scale.shape is not None else None
        if size != s.shape[0]:
            raise RotgraphError(f"{where}: scale has {s.shape[0]} channels, the norm {size}")
        rewrite_initializer(norm.scale, functools.partial(divide_columns, s=s, columns=None))
        for lin in distinct(readers):
            rewrite_initializer(lin.weight, functools.partial(scale_rows, s=s))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        layers = len(desc.blocks)
        unknown = sorted(key for key in self.scales if not 0 <= key[0] < layers)
        if unknown:
            raise RotgraphError(f"scales for layers {unknown} but the model has {layers}")
        pairs = r2_pairs(desc)
        for block in desc.blocks:
            i, a, m = block.index, block.attention, block.mlp
            if (i, "attn") in self.scales:
                self._norm(block.attn_norm, [a.q, a.k, a.v], self.scales[i, "attn"], f"layer {i} attn")
            if (i, "mlp") in self.scales:
                self._norm(block.mlp_norm, [m.gate, m.up], self.scales[i, "mlp"], f"layer {i} mlp")
            if (i, "v") in self.scales:
                pair, s = pairs[i], self.scales[i, "v"]
                if s.shape[0] != pair.num_kv_heads * pair.head_dim:
                    raise RotgraphError(
                        f"layer {i} v: scale has {s.shape[0]} channels, V has {pair.num_kv_heads * pair.head_dim}"
                    )
                step = functools.partial(divide_columns, s=s, columns=pair.v.columns)
                rewrite_initializer(pair.v.weight, step)
                if pair.v.bias is not None:
                    rewrite_initializer(pair.v.bias, step)
                s_q = query_head_scales(s, pair.num_heads, pair.num_kv_heads, pair.head_dim)
                rewrite_initializer(pair.o.weight, functools.partial(scale_rows, s=s_q))
        model.metadata_props[SCALES_KEY] = json.dumps(sorted(f"{site}.{i}" for i, site in self.scales))
        logger.info("scaled %d sites by learned per-channel scales", len(self.scales))
        return ir.passes.PassResult(model, bool(self.scales))
