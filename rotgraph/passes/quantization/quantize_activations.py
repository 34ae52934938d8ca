"""Dynamic per-token quantization of every projection input."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


class QuantizeActivationsPass(ir.passes.InPlacePass):
    """Insert `rotgraph.FakeQuant` (per token: one scale per row of the last axis) on the inputs of
    Q/K/V (shared), O, gate/up (shared) and down in every block: what an integer MatMul would read.

    In a rotated model the down_proj input is the online Hadamard's output, so the rotated values are
    quantized. With `clips` (site -> clip ratio, e.g. `rotgraph.calibrate.activation_clips`, read when
    the pass runs) each input gets its own clip ratio instead of `spec`'s; a site missing from it is an
    error. Guarantees: each distinct input is quantized once; lm_head's input stays float.
    """

    def __init__(self, spec: ActSpec, clips: Mapping[tuple[int, str], float] | None = None) -> None:
        super().__init__()
        self.spec, self.clips = spec, clips

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        desc = discover(model)
        count = 0
        for block in desc.blocks:
            a, m = block.attention, block.mlp
            # k/v share q's input, up shares gate's
            for site, lin in (("qkv", a.q), ("o", a.o), ("gate_up", m.gate), ("down", m.down)):
                spec = self.spec
                if self.clips is not None:
                    if (block.index, site) not in self.clips:
                        raise RotgraphError(f"no calibrated clip ratio for the {site} input of block {block.index}")
                    spec = dataclasses.replace(spec, clip=self.clips[block.index, site])
                insert_fake_quant(model, lin.input, spec)
                count += 1
        logger.info("per-token %d-bit activation quantization on %d inputs", self.spec.bits, count)
        return ir.passes.PassResult(model, count > 0)
