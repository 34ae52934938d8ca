"""Online Hadamard on o_proj's input (QuaRot's), its inverse folded into o_proj."""

from __future__ import annotations

import logging

import onnx_ir as ir

from rotgraph.constants import OUT_HADAMARD_KEY
from rotgraph.online import hadamard_before
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


class InsertOutHadamardPass(ir.passes.InPlacePass):
    """x @ W_o  ->  Hadamard(x) @ (H^T W_o) in every block, H the orthonormal Hadamard of order
    num_heads x head_dim that the inserted op computes.

    R2 rotates each head's rows of O on its own, so the heads' outputs keep their different ranges and
    one per-token scale serves all of them badly; a Hadamard across the whole input mixes the heads (as
    QuaRot's online Hadamard before out_proj does). Run it after R2 (`RotateHeadsPass`): R2 indexes O's
    rows by head. Guarantees: exact in real arithmetic, one float32 rounding of each O weight.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        for block in desc.blocks:
            hadamard_before(model, block.attention.o, f"block {block.index} O Hadamard")
        n = desc.blocks[0].attention.o.shape[0]
        model.metadata_props[OUT_HADAMARD_KEY] = f"hadamard n{n}"
        logger.info("online Hadamard before o_proj in %d blocks (n=%d)", len(desc.blocks), n)
        return ir.passes.PassResult(model, True)  # discover finds at least one block (or raises): each got its Hadamard
