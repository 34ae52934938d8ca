"""Dynamic per-token quantization of every projection input."""

from __future__ import annotations

import logging

import onnx_ir as ir

from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


class QuantizeActivationsPass(ir.passes.InPlacePass):
    """Insert `rotgraph.FakeQuant` (per token: one scale per row of the last axis) on the inputs of
    Q/K/V (shared), O, gate/up (shared) and down in every block: what an integer MatMul would read.

    In a rotated model the down_proj input is the online Hadamard's output, so the rotated values are
    quantized. Guarantees: each distinct input is quantized once; lm_head's input stays float.
    """

    def __init__(self, spec: ActSpec) -> None:
        super().__init__()
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        count = 0
        for block in desc.blocks:
            a, m = block.attention, block.mlp
            for lin in (a.q, a.o, m.gate, m.down):  # k/v share q's input, up shares gate's
                insert_fake_quant(model, lin.input, self.spec)
                count += 1
        logger.info("per-token %d-bit activation quantization on %d inputs", self.spec.bits, count)
        return ir.passes.PassResult(model, True)
