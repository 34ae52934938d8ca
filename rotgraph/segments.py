"""Cut a decoder graph into segments that run one after another: the embedding, each decoder block and
the head, joined by the residual stream.

Segment k (0 <= k <= L + 1 for L blocks) computes the residual stream entering block k (the embedding
for k = 0) from the one entering block k - 1; the last segment, the head, reads the last block's output.
A segment's graph holds only the nodes its outputs need, cut at its input boundary: the small nodes that
every block shares (the causal mask, RoPE angles from the positions) are recomputed in each segment, the
weights are those of its own block. So onnxruntime loads one block's weights at a time, whatever the
depth (`rotgraph.probe` runs calibration this way for models too large to load whole).

The boundaries are structural (`ModelDescription.blocks[k].residual_in`), never names, in any graph that
structure discovery reads. A graph rotgraph lowered for onnxruntime (MatMulNBits, fused norms, which
discovery does not read) is cut where the canonical form recorded them (`BLOCKS_KEY`): a residual sum that
a fused norm also normalizes (SkipSimplifiedLayerNormalization's sum output) is cut at that norm's inputs,
so the norm runs in the block it starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from rotgraph.constants import BLOCKS_KEY
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.structure import ModelDescription, discover

Cut = tuple[ir.Value, ...]  # the values that carry the residual stream across one boundary


def boundaries(desc: ModelDescription) -> list[ir.Value]:
    """The residual stream entering each block, then the last block's output (L + 1 values)."""
    return [b.residual_in for b in desc.blocks] + [desc.blocks[-1].residual_out]


def cuts(model: ir.Model) -> list[Cut]:
    """The L + 1 cuts between the segments of `model`: discovered, else recorded (`RecordBlocksPass`);
    the discovery error when neither is possible."""
    try:
        return [(v,) for v in boundaries(discover(model))]
    except RotgraphError:
        recorded = model.metadata_props.get(BLOCKS_KEY)
        if recorded is None:
            raise
    values = {v.name: v for node in model.graph for v in node.outputs}
    found = []
    for name in json.loads(recorded):
        value = values.get(name)
        if value is None:
            raise StructureError(f"the block boundary {name!r} recorded in {BLOCKS_KEY} is not in the graph")
        node = value.producer()
        assert node is not None
        shared = any(o is not value and (o.uses() or o.is_graph_output()) for o in node.outputs)
        dynamic = tuple(v for v in node.inputs if v is not None and v.const_value is None and not v.is_initializer())
        found.append(dynamic if shared else (value,))
    return found


def segment_of(graph: ir.Graph, cuts: Sequence[Cut]) -> dict[int, int]:
    """id(value) -> the segment that computes it, for every node output of `graph`: the largest k such
    that the value depends on cut k - 1 (cut k itself is the output of segment k); 0 for values that
    depend on no cut (the embedding, the mask and RoPE angles computed from the graph's inputs)."""
    after = {id(v): k + 1 for k, cut in enumerate(cuts) for v in cut}
    seg: dict[int, int] = {}
    for node in graph:
        k = max((after.get(id(v), seg.get(id(v), 0)) for v in node.inputs if v is not None), default=0)
        for out in node.outputs:
            seg[id(out)] = k
    return seg


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Every value name `node` reads, inside its subgraphs (If, Loop, Scan) too."""
    names = set(node.input)
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                names |= _names_read(inner)
    return names


@dataclass(frozen=True)
class SegmentModel:
    """One segment as a serialized model: `cut_in` (empty for the first) is its residual input, the other
    inputs are graph inputs of the whole model (feed them as for the whole model); `outputs` are the
    names asked for, in order."""

    index: int
    model: bytes
    cut_in: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    initializers: frozenset[str]


def extract(
    model: ir.Model, proto: onnx.ModelProto, index: int, cut_in: Cut, outputs: Iterable[ir.Value]
) -> SegmentModel:
    """The part of `model` that computes `outputs` from `cut_in` and the graph's inputs, as a model.

    `proto` is `model` serialized (`ir.serde.serialize_model`, node for node in the same order); its
    initializers may be external (their data is not read here)."""
    graph = model.graph
    outputs = list(dict.fromkeys(outputs))
    position = {id(node): i for i, node in enumerate(graph)}
    stop = {id(v) for v in cut_in}
    chosen: set[int] = set()
    stack = [v for v in outputs if id(v) not in stop]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        node = value.producer()
        if node is None or position[id(node)] in chosen:
            continue
        chosen.add(position[id(node)])
        for v in node.inputs:
            if v is not None and id(v) not in stop:
                stack.append(v)
        for attr in node.attributes.values():  # outer-scope values read by subgraphs
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise RotgraphError(f"node {node.name!r} ({node.op_type}) has subgraphs: cannot run the model by block")
    nodes = [proto.graph.node[i] for i in sorted(chosen)]
    read = set().union(*(_names_read(n) for n in nodes)) if nodes else set()
    initializers = [t for t in proto.graph.initializer if t.name in read]
    graph_inputs = [v for v in proto.graph.input if v.name in read]
    inputs = [ir.serde.serialize_value(v) for v in cut_in]
    sub = onnx.helper.make_graph(
        nodes,
        f"{proto.graph.name}_segment{index}",
        inputs + graph_inputs,
        [ir.serde.serialize_value(v) for v in outputs],
        initializer=initializers,
    )
    names = {i.name for i in initializers}
    sub.value_info.extend(v for v in proto.graph.value_info if v.name in read)
    segment = onnx.ModelProto()
    segment.ir_version = proto.ir_version
    segment.opset_import.extend(proto.opset_import)
    segment.functions.extend(proto.functions)
    segment.producer_name = proto.producer_name
    segment.graph.CopyFrom(sub)
    return SegmentModel(
        index,
        segment.SerializeToString(),
        tuple(v.name or "" for v in cut_in),
        tuple(v.name for v in graph_inputs),
        tuple(v.name or "" for v in outputs),
        frozenset(names),
    )
