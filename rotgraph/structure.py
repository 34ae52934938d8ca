"""Structure discovery: find a decoder-only transformer in an ONNX graph by pattern, never by name.

The walk starts at the embedding Gather (the only Gather of a 2-D float initializer by a graph
input) and follows the residual stream: each block is an RMSNorm read by the Q/K/V MatMuls, a residual
Add whose other operand is the O MatMul, an RMSNorm read by the gate/up MatMuls and a residual Add fed
by the down MatMul; the stream ends in the final RMSNorm and the lm_head MatMul that produces a graph
output. Attention is identified by data flow: V reaches the second attention MatMul (probabilities x
values), Q and K reach the first one as its left and right operand; RoPE is found by walking back from
the score MatMul through layout ops. Norms must be in canonical form (RMSNormalization or
SimplifiedLayerNormalization); `CanonicalizeNormsPass` produces it from decomposed graphs.

Every mismatch raises `StructureError` saying what was expected and where.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from rotgraph.errors import StructureError
from rotgraph.hadamard import hadamard_factors

ROTGRAPH_DOMAIN = "rotgraph"
CONFIG_KEY = "rotgraph.config"

# Ops that move or repeat data without computing on the last axis; the walk back to RoPE steps over them.
_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten", "Cast"})
# Ops whose non-first inputs are shapes or indices: data flows only through input 0.
_DATA_FIRST_OPS = frozenset({"Reshape", "Expand", "Slice", "Gather", "Tile", "Unsqueeze", "Squeeze", "Pad"})
_SHAPE_OPS = frozenset({"Shape", "Size"})


def _is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def is_norm(node: ir.Node) -> bool:
    """RMSNormalization (opset 23) or onnxruntime's SimplifiedLayerNormalization."""
    if node.op_type == "RMSNormalization" and _is_default_domain(node):
        return True
    return node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx", "com.microsoft")


def is_hadamard(node: ir.Node | None) -> bool:
    return node is not None and node.domain == ROTGRAPH_DOMAIN and node.op_type == "Hadamard"


def static_shape(value: ir.Value) -> tuple[int, ...]:
    """Shape of an initializer, or of the codes behind a quantized weight; () when unknown."""
    tensor = value.const_value
    if tensor is None and is_quantized_weight(value):
        producer = value.producer()
        assert producer is not None and producer.inputs[0] is not None
        tensor = producer.inputs[0].const_value
    return tuple(tensor.shape.numpy()) if tensor is not None else ()


def is_quantized_weight(value: ir.Value) -> bool:
    """DequantizeLinear of initializers (codes, scales[, zero points]): a quantized weight."""
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and all(i is None or i.is_initializer() for i in producer.inputs)
    )


def _data_consumers(value: ir.Value) -> list[ir.Node]:
    """Consumers of `value` that use it as data (shape-reading ops are left out)."""
    return [n for n in value.consumers() if n.op_type not in _SHAPE_OPS]


def _where(value: ir.Value | None) -> str:
    if value is None:
        return "<none>"
    producer = value.producer()
    by = f" produced by {producer.op_type} node {producer.name!r}" if producer is not None else ""
    return f"value {value.name!r}{by}"


