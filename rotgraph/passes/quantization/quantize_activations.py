"""Dynamic per-token quantization of every projection input."""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.results import Calibration
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


class QuantizeActivationsPass(ir.passes.InPlacePass):
    """Insert `rotgraph.FakeQuant` (per token: one scale per row of the last axis) on the inputs of
    Q/K/V (shared), O, gate/up (shared) and down in every block: what an integer MatMul would read.

    In a rotated model the down_proj input is the online Hadamard's output, so the rotated values are
    quantized. With `calibration`, each input gets its own clip ratio from `calibration.clips` (the clip
    search, `CalibratePass('clip')`, required) instead of `spec`'s; a site missing from it is an error.
    Guarantees: each distinct input is quantized once; lm_head's input stays float.
    """

    def __init__(self, spec: ActSpec, calibration: Calibration | None = None) -> None:
        super().__init__()
        self.spec, self.calibration = spec, calibration

    def requires(self, model: ir.Model) -> None:
        if self.calibration is not None:
            self.calibration.need(self.calibration.clips, "clips", self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        clips = None if self.calibration is None else self.calibration.need(self.calibration.clips, "clips", self)
        desc = discover(model)
        count = 0
        for block in desc.blocks:
            a, m = block.attention, block.mlp
            # k/v share q's input, up shares gate's
            for site, lin in (("qkv", a.q), ("o", a.o), ("gate_up", m.gate), ("down", m.down)):
                spec = self.spec
                if clips is not None:
                    if (block.index, site) not in clips:
                        raise RotgraphError(f"no calibrated clip ratio for the {site} input of block {block.index}")
                    spec = dataclasses.replace(spec, clip=clips[block.index, site])
                insert_fake_quant(model, lin.input, spec)
                count += 1
        logger.info("per-token %d-bit activation quantization on %d inputs", self.spec.bits, count)
        return ir.passes.PassResult(model, count > 0)
