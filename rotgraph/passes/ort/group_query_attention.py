"""Replace the exported eager attention of a cached decoder by onnxruntime's GroupQueryAttention."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.constants import MS_DOMAIN
from rotgraph.errors import StructureError
from rotgraph.inputs import input_roles, reached_by_data
from rotgraph.online import FunctionBuilder
from rotgraph.results import Calibration
from rotgraph.structure import Attention, discover

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Core:
    """The eager attention between the projections: scores -> scale -> mask -> softmax -> values."""

    attention: Attention
    scale: float
    output: ir.Value  # [batch, seq, heads * head_dim], what o_proj (or its input quantizer) reads
    padding: ir.Value | None  # the additive mask [batch, 1, seq, total] when it depends on input data


def _single_use(value: ir.Value, op_type: str, where: str) -> ir.Node:
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != op_type:
        found = ", ".join(u.node.op_type for u in uses) or "nothing"
        raise StructureError(f"{where}: expected {value.name} to be read by one {op_type}, found {found}")
    return uses[0].node


def _scalar(value: ir.Value | None) -> float | None:
    tensor = value.const_value if value is not None else None
    if tensor is None:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    if tensor is None or tensor.size != 1:
        return None
    return float(np.asarray(tensor.numpy()).reshape(()))


def _match_core(attention: Attention, index: int, graph: ir.Graph) -> _Core:
    where = f"layer {index} attention"
    scores = attention.scores.outputs[0]
    key_scale = _key_scale(attention)
    if key_scale is not None and [u.node.op_type for u in scores.uses()] == ["Add"]:
        scale, scaled = key_scale, scores  # torch's SDPA decomposition: Q and K^T each scaled by a constant
    else:
        scale_node = _single_use(scores, "Mul", where)
        factor = _scalar(scale_node.inputs[1])
        if factor is None:
            raise StructureError(f"{where}: the scores are scaled by a non-constant {scale_node.inputs[1]}")
        scale, scaled = factor * (key_scale or 1.0), scale_node.outputs[0]
    mask = _single_use(scaled, "Add", where)
    bias = mask.inputs[1] if mask.inputs[0] is scaled else mask.inputs[0]
    padding = bias if bias is not None and reached_by_data([bias], list(graph.inputs)) else None
    if padding is not None and padding.shape is not None and len(padding.shape) != 4:
        raise StructureError(f"{where}: the padding mask {padding.name!r} is not [batch, 1|heads, seq, total]")
    softmax = _single_use(mask.outputs[0], "Softmax", where)
    values = _single_use(_nan_guard(softmax.outputs[0]), "MatMul", where)
    transpose = _single_use(values.outputs[0], "Transpose", where)
    if list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        raise StructureError(f"{where}: the attention output is not transposed to [batch, seq, heads, head_dim]")
    merge = _single_use(transpose.outputs[0], "Reshape", where)
    return _Core(attention, scale, merge.outputs[0], padding)


def _key_scale(attention: Attention) -> float | None:
    """The constant that K^T is multiplied by right before the score MatMul, if any (GroupQueryAttention
    reads the unscaled new keys, so it moves into `scale`; a scaled Q is read as it is)."""
    keys = attention.scores.inputs[1]
    producer = keys.producer() if keys is not None else None
    if producer is None or producer.op_type != "Mul":
        return None
    factors = [_scalar(i) for i in producer.inputs]
    return next((f for f in factors if f is not None), None) if sum(f is None for f in factors) == 1 else None


def _nan_guard(probabilities: ir.Value) -> ir.Value:
    """Where(IsNaN(p), 0, p) after the Softmax (optimum's exports guard fully masked rows) -> its output;
    else `probabilities`. GroupQueryAttention gives such rows finite values of its own (padding only)."""
    uses = {u.node.op_type: u.node for u in probabilities.uses()}
    where, isnan = uses.get("Where"), uses.get("IsNaN")
    if len(uses) != 2 or where is None or isnan is None or where.inputs[0] is not isnan.outputs[0]:
        return probabilities
    return where.outputs[0] if where.inputs[2] is probabilities and _scalar(where.inputs[1]) == 0.0 else probabilities


class FindFusableAttentionPass(ir.passes.InPlacePass):
    """Set `calibration.attentions` to the attentions that `GroupQueryAttentionPass` will fuse: all of them
    when every layer has a float KV cache without a sliding window, else none (a graph without a cache,
    or one stored as codes, keeps its eager attention). It runs before the weights are quantized, while
    discovery still sees the projection MatMuls; it changes nothing.
    """

    def __init__(self, calibration: Calibration) -> None:
        super().__init__()
        self.calibration = calibration

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.calibration.attentions = ()
        attentions = [block.attention for block in discover(model).blocks]
        caches = [c for a in attentions for c in (a.key_cache, a.value_cache)]
        if any(a.fused is not None for a in attentions):
            logger.info("attention is already fused (%s): nothing to rewrite", attentions[0].fused.op_type)  # type: ignore[union-attr]
        elif any(c is None or c.quantized for c in caches):
            logger.info("no float KV cache in every layer: attention stays eager (no GroupQueryAttention)")
        elif any(c is not None and c.window for c in caches):
            logger.info("sliding-window KV cache: attention stays eager (GroupQueryAttention fusion not applied)")
        else:
            self.calibration.attentions = tuple(attentions)
        return ir.passes.PassResult(model, False)


class GroupQueryAttentionPass(ir.passes.InPlacePass):
    """Eager attention with a float KV cache  ->  com.microsoft GroupQueryAttention (onnxruntime).

    For each given attention (found by `structure.discover` before the weights were quantized; the
    attention core is not touched by the weight and activation passes), the pattern MatMul(Q, K^T) ->
    Mul(scale) -> Add(mask) -> Softmax -> MatMul(., V) -> Transpose -> Reshape (or torch's SDPA
    decomposition, as optimum exports it: Q and K^T each scaled by a constant before the MatMul, and a
    Where(IsNaN(p), 0, p) guard after the Softmax), with K and V the
    cache Concat(past, new) repeated for grouped-query heads, becomes one GroupQueryAttention reading Q
    and the new K (after RoPE and any R3 Hadamard) and V, and the past cache; its present outputs
    replace the Concat outputs as the graph's present.* outputs (same names). seqlens_k and
    total_sequence_length are computed once from the first cache's past length and the query length.

    Padding: when the additive mask depends on the contents of a graph input (an attention mask with
    padding, not only the shapes a causal mask is built from), that same mask becomes GroupQueryAttention's
    `attention_bias`, and seqlens_k still counts every cache slot. onnxruntime-genai's builder instead
    sets seqlens_k = sum(mask) - 1 per row; onnxruntime's CPU kernel reads that as a right-padded
    prompt (measured with onnxruntime 1.32: a left-padded row gives wrong logits, a right-padded one
    right), and rotgraph feeds left-padded rows (as Hugging Face `generate` does), so the mask travels
    as a bias: every row, padded or not, gets the eager graph's logits at its real positions.

    Guarantees: the same function as the eager graph, to float rounding, at every position that is not
    padding (a fully masked query row, i.e. a padding position, may differ); every given layer is
    rewritten or the pass raises naming the layer and what it found. Caches stored as integer codes or
    behind a sliding window are refused: GroupQueryAttention would change their layout.
    """

    def __init__(self, calibration: Calibration) -> None:
        super().__init__()
        self.calibration = calibration

    def requires(self, model: ir.Model) -> None:
        self.calibration.need(self.calibration.attentions, "attentions", self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        attentions = self.calibration.need(self.calibration.attentions, "attentions", self)
        if not attentions:
            return ir.passes.PassResult(model, False)
        graph = model.graph
        cores = []
        for index, attention in enumerate(attentions):
            for cache in (attention.key_cache, attention.value_cache):
                if cache is None or cache.quantized or cache.window:
                    raise StructureError(
                        f"layer {index} attention: GroupQueryAttention needs a float cache without a sliding "
                        "window (Concat(past, new) -> present)"
                    )
            cores.append(_match_core(attention, index, graph))
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        ids_name = input_roles(model).input_ids
        ids = next(v for v in graph.inputs if v.name == ids_name)
        seqlens, total = self._lengths(graph, attentions[0], ids)
        for core in cores:
            self._fuse(graph, core, seqlens, total)
        RemoveUnusedNodesPass()(model)  # the eager attention, the caches' Concats and the mask
        logger.info("attention of %d layers fused into GroupQueryAttention", len(cores))
        return ir.passes.PassResult(model, True)

    @staticmethod
    def _lengths(graph: ir.Graph, first: Attention, ids: ir.Value) -> tuple[ir.Value, ir.Value]:
        """seqlens_k [batch] int32 (= past + new - 1) and total_sequence_length int32 scalar, from the
        shapes of the first past cache and of the token ids [batch, new]."""
        assert first.key_cache is not None
        b = FunctionBuilder()
        past = b.op("Shape", first.key_cache.past, start=2, end=3)
        new = b.op("Shape", ids, start=1, end=2)
        batch = b.op("Shape", ids, start=0, end=1)
        total = b.op("Cast", b.op("Add", past, new), to=ir.DataType.INT32)
        seqlens = b.op("Expand", b.op("Sub", total, b.const("gqa_one", np.array([1], np.int32))), batch)
        scalar = b.op("Reshape", total, b.const("gqa_scalar", np.array([], np.int64)))
        seqlens.name, scalar.name = "gqa_seqlens_k", "gqa_total_sequence_length"
        graph.insert_before(first.scores, b.nodes)
        return seqlens, scalar

    @staticmethod
    def _fuse(graph: ir.Graph, core: _Core, seqlens: ir.Value, total: ir.Value) -> None:
        a = core.attention
        assert a.key_cache is not None and a.value_cache is not None
        b = FunctionBuilder()

        def flat(value: ir.Value, heads: int, what: str) -> ir.Value:
            """[batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]"""
            shape = b.const(f"{value.name}_{what}_shape", np.array([0, 0, heads * a.head_dim], np.int64))
            return b.op("Reshape", b.op("Transpose", value, perm=[0, 2, 1, 3]), shape)

        query = a.scores.inputs[0]
        assert query is not None
        inputs: list[ir.Value | None] = [
            flat(query, a.num_heads, "q"),
            flat(a.key_cache.new, a.num_kv_heads, "k"),
            flat(a.value_cache.new, a.num_kv_heads, "v"),
            a.key_cache.past,
            a.value_cache.past,
            seqlens,
            total,
        ]
        if core.padding is not None:  # cos_cache, sin_cache, position_ids unused; attention_bias
            inputs += [None, None, None, core.padding]
        attrs = [
            ir.AttrInt64("num_heads", a.num_heads),
            ir.AttrInt64("kv_num_heads", a.num_kv_heads),
            ir.AttrFloat32("scale", core.scale),
        ]
        gqa = ir.Node(MS_DOMAIN, "GroupQueryAttention", inputs, attrs, num_outputs=3)
        b.nodes.append(gqa)
        output = gqa.outputs[0]
        output.name, output.shape, output.type = f"{core.output.name}_gqa", core.output.shape, core.output.type
        graph.insert_after(core.output.producer(), b.nodes)  # type: ignore[arg-type]
        core.output.replace_all_uses_with(output)
        for cache, present in ((a.key_cache, gqa.outputs[1]), (a.value_cache, gqa.outputs[2])):
            old = cache.present
            name = old.name
            old.name = f"{name}_eager"
            present.name, present.shape, present.type = name, old.shape, old.type
            graph.outputs[graph.outputs.index(old)] = present


def flat_heads(graph: ir.Graph, value: ir.Value, heads: int) -> ir.Value:
    """`value` [batch, heads, seq, head_dim] as [batch, seq, heads * head_dim], the layout
    GroupQueryAttention reads: the 3-D tensor it was split from (Transpose(Reshape(x)) undone, no node)
    when it was, else a Transpose and Reshape inserted at `value`'s producer."""
    transpose = value.producer()
    reshape = transpose.inputs[0].producer() if transpose is not None and transpose.inputs[0] is not None else None
    if (
        transpose is not None
        and transpose.op_type == "Transpose"
        and list(transpose.attributes.get_ints("perm", [])) == [0, 2, 1, 3]
        and reshape is not None
        and reshape.op_type == "Reshape"
        and reshape.inputs[0] is not None
        and (reshape.inputs[0].shape is None or len(reshape.inputs[0].shape) == 3)
    ):
        return reshape.inputs[0]
    width = value.shape[-1] if value.shape is not None and len(value.shape) == 4 else None
    if not isinstance(width, int):
        raise StructureError(f"{value.name}: cannot flatten heads of unknown width (shape {value.shape})")
    b = FunctionBuilder()
    shape = b.const(f"{value.name}_flat_shape", np.array([0, 0, heads * width], np.int64))
    flat = b.op("Reshape", b.op("Transpose", value, perm=[0, 2, 1, 3]), shape)
    producer = value.producer()
    if producer is None:
        graph.extend(b.nodes)  # a graph input: appended, then sorted by the caller's clean-up
    else:
        graph.insert_after(producer, b.nodes)
    return flat


def rebuild_attention(
    graph: ir.Graph, node: ir.Node, inputs: Sequence[ir.Value | None], attributes: Sequence[ir.Attr]
) -> ir.Node:
    """Replace the fused attention `node` by one of the same op with `inputs` and `attributes`; its
    outputs keep their names, shapes, types and places among the graph outputs."""
    new = ir.Node(node.domain, node.op_type, list(inputs), list(attributes), num_outputs=len(node.outputs))
    graph.insert_before(node, new)
    for old, out in zip(node.outputs, new.outputs, strict=True):
        name = old.name
        out.shape, out.type = old.shape, old.type
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = f"{name}_replaced"
        out.name = name
    graph.remove(node, safe=True)
    return new
