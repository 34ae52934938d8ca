"""Attention by data flow: which projection is Q, K or V, where RoPE ends, the KV cache, the head layout.

V reaches the second attention MatMul (probabilities x values); Q and K reach the first one as its left
and right operand. RoPE is found by walking back from the score MatMul through layout ops; a KV cache is
a Concat of a graph input (`past`) and the new keys or values whose result is a graph output.

Fused attention (onnxruntime's com.microsoft MultiHeadAttention or GroupQueryAttention, ONNX's opset-23
Attention) is read by the input each projection reaches: query, key, value; or one packed QKV MatMul into
the query input, split into Q, K and V column ranges by the op's head counts. R1, R2 and R4 only need the
projections.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import replace
from itertools import pairwise

import onnx_ir as ir

from rotgraph.constants import CONFIG_KEY
from rotgraph.errors import StructureError
from rotgraph.structure.match import (
    DATA_FIRST_OPS,
    LAYOUT_OPS,
    SHAPE_OPS,
    data_consumers,
    is_constant_shift,
    is_default_domain,
    is_rotgraph_op,
    reader_linears,
    through_rotgraph_ops,
)
from rotgraph.structure.model import Attention, KVCache, Linear, Norm

_FUSED_ATTENTION = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention")
# onnxruntime's fused ops whose Q/K/V projections stay MatMuls in the graph (so does ONNX Attention's).
_READABLE_FUSED = ("MultiHeadAttention", "GroupQueryAttention")


def is_fused_attention(node: ir.Node) -> bool:
    """onnxruntime's fused attention ops, and ONNX's own Attention (opset 23)."""
    if node.op_type == "Attention" and is_default_domain(node):
        return True
    return node.domain == "com.microsoft" and node.op_type in _FUSED_ATTENTION


def _readable(node: ir.Node) -> bool:
    """A fused op whose Q/K/V projections stay MatMuls before it (not inside the op)."""
    return node.op_type in _READABLE_FUSED or is_default_domain(node)


def _query_heads(node: ir.Node) -> int:
    """The query head count of a fused op: its num_heads / q_num_heads attribute, or for ONNX Attention on
    4-D inputs [batch, heads, seq, head_dim] the query's static second dimension (0 when unknown)."""
    heads = node.attributes.get_int("num_heads", 0) or node.attributes.get_int("q_num_heads", 0)
    query = node.inputs[0]
    if not heads and query is not None and query.shape is not None and len(query.shape) == 4:
        dim = query.shape[1]
        heads = dim if isinstance(dim, int) else 0
    return heads


def fused_attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if is_fused_attention(n)]


def _reach_attention_matmul(value: ir.Value, limit: int = 64) -> tuple[ir.Node, int] | None:
    """First MatMul of two activations (or fused attention op) reached forward from `value`, and the
    operand it arrives at."""
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
            if is_fused_attention(node):
                return node, next(i for i, inp in enumerate(node.inputs) if inp is current)
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
            or is_constant_shift(node)
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
    """The KV cache Concat that `value` (possibly through rotgraph ops and a key shift) enters, if any."""
    if value is None:
        return None
    nodes = through_rotgraph_ops(value)
    nodes = [m for n in nodes for m in (through_rotgraph_ops(n.outputs[0]) if is_constant_shift(n) else [n])]
    caches = [c for c in (_as_cache_concat(n) for n in nodes) if c is not None]
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
    if q_rope is not None:  # a RoPE op whose output shape is not inferred (com.microsoft RotaryEmbedding)
        rope = q_rope.producer()
        if rope is not None and rope.op_type == "RotaryEmbedding" and rope.inputs[0] is not None:
            return _reshaped_last_dim(rope.inputs[0]) or _rotary_width(rope)
    return None


def _rotary_width(rope: ir.Node) -> int | None:
    """Twice the width of a RotaryEmbedding's cos cache ([positions, head_dim / 2]) when it rotates the
    whole head (no partial `rotary_embedding_dim`)."""
    if rope.attributes.get_int("rotary_embedding_dim", 0):
        return None
    cos = rope.inputs[2] if len(rope.inputs) > 2 else None
    shape = cos.shape if cos is not None else None
    return 2 * shape[-1] if shape is not None and len(shape) == 2 and isinstance(shape[-1], int) else None


def _reshaped_last_dim(value: ir.Value) -> int | None:
    """The last dimension a Reshape with a constant target shape (and no 0 or -1 there) gives `value`,
    looking back over layout ops: the head size where a query is split into heads."""
    current: ir.Value | None = value
    for _ in range(4):
        node = current.producer() if current is not None else None
        if node is None:
            return None
        if node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is not None:
            target = node.inputs[1].const_value
            if target is None:
                return None
            last = int(target.numpy().reshape(-1)[-1])
            return last if last > 0 else None
        if node.op_type not in ("Transpose", "Identity"):
            return None
        current = node.inputs[0]
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


def _fused_refusal(model: ir.Model, where: str, why: str) -> StructureError:
    fused = fused_attention_nodes(model.graph)
    return StructureError(
        f"{where}: attention is fused into {fused[0].domain or 'ai.onnx'} {fused[0].op_type} ({len(fused)} nodes) "
        f"and {why}"
    )