@dataclass(frozen=True)
class Linear:
    """x @ W (+ b) with W an initializer of shape [in, out] and b an optional [out] initializer."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    bias_node: ir.Node | None

    @property
    def output(self) -> ir.Value:
        return (self.bias_node or self.node).outputs[0]

    @property
    def input(self) -> ir.Value:
        value = self.node.inputs[0]
        assert value is not None
        return value

    @property
    def shape(self) -> tuple[int, int]:
        tensor = self.weight.const_value
        if tensor is not None:
            dims = tensor.shape.numpy()
        else:  # a tied lm_head (Transpose of the embedding table) or a quantized weight
            producer = self.weight.producer()
            assert producer is not None and producer.inputs[0] is not None
            source = producer.inputs[0].const_value
            assert source is not None
            dims = source.shape.numpy()
            if producer.op_type == "Transpose":
                dims = tuple(reversed(dims))
        return dims[0], dims[1]


@dataclass(frozen=True)
class Norm:
    """A weighted RMSNorm node; `scale` is its weight initializer."""

    node: ir.Node
    scale: ir.Value


@dataclass(frozen=True)
class KVCache:
    """Concat(past, new) on the sequence axis, with `past` a graph input and the result a graph output
    (`present`): where a decoder graph stores keys or values for the next step.

    A sliding-window cache (Mistral) reads the past through a Slice on the sequence axis and stores a
    Slice of the Concat; `window` holds those Slice nodes.
    """

    concat: ir.Node
    past: ir.Value
    new: ir.Value
    present: ir.Value
    window: tuple[ir.Node, ...] = ()

    @property
    def quantized(self) -> bool:
        """Stored as integer codes (rotgraph's KVQuantize)."""
        return self.past.dtype == ir.DataType.UINT8


@dataclass(frozen=True)
class Attention:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    scores: ir.Node  # MatMul(Q, K^T)
    q_rope: ir.Value | None  # RoPE outputs (None when no RoPE pattern precedes the score MatMul)
    k_rope: ir.Value | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_cache: ir.Value | None = None  # values as [batch, kv_heads, seq, head_dim], before any repeat
    key_cache: KVCache | None = None  # graphs with past_key_values inputs
    value_cache: KVCache | None = None


@dataclass(frozen=True)
class MLP:
    gate: Linear
    up: Linear
    down: Linear

    @property
    def down_input(self) -> ir.Value:
        return self.down.input


@dataclass(frozen=True)
class Block:
    index: int
    residual_in: ir.Value
    attn_norm: Norm
    attention: Attention
    residual_mid: ir.Value
    mlp_norm: Norm
    mlp: MLP
    residual_out: ir.Value


@dataclass(frozen=True)
class ModelDescription:
    """What structure discovery found; passes rewrite the model through these references."""

    embedding: ir.Node  # Gather(table, input_ids)
    blocks: tuple[Block, ...]
    final_norm: Norm
    lm_head: Linear
    lm_head_tied: bool  # lm_head weight is the embedding table (directly or transposed)

    @property
    def embedding_table(self) -> ir.Value:
        table = self.embedding.inputs[0]
        assert table is not None
        return table

    @property
    def vocab_size(self) -> int:
        return static_shape(self.embedding_table)[0]

    @property
    def hidden_size(self) -> int:
        return static_shape(self.embedding_table)[1]

    def norm_readers(self) -> list[list[Linear]]:
        """The Linears reading each norm, in the order of `norms()`."""
        groups = [
            g for b in self.blocks for g in ([b.attention.q, b.attention.k, b.attention.v], [b.mlp.gate, b.mlp.up])
        ]
        return [*groups, [self.lm_head]]

    def norms(self) -> list[Norm]:
        return [n for b in self.blocks for n in (b.attn_norm, b.mlp_norm)] + [self.final_norm]

    def _cache_summary(self) -> str:
        caches = [c for b in self.blocks for c in (b.attention.key_cache, b.attention.value_cache) if c is not None]
        if not caches:
            return "none (the graph recomputes the whole sequence)"
        kind = "integer codes + scales" if caches[0].quantized else "float"
        return f"{len(caches)} past/present pairs ({kind})"

    def summary(self) -> str:
        a = self.blocks[0].attention
        m = self.blocks[0].mlp
        has_bias = any(
            lin.bias is not None for b in self.blocks for lin in (b.attention.q, b.attention.k, b.attention.v)
        )
        lines = [
            f"decoder: {len(self.blocks)} blocks, hidden {self.hidden_size}, vocab {self.vocab_size}",
            f"attention: {a.num_heads} query heads, {a.num_kv_heads} KV heads "
            f"({'grouped-query' if a.num_kv_heads != a.num_heads else 'multi-head'}), head_dim {a.head_dim}, "
            f"Q/K/V biases: {'yes' if has_bias else 'no'}, RoPE: {'found' if a.q_rope is not None else 'not found'}",
            f"mlp: gated, intermediate {m.down.shape[0]}",
            f"norms: {len(self.norms())} {self.final_norm.node.op_type}",
            f"lm_head: {'tied to the embedding' if self.lm_head_tied else 'own weight'}",
            f"KV cache: {self._cache_summary()}",
            f"Hadamard sizes: R1 {_factorization(self.hidden_size)}, R2/R3 {_factorization(a.head_dim)}, "
            f"R4 {_factorization(m.down.shape[0])}",
        ]
        return "\n".join(lines)


def _factorization(n: int) -> str:
    f = hadamard_factors(n)
    if f is None:
        return f"{n} (no Hadamard known: random orthogonal for R1/R2, no online R3/R4)"
    if n & (n - 1) == 0:
        return f"{n} = 2^{n.bit_length() - 1}"
    return f"{n} = {f.m}*{f.p}"


def _as_linear(node: ir.Node, *, allow_tied: bool = False) -> Linear | None:
    if node.op_type != "MatMul" or not _is_default_domain(node) or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None:
        return None
    if weight.const_value is None or not weight.is_initializer():
        producer = weight.producer()
        tied = (
            allow_tied
            and producer is not None
            and producer.op_type == "Transpose"
            and producer.inputs[0] is not None
            and producer.inputs[0].is_initializer()
        )
        if not tied and not is_quantized_weight(weight):
            return None
    if len(weight.shape or ()) != 2 and weight.const_value is not None:
        return None
    bias = bias_node = None
    consumers = node.outputs[0].consumers()
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        if other is not None and other.is_initializer() and len(other.shape or ()) == 1:
            bias, bias_node = other, add
    return Linear(node, weight, bias, bias_node)


def _linear_producing(value: ir.Value | None) -> Linear | None:
    """The Linear whose (biased) output is `value`."""
    if value is None:
        return None
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "Add":
        for inp in producer.inputs:
            if inp is not None and inp.producer() is not None:
                lin = _as_linear(inp.producer())  # type: ignore[arg-type]
                if lin is not None and lin.bias_node is producer:
                    return lin
    lin = _as_linear(producer)
    if lin is not None and lin.bias_node is None:
        return lin
    return None


def _norm_reading(value: ir.Value, where: str) -> Norm | None:
    norms = [n for n in _data_consumers(value) if is_norm(n) and n.inputs[0] is value]
    if len(norms) > 1:
        raise StructureError(f"{where}: expected one RMSNorm reading the residual stream, found {len(norms)}")
    if not norms:
        return None
    node = norms[0]
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is None or not scale.is_initializer():
        raise StructureError(f"{where}: the RMSNorm {node.name!r} has no initializer scale")
    axis = node.attributes.get_int("axis", -1)
    if axis != -1 and axis != (len(value.shape) - 1 if value.shape is not None else None):
        raise StructureError(f"{where}: RMSNorm {node.name!r} normalizes axis {axis}, expected the last axis")
    return Norm(node, scale)


def _residual_add(value: ir.Value) -> tuple[ir.Node, ir.Value] | None:
    adds = [n for n in _data_consumers(value) if n.op_type == "Add" and _is_default_domain(n)]
    if len(adds) != 1:
        return None
    add = adds[0]
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    assert other is not None
    return add, other


def is_rotgraph_op(node: ir.Node | None) -> bool:
    """rotgraph's own single-input ops (Hadamard, FakeQuant): transparent to structure discovery."""
    return node is not None and node.domain == ROTGRAPH_DOMAIN


def _through_rotgraph_ops(value: ir.Value) -> list[ir.Node]:
    """Data consumers of `value`, looking through chains of rotgraph ops."""
    nodes = []
    for node in _data_consumers(value):
        nodes += _through_rotgraph_ops(node.outputs[0]) if is_rotgraph_op(node) else [node]
    return nodes


def _before_rotgraph_ops(value: ir.Value) -> ir.Value:
    """The value a chain of rotgraph ops ending in `value` started from."""
    while is_rotgraph_op(value.producer()):
        producer = value.producer()
        assert producer is not None and producer.inputs[0] is not None
        value = producer.inputs[0]
    return value


def before_fake_quant(value: ir.Value) -> ir.Value:
    """The value a chain of rotgraph FakeQuant ops ending in `value` started from."""
    producer = value.producer()
    while is_rotgraph_op(producer) and producer is not None and producer.op_type == "FakeQuant":
        assert producer.inputs[0] is not None
        value = producer.inputs[0]
        producer = value.producer()
    return value


def _reader_linears(norm: Norm, where: str) -> list[Linear]:
    out = norm.node.outputs[0]
    linears = []
    for node in _through_rotgraph_ops(out):
        lin = _as_linear(node)
        if lin is None or _before_rotgraph_ops(lin.input) is not out:
            raise StructureError(
                f"{where}: the RMSNorm output {out.name!r} feeds {node.op_type} node {node.name!r}; "
                "expected only MatMuls with initializer weights"
            )
        linears.append(lin)
    return linears


def _reach_attention_matmul(value: ir.Value, limit: int = 64) -> tuple[ir.Node, int] | None:
    """First MatMul of two activations reached forward from `value`, and the operand it arrives at."""
    queue: deque[ir.Value] = deque([value])
    seen = {id(value)}
    steps = 0
    while queue and steps < limit:
        current = queue.popleft()
        for node in current.consumers():
            steps += 1
            if node.op_type in _SHAPE_OPS:
                continue
            if node.op_type in _DATA_FIRST_OPS and node.inputs[0] is not current:
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
            node.op_type in _LAYOUT_OPS
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
    if node.op_type != "Concat" or not _is_default_domain(node) or len(node.inputs) != 2 or graph is None:
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
    if node is None or node.op_type != "Slice" or not _is_default_domain(node) or len(node.inputs) < 4:
        return False
    axes = node.inputs[3]
    return axes is not None and axes.const_value is not None and axes.const_value.numpy().tolist() in ([2], [-2])


def _cache_after(value: ir.Value | None) -> KVCache | None:
    """The KV cache Concat that `value` (possibly through rotgraph ops) enters, if any."""
    if value is None:
        return None
    caches = [c for c in (_as_cache_concat(n) for n in _through_rotgraph_ops(value)) if c is not None]
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


_FUSED_ATTENTION = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedMultiHeadAttention")


def _attention(model: ir.Model, norm: Norm, o: Linear, where: str) -> Attention:
    readers = _reader_linears(norm, where)
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


def _head_layout(value: ir.Value) -> ir.Value | None:
    """Follow a projection output through Reshape to the Transpose that puts heads before tokens."""
    current = value
    for _ in range(4):
        consumers = _data_consumers(current)
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if node.op_type == "Transpose":
            return node.outputs[0]
        if node.op_type not in ("Reshape", "Identity") or node.inputs[0] is not current:
            return None
        current = node.outputs[0]
    return None


def _mlp(norm: Norm, down: Linear, where: str) -> MLP:
    readers = _reader_linears(norm, where)
    if len(readers) != 2:
        raise StructureError(
            f"{where}: expected 2 MatMuls (gate, up) reading the MLP RMSNorm, found {len(readers)} "
            "(fused gate/up projections are not supported yet)"
        )
    x = _before_rotgraph_ops(down.input)
    producer = x.producer()
    if producer is None or producer.op_type != "Mul":
        raise StructureError(f"{where}: expected down_proj input to be Mul(act(gate), up), found {_where(x)}")
    direct = [lin for lin in readers if lin.output in producer.inputs]
    if len(direct) != 1:
        raise StructureError(f"{where}: cannot tell gate from up at the gating Mul {producer.name!r}")
    up = direct[0]
    gate = next(lin for lin in readers if lin is not up)
    return MLP(gate, up, down)


def _check_supported(graph: ir.Graph) -> None:
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
    _check_supported(graph)
    inputs = set(map(id, graph.inputs))
    gathers = [
        n
        for n in graph
        if n.op_type == "Gather"
        and n.inputs[0] is not None
        and (n.inputs[0].is_initializer() or is_quantized_weight(n.inputs[0]))
        and len(static_shape(n.inputs[0])) == 2
        and n.inputs[1] is not None
        and id(n.inputs[1]) in inputs
    ]
    if len(gathers) != 1:
        raise StructureError(
            f"expected exactly one embedding Gather (2-D initializer indexed by a graph input), found {len(gathers)}"
        )
    embedding = gathers[0]
    residual = embedding.outputs[0]
    blocks: list[Block] = []
    while True:
        where = f"block {len(blocks)}" if blocks or _residual_add(residual) else "final norm"
        norm = _norm_reading(residual, where)
        if norm is None:
            decomposed = any(n.op_type == "Pow" for n in residual.consumers())
            hint = " (a decomposed RMSNorm is there: run CanonicalizeNormsPass first)" if decomposed else ""
            raise StructureError(f"{where}: expected an RMSNorm reading the residual {_where(residual)}{hint}")
        add = _residual_add(residual)
        if add is None:
            break
        add_node, attn_out = add
        o = _linear_producing(attn_out)
        if o is None:
            raise StructureError(
                f"{where}: expected the residual Add's other operand to be o_proj, found {_where(attn_out)}"
            )
        attention = _attention(model, norm, o, where)
        mid = add_node.outputs[0]
        mlp_norm = _norm_reading(mid, where)
        add2 = _residual_add(mid)
        if mlp_norm is None or add2 is None:
            raise StructureError(f"{where}: expected an RMSNorm and a residual Add after attention at {_where(mid)}")
        down = _linear_producing(add2[1])
        if down is None:
            raise StructureError(
                f"{where}: expected the MLP residual Add's operand to be down_proj, found {_where(add2[1])}"
            )
        mlp = _mlp(mlp_norm, down, where)
        out = add2[0].outputs[0]
        blocks.append(Block(len(blocks), residual, norm, attention, mid, mlp_norm, mlp, out))
        residual = out
    if not blocks:
        raise StructureError("expected at least one decoder block after the embedding")
    consumers = _through_rotgraph_ops(norm.node.outputs[0])
    heads = [lin for lin in (_as_linear(n, allow_tied=True) for n in consumers) if lin is not None]
    if len(consumers) != 1 or len(heads) != 1:
        raise StructureError("final norm: expected exactly one MatMul (lm_head) reading it")
    lm_head = heads[0]
    outputs = set(map(id, graph.outputs))
    if id(lm_head.output) not in outputs:
        raise StructureError(f"lm_head: its output {lm_head.output.name!r} is not a graph output")
    table = embedding.inputs[0]
    producer = lm_head.weight.producer()
    transposed = producer is not None and producer.op_type == "Transpose"
    tied = lm_head.weight is table or (transposed and producer is not None and producer.inputs[0] is table)
    if transposed and not tied:
        raise StructureError("lm_head: its weight is a Transpose of an initializer other than the embedding")
    return ModelDescription(embedding, tuple(blocks), norm, lm_head, tied)
