"""Quantize keys and values where a KV cache would store them."""

from __future__ import annotations

import logging

import onnx_ir as ir

from rotgraph.errors import StructureError
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.structure import discover, is_hadamard

logger = logging.getLogger(__name__)


class QuantizeKVCachePass(ir.passes.InPlacePass):
    """Insert `rotgraph.FakeQuant` per token and KV head (groups of head_dim, or `spec.group`) on the
    keys after RoPE (and after the R3 Hadamard when present) and on the values in [batch, kv_heads, seq,
    head_dim] layout, both before the grouped-query repeat: the tensors a KV cache stores.
    """

    def __init__(self, spec: ActSpec) -> None:
        super().__init__()
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        for block in desc.blocks:
            a = block.attention
            if a.k_rope is None or a.v_cache is None:
                raise StructureError(f"block {block.index}: cannot find where keys and values enter the cache")
            keys = a.k_rope
            hadamards = [c for c in keys.consumers() if is_hadamard(c)]
            if hadamards:
                keys = hadamards[0].outputs[0]
            if self.spec.group and a.head_dim % self.spec.group:
                raise StructureError(f"KV group {self.spec.group} does not divide head_dim {a.head_dim}")
            for value in (keys, a.v_cache):
                insert_fake_quant(model, value, self.spec)
        logger.info("KV cache: %d-bit keys and values in %d blocks", self.spec.bits, len(desc.blocks))
        return ir.passes.PassResult(model, True)
