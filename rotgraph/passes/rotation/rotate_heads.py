"""R2: rotate each attention head's value space, folded into V and O."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import R2_KEY
from rotgraph.errors import RotgraphError
from rotgraph.hadamard import dense, random_rotation
from rotgraph.structure import discover, r2_pairs, rotate_head_columns_in, rotate_head_rows
from rotgraph.weights import rewrite_initializer

logger = logging.getLogger(__name__)


def head_rotations(d: int, layers: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """QuaRot's R2 of every layer (head_dim d): randomized Hadamards drawn in layer order from
    `default_rng([seed, 2])`, with their kind. Dense: a d x d product per head is cheap at head sizes."""
    rng = np.random.default_rng([seed, 2])
    drawn = [random_rotation(d, rng, what=f"R2 of layer {i}") for i in range(layers)]
    return [(dense(h), kind) for h, kind in drawn]


class RotateHeadsPass(ir.passes.InPlacePass):
    """Per layer, V's output and O's input are rotated by the same head_dim x head_dim matrix H.

    V weight columns (and bias) of every KV head: W_v -> W_v H; O weight rows of every query head:
    W_o -> H^T W_o (the sites of `rotgraph.structure.r2_pairs`); in a packed QKV MatMul only V's column
    range (and bias range) rotates. Attention mixes positions, never
    coordinates within a head, so head i's output P_i V_g(i) H meets H^T in O: exact for grouped-query
    attention too, since all heads share H. H comes from `rotations[layer]` when given, else is a
    randomized Hadamard drawn from `numpy.random.default_rng([seed, 2])`, layer by layer.
    Guarantees: exact in real arithmetic.
    """

    def __init__(self, seed: int = 0, rotations: tuple[np.ndarray, ...] | None = None) -> None:
        super().__init__()
        self.seed = seed
        self.rotations = rotations

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        pairs = r2_pairs(desc)
        if self.rotations is not None and len(self.rotations) != len(pairs):
            raise RotgraphError(f"R2 needs {len(pairs)} matrices, got {len(self.rotations)}")
        d = pairs[0].head_dim
        drawn = head_rotations(d, len(pairs), self.seed) if self.rotations is None else None
        kinds = set()
        for pair in pairs:
            if pair.head_dim != d:
                raise RotgraphError(f"layer {pair.layer} has head_dim {pair.head_dim}, layer 0 has {d}")
            if drawn is not None:
                h, kind = drawn[pair.layer]
            else:
                assert self.rotations is not None
                h, kind = np.asarray(self.rotations[pair.layer], dtype=np.float64), "given"
                if h.shape != (d, d):
                    raise RotgraphError(f"R2 of layer {pair.layer} must be {d} x {d}, got {h.shape}")
            kinds.add(kind)
            v_step = functools.partial(rotate_head_columns_in, h=h, columns=pair.v.columns)
            rewrite_initializer(pair.v.weight, v_step)
            if pair.v.bias is not None:
                rewrite_initializer(pair.v.bias, v_step)
            rewrite_initializer(pair.o.weight, functools.partial(rotate_head_rows, h=h))
        model.metadata_props[R2_KEY] = json.dumps({"kind": sorted(kinds), "seed": self.seed})
        logger.info("R2: rotated V/O of %d layers (head_dim %d)", len(pairs), d)
        return ir.passes.PassResult(model, bool(pairs))
