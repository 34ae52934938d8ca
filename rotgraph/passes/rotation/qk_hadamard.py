"""R3: online Hadamard on queries and keys after RoPE."""

from __future__ import annotations

import logging

import onnx_ir as ir

from rotgraph.constants import R3_KEY
from rotgraph.errors import StructureError
from rotgraph.online import factors_for, insert_hadamard
from rotgraph.structure import discover, is_hadamard

logger = logging.getLogger(__name__)


class InsertQKHadamardPass(ir.passes.InPlacePass):
    """Insert rotgraph `Hadamard` ops on the RoPE outputs of Q and K in every block.

    (Q H)(K H)^T = Q K^T for orthonormal H, so the scores are unchanged while the keys that a KV cache
    stores (and the queries) lose their outliers. Placed right after RoPE, before any GQA repeat, on the
    head_dim axis. Guarantees: exact in real arithmetic; fails if RoPE is not found or the RoPE output's
    last axis is not head_dim.

    Attention fused into an op that applies RoPE itself (GroupQueryAttention do_rotary=1) leaves no place
    between RoPE and the scores: that is an error, or, with `skip_rope_inside` (R3 wanted but not
    required, as by `rotate` with a float KV cache), such blocks are skipped with a warning.
    """

    def __init__(self, skip_rope_inside: bool = False) -> None:
        super().__init__()
        self.skip_rope_inside = skip_rope_inside

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        inserted = 0
        for block in desc.blocks:
            attn = block.attention
            where = f"block {block.index}"
            if attn.rope_inside:
                if self.skip_rope_inside:
                    logger.warning("%s: no R3: RoPE is inside the fused %s", where, attn.scores.op_type)
                    continue
                raise StructureError(
                    f"{where}: R3 needs RoPE outside the fused attention, but {attn.scores.op_type} "
                    f"{attn.scores.name!r} applies it inside (do_rotary=1), before the scores"
                )
            factors = factors_for(attn.head_dim, f"{where} R3")
            for name, value in (("query", attn.q_rope), ("key", attn.k_rope)):
                if value is None:
                    raise StructureError(
                        f"{where}: expected RoPE (Add(Mul(x, cos), Mul(rotate_half(x), sin)) or RotaryEmbedding) "
                        f"before the {name} operand of the score MatMul {attn.scores.name!r}"
                    )
                if any(is_hadamard(c) for c in value.consumers()):
                    raise StructureError(f"{where}: the {name} already has an online Hadamard")
                last = value.shape[-1] if value.shape is not None and len(value.shape) else None
                if last is not None and last != attn.head_dim:  # unknown: an op shape inference cannot see
                    raise StructureError(
                        f"{where}: the {name} RoPE output {value.name!r} has last axis {last}, expected head_dim "
                        f"{attn.head_dim}"
                    )
                insert_hadamard(model, value, factors)
            inserted += 1
        if not inserted:
            model.metadata_props[R3_KEY] = "none: RoPE inside the fused attention"
            return ir.passes.PassResult(model, False)
        model.metadata_props[R3_KEY] = f"hadamard n{desc.blocks[0].attention.head_dim}"
        logger.info("R3: online Hadamard on Q and K in %d of %d blocks", inserted, len(desc.blocks))
        return ir.passes.PassResult(model, True)