def find_attention(model: ir.Model, norm: Norm, o: Linear, where: str) -> Attention:
    """The attention whose Q, K, V read `norm` and whose output projection is `o`."""
    direct = [n for n in data_consumers(norm.node.outputs[0]) if is_fused_attention(n) and not is_default_domain(n)]
    if direct:
        raise _fused_refusal(
            model,
            where,
            f"{direct[0].op_type} {direct[0].name!r} holds the Q/K/V weights itself: rotgraph reads "
            "attention whose Q/K/V projections are MatMuls (unfused, MultiHeadAttention or GroupQueryAttention)",
        )
    readers = reader_linears(norm, where)
    hits = [_reach_attention_matmul(lin.output) for lin in readers]
    fused_hits = {id(h[0]): h[0] for h in hits if h is not None and is_fused_attention(h[0])}
    if fused_hits:
        return _fused_attention(model, readers, hits, o, where)  # type: ignore[arg-type]
    if len(readers) != 3:
        if fused_attention_nodes(model.graph):
            raise _fused_refusal(model, where, f"{len(readers)} MatMuls read the attention RMSNorm: none reaches it")
        raise StructureError(
            f"{where}: expected 3 MatMuls (Q, K, V) reading the attention RMSNorm, found {len(readers)} "
            "(fused QKV projections are split when their output is cut by Slice or Split)"
        )
    reached = {}
    for lin in readers:
        hit = _reach_attention_matmul(lin.output)
        if hit is None:
            if fused_attention_nodes(model.graph):
                raise _fused_refusal(model, where, f"the projection {lin.node.name!r} reaches neither it nor a MatMul")
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


def _fused_attention(
    model: ir.Model, readers: list[Linear], hits: list[tuple[ir.Node, int] | None], o: Linear, where: str
) -> Attention:
    """Attention fused into MultiHeadAttention / GroupQueryAttention, from the inputs the projections reach."""
    node = next(h[0] for h in hits if h is not None)
    if not _readable(node):
        raise _fused_refusal(
            model, where, f"rotgraph reads only {', '.join(_READABLE_FUSED)} and ONNX Attention among fused ops"
        )
    if any(h is None or h[0] is not node for h in hits):
        raise StructureError(f"{where}: the projections reading the attention RMSNorm reach different attention ops")
    index = {h[1]: lin for lin, h in zip(readers, hits, strict=True) if h is not None}
    num_heads = _query_heads(node)
    if num_heads <= 0:
        raise StructureError(
            f"{where}: {node.op_type} {node.name!r} has no num_heads / q_num_heads and no static query head count"
        )
    if node.op_type == "MultiHeadAttention" and len(node.inputs) > 3 and node.inputs[3] is not None:
        raise StructureError(
            f"{where}: {node.op_type} {node.name!r} adds Q/K/V biases inside the op (its bias input); R2 would miss "
            "V's part of it: rotgraph reads the biases as Adds after the projections"
        )
    absent = all(i >= len(node.inputs) or node.inputs[i] is None for i in (1, 2))
    if len(readers) == 1 and set(index) == {0} and absent:
        if node.op_type != "GroupQueryAttention":
            raise StructureError(
                f"{where}: packed QKV into {node.op_type} {node.name!r} interleaves heads; rotgraph reads a packed "
                "QKV only for GroupQueryAttention"
            )
        packed = readers[0]
        num_kv = node.attributes.get_int("kv_num_heads", num_heads)
        width = packed.shape[1]
        if width % (num_heads + 2 * num_kv):
            raise StructureError(
                f"{where}: packed QKV width {width} does not split into {num_heads} + 2 x {num_kv} heads"
            )
        d = width // (num_heads + 2 * num_kv)
        bounds = (0, num_heads * d, (num_heads + num_kv) * d, width)
        q, k, v = (replace(packed, columns=(a, b)) for a, b in pairwise(bounds))
    elif len(readers) == 3 and set(index) == {0, 1, 2}:
        q, k, v = index[0], index[1], index[2]
        if q.shape[1] % num_heads:
            raise StructureError(f"{where}: Q width {q.shape[1]} is not a multiple of {num_heads} heads")
        d = q.shape[1] // num_heads
        num_kv = k.shape[1] // d if d else 0
    else:
        raise StructureError(
            f"{where}: {len(readers)} MatMuls read the attention RMSNorm and reach inputs {sorted(index)} of "
            f"{node.op_type} {node.name!r}; expected Q, K, V at its query, key and value inputs, or one packed QKV "
            "MatMul at its query input"
        )
    if (
        k.shape[1] != v.shape[1]
        or k.shape[1] != num_kv * d
        or not num_kv
        or num_heads % num_kv
        or o.shape[0] != q.shape[1]
    ):
        raise StructureError(
            f"{where}: projection widths Q {q.shape[1]}, K {k.shape[1]}, V {v.shape[1]}, O-in {o.shape[0]} do not "
            f"fit {num_heads} heads of {d} ({node.op_type} {node.name!r})"
        )
    rope_inside = node.attributes.get_int("do_rotary", 0) != 0
    q_rope = k_rope = None
    if not rope_inside and not q.columns:
        q_rope, k_rope = (_rope_before(node.inputs[i]) for i in (0, 1))  # type: ignore[arg-type]
    v_cache = None if v.columns else _head_layout(v.output)
    key_cache, value_cache = _cache_after(k_rope), _cache_after(v_cache)
    if (key_cache is None) != (value_cache is None):
        key_cache = value_cache = None
    return Attention(
        q, k, v, o, node, q_rope, k_rope, num_heads, num_kv, d, v_cache, key_cache, value_cache, fused=node
    )
