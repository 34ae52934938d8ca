"""Record where the blocks of a graph begin, for graphs lowered later."""

from __future__ import annotations

import json

import onnx_ir as ir

from rotgraph.constants import BLOCKS_KEY
from rotgraph.segments import boundaries
from rotgraph.structure import discover


class RecordBlocksPass(ir.passes.InPlacePass):
    """Record the names of the `boundaries` in the model's metadata (`BLOCKS_KEY`), so a graph whose
    blocks discovery cannot read any more (lowered for onnxruntime) can still be cut (`cuts`).
    Rewrites no node."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = [v.name for v in boundaries(discover(model))]
        old = model.metadata_props.get(BLOCKS_KEY)
        model.metadata_props[BLOCKS_KEY] = json.dumps(names)
        return ir.passes.PassResult(model, old != model.metadata_props[BLOCKS_KEY])
