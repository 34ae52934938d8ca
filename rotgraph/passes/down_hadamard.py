"""R4: online Hadamard on down_proj's input, its inverse folded into down_proj."""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import R4_KEY
from rotgraph.errors import StructureError
from rotgraph.hadamard import HadamardFactors
from rotgraph.online import factors_for, insert_hadamard
from rotgraph.structure import discover, is_hadamard
from rotgraph.weights import rewrite_initializer

logger = logging.getLogger(__name__)


def _hadamard_transpose_left(w: np.ndarray, factors: HadamardFactors) -> np.ndarray:
    """Step W -> H^T W, computed factored as (W^T H)^T: O(n (m + 2^k)) work per column and no n x n
    matrix (18944 x 18944 in float64 would be 2.9 GB)."""
    return np.ascontiguousarray(factors.apply(np.ascontiguousarray(w.T)).T)


class InsertDownHadamardPass(ir.passes.InPlacePass):
    """x @ W_down  ->  Hadamard(x) @ (H^T W_down) in every block, H the orthonormal Hadamard of order
    intermediate_size that the inserted op computes.

    Guarantees: exact in real arithmetic; the down_proj input (the activation with the worst outliers)
    is rotated online, and the weight rewrite costs one float32 rounding.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        for block in desc.blocks:
            down = block.mlp.down
            n = down.shape[0]
            if is_hadamard(down.input.producer()):
                raise StructureError(f"block {block.index}: down_proj already reads an online Hadamard")
            factors = factors_for(n, f"block {block.index} R4")
            insert_hadamard(model, down.input, factors)
            rewrite_initializer(down.weight, functools.partial(_hadamard_transpose_left, factors=factors))
        n = desc.blocks[0].mlp.down.shape[0]
        model.metadata_props[R4_KEY] = f"hadamard n{n}"
        logger.info("R4: online Hadamard before down_proj in %d blocks (n=%d)", len(desc.blocks), n)
        return ir.passes.PassResult(model, True)
