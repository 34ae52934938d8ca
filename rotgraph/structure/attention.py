"""Attention by data flow: which projection is Q, K or V, where RoPE ends, the KV cache, the head layout.

V reaches the second attention MatMul (probabilities x values); Q and K reach the first one as its left
and right operand. RoPE is found by walking back from the score MatMul through layout ops; a KV cache is
a Concat of a graph input (`past`) and the new keys or values whose result is a graph output.
"""

from __future__ import annotations

import json
from collections import deque

import onnx_ir as ir

from rotgraph.constants import CONFIG_KEY
from rotgraph.errors import StructureError
from rotgraph.structure.match import (
    DATA_FIRST_OPS,
    LAYOUT_OPS,
    SHAPE_OPS,
    data_consumers,
    is_default_domain,
    is_rotgraph_op,
    reader_linears,
    through_rotgraph_ops,
)
from rotgraph.structure.model import Attention, KVCache, Linear, Norm

_FUSED_ATTENTION = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention")


def _reach_attention_matmul(value: ir.Value, limit: int = 64) -> tuple[ir.Node, int] | None:
    """First MatMul of two activations reached forward from `value`, and the operand it arrives at."""
    queue: deque[ir.Value] = deque([value])
    seen = {id(value)}
    steps = 0
    while queue and steps < limit:
        current = queue.popleft()
        for node in current.consumers():
            steps += 1
            if node.op_type in SHAPE_OPS:
                continue
            if node.op_type in DATA_FIRST_OPS and node.inputs[0] is not current:
                continue
            if node.op_type == "MatMul":
                if all(i is not None and i.const_value is None and not i.is_initializer() for i in node.inputs):
                    return node, next(i for i, inp in enumerate(node.inputs) if inp is current)
                continue  # a weight MatMul: another projection, not attention
            for out in node.outputs:
                if id(out) not in seen:
                    seen.add(id(out))
                    queue.append(out)
    return None


def _is_scalar_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1


def _rope_before(value: ir.Value) -> ir.Value | None:
    """Walk back over layout ops, scalar scaling and online Hadamards to a RoPE output."""
    current = value
    for _ in range(16):
        node = current.producer()
        if node is None:
            return None
        cache = _as_cache_concat(node)
        if cache is not None:
            current = cache.new
        elif (
            node.op_type in LAYOUT_OPS
            or is_rotgraph_op(node)
            or (node.op_type in ("Mul", "Div") and _is_scalar_const(node.inputs[1]))
        ):
            assert node.inputs[0] is not None
            current = node.inputs[0]
        elif node.op_type == "Mul" and _is_scalar_const(node.inputs[0]):
            assert node.inputs[1] is not None
            current = node.inputs[1]
        elif node.op_type == "RotaryEmbedding" or (node.op_type == "Add" and _is_rope_add(node)):
            return current
        else:
            return None
    return None


def _as_cache_concat(node: ir.Node) -> KVCache | None:
    """`node` as a KV cache Concat(past graph input, new) -> graph output, on axis -2 of a 4-D tensor."""
    graph = node.graph
    if node.op_type != "Concat" or not is_default_domain(node) or len(node.inputs) != 2 or graph is None:
        return None
    past, new = node.inputs
    present: ir.Value | None = node.outputs[0]
    if past is None or new is None or node.attributes.get_int("axis", 0) not in (-2, 2):
        return None
    window = []
    if past not in graph.inputs and _is_sequence_slice(past.producer()):
        window.append(past.producer())
        past = past.producer().inputs[0]  # type: ignore[union-attr]
    if present not in graph.outputs:
        slices = [u for u in node.outputs[0].consumers() if _is_sequence_slice(u) and u.outputs[0] in graph.outputs]
        present = slices[0].outputs[0] if len(slices) == 1 else None
        window += slices
    if past is None or present is None or past not in graph.inputs:
        return None
    if (len(past.shape) if past.shape is not None else 4) != 4:
        return None
    return KVCache(node, past, new, present, tuple(window))  # type: ignore[arg-type]


def _is_sequence_slice(node: ir.Node | None) -> bool:
    """Slice(x, starts, ends, axes=[2]) with constant bounds: a sliding-window cache cut."""
    if node is None or node.op_type != "Slice" or not is_default_domain(node) or len(node.inputs) < 4:
        return False
    axes = node.inputs[3]
    return axes is not None and axes.const_value is not None and axes.const_value.numpy().tolist() in ([2], [-2])


def _cache_after(value: ir.Value | None) -> KVCache | None:
    """The KV cache Concat that `value` (possibly through rotgraph ops) enters, if any."""
    if value is None:
        return None
    caches = [c for c in (_as_cache_concat(n) for n in through_rotgraph_ops(value)) if c is not None]
    return caches[0] if len(caches) == 1 else None


