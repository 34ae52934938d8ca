"""R2: rotate each attention head's value space, folded into V and O."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.hadamard import random_rotation
from rotgraph.structure import discover
from rotgraph.weights import rewrite_initializer

logger = logging.getLogger(__name__)


def _rotate_columns(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """[..., heads * d] -> each head's d columns times h."""
    lead = w.shape[:-1]
    d = h.shape[0]
    return (w.reshape(*lead, -1, d) @ h).reshape(w.shape)


def _rotate_rows(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """[heads * d, out] -> h^T times each head's d rows."""
    d = h.shape[0]
    return np.einsum("ji,hjk->hik", h, w.reshape(-1, d, w.shape[1])).reshape(w.shape)


def head_rotations(d: int, layers: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """QuaRot's R2 of every layer (head_dim d): randomized Hadamards drawn in layer order from
    `default_rng([seed, 2])`, with their kind."""
    rng = np.random.default_rng([seed, 2])
    return [random_rotation(d, rng, what=f"R2 of layer {i}") for i in range(layers)]


class RotateHeadsPass(ir.passes.InPlacePass):
    """Per layer, V's output and O's input are rotated by the same head_dim x head_dim matrix H.

    V weight columns (and bias) of every KV head: W_v -> W_v H; O weight rows of every query head:
    W_o -> H^T W_o. Attention mixes positions, never coordinates within a head, so head i's output P_i
    V_g(i) H meets H^T in O: exact for grouped-query attention too, since all heads share H. H comes
    from `rotations[layer]` when given, else is a randomized Hadamard drawn from
    `numpy.random.default_rng([seed, 2])`, layer by layer. Guarantees: exact in real arithmetic.
    """

    def __init__(self, seed: int = 0, rotations: tuple[np.ndarray, ...] | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.rotations = rotations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        if self.rotations is not None and len(self.rotations) != len(desc.blocks):
            raise RotgraphError(f"R2 needs {len(desc.blocks)} matrices, got {len(self.rotations)}")
        d = desc.blocks[0].attention.head_dim
        drawn = head_rotations(d, len(desc.blocks), self.seed) if self.rotations is None else None
        kinds = set()
        for block in desc.blocks:
            attn = block.attention
            if attn.head_dim != d:
                raise RotgraphError(f"layer {block.index} has head_dim {attn.head_dim}, layer 0 has {d}")
            if drawn is not None:
                h, kind = drawn[block.index]
            else:
                assert self.rotations is not None
                h, kind = np.asarray(self.rotations[block.index], dtype=np.float64), "given"
                if h.shape != (d, d):
                    raise RotgraphError(f"R2 of layer {block.index} must be {d} x {d}, got {h.shape}")
            kinds.add(kind)
            rewrite_initializer(attn.v.weight, functools.partial(_rotate_columns, h=h))
            if attn.v.bias is not None:
                rewrite_initializer(attn.v.bias, functools.partial(_rotate_columns, h=h))
            rewrite_initializer(attn.o.weight, functools.partial(_rotate_rows, h=h))
        model.metadata_props["rotgraph.r2"] = json.dumps({"kind": sorted(kinds), "seed": self.seed})
        logger.info("R2: rotated V/O of %d layers (head_dim %d)", len(desc.blocks), desc.blocks[0].attention.head_dim)
        return ir.passes.PassResult(model, True)
