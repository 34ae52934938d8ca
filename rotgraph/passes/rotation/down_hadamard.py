"""R4: online Hadamard on down_proj's input, its inverse folded into down_proj."""

from __future__ import annotations

import logging

import onnx_ir as ir

from rotgraph.constants import R4_KEY
from rotgraph.online import hadamard_before
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


class InsertDownHadamardPass(ir.passes.InPlacePass):
    """x @ W_down  ->  Hadamard(x) @ (H^T W_down) in every block, H the orthonormal Hadamard of order
    intermediate_size that the inserted op computes.

    Guarantees: exact in real arithmetic; the down_proj input (the activation with the worst outliers)
    is rotated online, and the weight rewrite costs one float32 rounding.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        for block in desc.blocks:
            hadamard_before(model, block.mlp.down, f"block {block.index} R4")
        n = desc.blocks[0].mlp.down.shape[0]
        model.metadata_props[R4_KEY] = f"hadamard n{n}"
        logger.info("R4: online Hadamard before down_proj in %d blocks (n=%d)", len(desc.blocks), n)
        return ir.passes.PassResult(model, True)  # discover finds at least one block (or raises): each got its Hadamard