def _produced_by(value: ir.Value | None, op_type: str) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == op_type


def _is_rope_add(node: ir.Node) -> bool:
    """Add(Mul(x, cos), Mul(rotate_half(x), sin)) with rotate_half = Concat(Neg(..), ..)."""
    muls = [i.producer() for i in node.inputs if i is not None]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return False
    for mul in muls:
        assert mul is not None
        for inp in mul.inputs:
            producer = inp.producer() if inp is not None else None
            if (
                producer is not None
                and producer.op_type == "Concat"
                and any(_produced_by(i, "Neg") for i in producer.inputs)
            ):
                return True
    return False


def _head_dim(model: ir.Model, q_rope: ir.Value | None, scores: ir.Node) -> int | None:
    for value in (q_rope, scores.inputs[0]):
        if value is not None and value.shape is not None and len(value.shape) >= 1:
            last = value.shape[-1]
            if isinstance(last, int):
                return last
    config = model.metadata_props.get(CONFIG_KEY)
    if config:
        head_dim = json.loads(config).get("head_dim")
        if isinstance(head_dim, int):
            return head_dim
    return None


def _head_layout(value: ir.Value) -> ir.Value | None:
    """Follow a projection output through Reshape to the Transpose that puts heads before tokens."""
    current = value
    for _ in range(4):
        consumers = data_consumers(current)
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type == "Transpose":
            return node.outputs[0]
        if node.op_type not in ("Reshape", "Identity") or node.inputs[0] is not current:
            return None
        current = node.outputs[0]
    return None


def find_attention(model: ir.Model, norm: Norm, o: Linear, where: str) -> Attention:
    """The attention whose Q, K, V read `norm` and whose output projection is `o`."""
    readers = reader_linears(norm, where)
    if len(readers) != 3:
        raise StructureError(
            f"{where}: expected 3 MatMuls (Q, K, V) reading the attention RMSNorm, found {len(readers)} "
            "(fused QKV projections are split when their output is cut by Slice or Split)"
        )
    reached = {}
    for lin in readers:
        hit = _reach_attention_matmul(lin.output)
        if hit is None:
            fused = [n for n in model.graph if n.op_type in _FUSED_ATTENTION]
            if fused:
                raise StructureError(
                    f"{where}: attention is fused into {fused[0].domain or 'ai.onnx'} {fused[0].op_type} "
                    f"({len(fused)} nodes); rotgraph reads unfused attention (score MatMul, Softmax): rotate and "
                    "quantize first, then apply onnxruntime's attention fusions"
                )
            raise StructureError(f"{where}: the projection {lin.node.name!r} does not reach an attention MatMul")
        reached[id(lin)] = hit
    score_nodes = {id(n): n for n, _ in reached.values() if sum(1 for m, _ in reached.values() if m is n) == 2}
    if len(score_nodes) != 1:
        raise StructureError(f"{where}: expected two projections (Q, K) to meet in one score MatMul")
    scores = next(iter(score_nodes.values()))
    q = next(lin for lin in readers if reached[id(lin)] == (scores, 0))
    k = next(lin for lin in readers if reached[id(lin)] == (scores, 1))
    v = next(lin for lin in readers if reached[id(lin)][0] is not scores)
    if reached[id(v)][1] != 1:
        raise StructureError(f"{where}: V {v.node.name!r} must be the right operand of the value MatMul")
    q_rope = _rope_before(scores.inputs[0])  # type: ignore[arg-type]
    k_rope = _rope_before(scores.inputs[1])  # type: ignore[arg-type]
    head_dim = _head_dim(model, q_rope, scores)
    if head_dim is None:
        raise StructureError(f"{where}: cannot tell head_dim: the query has no static last dimension")
    q_out, k_out, v_out, o_in = q.shape[1], k.shape[1], v.shape[1], o.shape[0]
    if q_out % head_dim or k_out % head_dim or v_out != k_out or o_in != q_out:
        raise StructureError(
            f"{where}: projection widths Q {q_out}, K {k_out}, V {v_out}, O-in {o_in} do not fit head_dim {head_dim}"
        )
    v_cache = _head_layout(v.output)
    key_cache, value_cache = _cache_after(k_rope), _cache_after(v_cache)
    if (key_cache is None) != (value_cache is None):
        raise StructureError(f"{where}: found a KV cache Concat for {'keys' if key_cache else 'values'} only")
    return Attention(
        q,
        k,
        v,
        o,
        scores,
        q_rope,
        k_rope,
        q_out // head_dim,
        k_out // head_dim,
        head_dim,
        v_cache,
        key_cache,
        value_cache,
    )
