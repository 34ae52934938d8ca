"""`discover`: walk the residual stream from the embedding to lm_head, block by block."""

from __future__ import annotations

import onnx_ir as ir

from rotgraph.errors import StructureError
from rotgraph.structure.attention import find_attention, fused_attention_nodes
from rotgraph.structure.match import (
    as_linear,
    before_rotgraph_ops,
    describe,
    is_norm,
    linear_producing,
    norm_reading,
    reader_linears,
    residual_add,
    through_rotgraph_ops,
)
from rotgraph.structure.model import (
    MLP,
    Block,
    Linear,
    ModelDescription,
    Norm,
    is_quantized_weight,
    static_shape,
    transposed_initializer,
)

# onnxruntime's quantized weight ops: a graph holding them has no float weights to rotate.
_ORT_QUANTIZED = frozenset({"MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul"})


def _mlp(norm: Norm, down: Linear, where: str) -> MLP:
    readers = reader_linears(norm, where)
    if len(readers) != 2:
        raise StructureError(
            f"{where}: expected 2 MatMuls (gate, up) reading the MLP RMSNorm, found {len(readers)} "
            "(fused gate/up projections are not supported yet)"
        )
    x = before_rotgraph_ops(down.input)
    producer = x.producer()
    if producer is None or producer.op_type != "Mul":
        raise StructureError(f"{where}: expected down_proj input to be Mul(act(gate), up), found {describe(x)}")
    direct = [lin for lin in readers if lin.output in producer.inputs]
    if len(direct) != 1:
        raise StructureError(f"{where}: cannot tell gate from up at the gating Mul {producer.name!r}")
    up = direct[0]
    gate = next(lin for lin in readers if lin is not up)
    return MLP(gate, up, down)


def check_supported(graph: ir.Graph) -> None:
    """Refuse, by what the graph contains, the decoder families R1 cannot be folded into."""
    norms = [n for n in graph if is_norm(n)]
    if not norms:
        layer_norms = sum(n.op_type == "LayerNormalization" for n in graph)
        if not layer_norms and any(n.op_type == "ReduceMean" for n in graph):
            raise StructureError(
                "no RMSNormalization in the graph: decomposed RMSNorms (Pow, ReduceMean, Sqrt) are fused by "
                "CanonicalizeNormsPass (rotgraph.pipeline.canonicalize); run it before discover"
            )
        found = f"found {layer_norms} LayerNormalization nodes" if layer_norms else "found no normalization"
        raise StructureError(
            f"unsupported architecture: no RMSNorm in the graph ({found}); rotgraph rotates RMSNorm decoders "
            "(Llama, Mistral, Qwen2, Phi-3): a LayerNorm's mean subtraction does not commute with a rotation"
        )
    for norm in norms:
        if any(user.op_type == "Add" for user in norm.outputs[0].consumers()):
            raise StructureError(
                f"unsupported architecture: the output of RMSNorm {norm.name!r} is added to the residual stream "
                "(a post-norm or sandwich norm, as in Gemma 2); R1 cannot be folded through a norm that "
                "writes the residual stream"
            )


def discover(model: ir.Model) -> ModelDescription:
    """Find the decoder structure of `model`; raise `StructureError` when it does not match."""
    graph = model.graph
    check_supported(graph)
    inputs = set(map(id, graph.inputs))
    gathers = [
        n
        for n in graph
        if n.op_type == "Gather"
        and n.inputs[0] is not None
        and (
            n.inputs[0].is_initializer()
            or is_quantized_weight(n.inputs[0])
            or transposed_initializer(n.inputs[0]) is not None
        )
        and len(static_shape(n.inputs[0])) == 2
        and n.inputs[1] is not None
        and id(n.inputs[1]) in inputs
    ]
    if len(gathers) != 1:
        quantized = sorted({n.op_type for n in graph if n.domain == "com.microsoft" and n.op_type in _ORT_QUANTIZED})
        if quantized:
            raise StructureError(
                f"the graph is already quantized for onnxruntime ({', '.join(quantized)}): rotgraph reads float "
                "graphs; start from the float export"
            )
        fused = fused_attention_nodes(graph)
        hint = f" (the graph also has {len(fused)} fused {fused[0].op_type} nodes)" if fused else ""
        raise StructureError(
            "expected exactly one embedding Gather (2-D initializer, or a Transpose of one, indexed by a graph "
            f"input), found {len(gathers)}{hint}"
        )
    embedding = gathers[0]
    residual = embedding.outputs[0]
    blocks: list[Block] = []
    while True:
        where = f"block {len(blocks)}" if blocks or residual_add(residual) else "final norm"
        norm = norm_reading(residual, where)
        if norm is None:
            decomposed = any(n.op_type == "Pow" for n in residual.consumers())
            hint = " (a decomposed RMSNorm is there: run CanonicalizeNormsPass first)" if decomposed else ""
            raise StructureError(f"{where}: expected an RMSNorm reading the residual {describe(residual)}{hint}")
        add = residual_add(residual)
        if add is None:
            break
        add_node, attn_out = add
        o = linear_producing(attn_out)
        if o is None:
            raise StructureError(
                f"{where}: expected the residual Add's other operand to be o_proj, found {describe(attn_out)}"
            )
        attention = find_attention(model, norm, o, where)
        mid = add_node.outputs[0]
        mlp_norm = norm_reading(mid, where)
        add2 = residual_add(mid)
        if mlp_norm is None or add2 is None:
            raise StructureError(f"{where}: expected an RMSNorm and a residual Add after attention at {describe(mid)}")
        down = linear_producing(add2[1])
        if down is None:
            raise StructureError(
                f"{where}: expected the MLP residual Add's operand to be down_proj, found {describe(add2[1])}"
            )
        mlp = _mlp(mlp_norm, down, where)
        out = add2[0].outputs[0]
        blocks.append(Block(len(blocks), residual, norm, attention, mid, mlp_norm, mlp, out))
        residual = out
    if not blocks:
        raise StructureError("expected at least one decoder block after the embedding")
    consumers = through_rotgraph_ops(norm.node.outputs[0])
    heads = [lin for lin in (as_linear(n, allow_tied=True) for n in consumers) if lin is not None]
    if len(consumers) != 1 or len(heads) != 1:
        raise StructureError("final norm: expected exactly one MatMul (lm_head) reading it")
    lm_head = heads[0]
    outputs = set(map(id, graph.outputs))
    if id(lm_head.output) not in outputs:
        raise StructureError(f"lm_head: its output {lm_head.output.name!r} is not a graph output")
    table = embedding.inputs[0]
    producer = lm_head.weight.producer()
    transposed = producer is not None and producer.op_type == "Transpose"
    tied = (
        lm_head.weight is table
        or (transposed and producer is not None and producer.inputs[0] is table)
        or (table is not None and transposed_initializer(table) is lm_head.weight)
    )
    if transposed and not tied:
        raise StructureError("lm_head: its weight is a Transpose of an initializer other than the embedding")
    return ModelDescription(embedding, tuple(blocks), norm, lm_head, tied)
