"""The model description: what structure discovery found, as references into the graph."""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_ir as ir


def static_shape(value: ir.Value) -> tuple[int, ...]:
    """Shape of an initializer, or of the codes behind a quantized weight; () when unknown."""
    tensor = value.const_value
    if tensor is None and is_quantized_weight(value):
        producer = value.producer()
        assert producer is not None and producer.inputs[0] is not None
        tensor = producer.inputs[0].const_value
    if tensor is None and (source := transposed_initializer(value)) is not None:
        return tuple(reversed(static_shape(source)))
    return tuple(tensor.shape.numpy()) if tensor is not None else ()


def transposed_initializer(value: ir.Value | None) -> ir.Value | None:
    """X when `value` is Transpose(X) of a 2-D initializer X (a table shared by embedding and lm_head)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    source = producer.inputs[0]
    perm = producer.attributes.get_ints("perm", [1, 0])
    if source is None or not source.is_initializer() or source.const_value is None or list(perm) != [1, 0]:
        return None
    return source if len(source.const_value.shape) == 2 else None


def is_quantized_weight(value: ir.Value) -> bool:
    """DequantizeLinear of initializers (codes, scales[, zero points]): a quantized weight."""
    producer = value.producer()
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and all(i is None or i.is_initializer() for i in producer.inputs)
    )


@dataclass(frozen=True)
class Linear:
    """x @ W (+ b) with W an initializer of shape [in, out] and b an optional [out] initializer.

    `columns` = (start, stop) makes it one part of a packed projection (Q, K or V of a packed QKV MatMul):
    the part's weight is W[:, start:stop] and its bias b[start:stop]; `node`, `weight` and `bias` are the
    packed ones, so R1 and the norm scales, which act on whole rows, fold into them once (`distinct`).
    """

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    bias_node: ir.Node | None
    columns: tuple[int, int] | None = None

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
        if self.columns is not None:
            return dims[0], self.columns[1] - self.columns[0]
        return dims[0], dims[1]

    @property
    def whole(self) -> Linear:
        """The projection as stored: the packed MatMul for a part, else itself."""
        return self if self.columns is None else replace(self, columns=None)


def distinct(linears: list[Linear]) -> list[Linear]:
    """`linears` with each stored weight once (the parts of a packed projection become the whole)."""
    seen: set[int] = set()
    out = []
    for lin in linears:
        if id(lin.weight) not in seen:
            seen.add(id(lin.weight))
            out.append(lin.whole)
    return out


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
    """One attention: eager (score MatMul, Softmax, value MatMul) or fused into one onnxruntime op.

    Fused (`fused` is the com.microsoft MultiHeadAttention or GroupQueryAttention node): Q, K and V are
    separate MatMuls feeding its query, key and value inputs, or parts (`Linear.columns`) of one packed
    QKV MatMul feeding its query input. RoPE is found before the op's inputs, or is inside it
    (GroupQueryAttention do_rotary=1: `q_rope` and `k_rope` are None); a cache the op holds itself (its
    past/present inputs and outputs) is not described by `key_cache` / `value_cache`.
    """

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    scores: ir.Node  # MatMul(Q, K^T); the fused attention node when fused
    q_rope: ir.Value | None  # RoPE outputs (None when no RoPE pattern precedes the score MatMul)
    k_rope: ir.Value | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_cache: ir.Value | None = None  # values as [batch, kv_heads, seq, head_dim], before any repeat
    key_cache: KVCache | None = None  # graphs with past_key_values inputs
    value_cache: KVCache | None = None
    fused: ir.Node | None = None

    @property
    def packed(self) -> bool:
        """Q, K and V are column ranges of one MatMul."""
        return self.q.columns is not None

    @property
    def rope_inside(self) -> bool:
        """RoPE is computed inside the fused op (GroupQueryAttention do_rotary=1), where R3 cannot reach."""
        return self.fused is not None and self.fused.attributes.get_int("do_rotary", 0) != 0

    @property
    def kind(self) -> str:
        """What the graph holds: eager, or the fused op with its Q/K/V layout and where RoPE is."""
        if self.fused is None:
            return "eager (score MatMul, Softmax, value MatMul)"
        qkv = "packed QKV MatMul" if self.packed else "separate Q/K/V MatMuls"
        rope = "RoPE inside" if self.rope_inside else "RoPE outside"
        return f"fused {self.fused.domain or 'ai.onnx'} {self.fused.op_type} ({qkv}, {rope})"


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
    """What structure discovery found; passes rewrite the model through these references.

    Where the rotations fold into these weights is stated once, in `rotgraph.structure.folds`.
    """

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

    def linears(self) -> list[Linear]:
        """Every Linear of the model: lm_head, then Q, K, V, O, gate, up, down of each block (a packed QKV
        MatMul once, as a whole)."""
        out = [self.lm_head]
        for b in self.blocks:
            a, m = b.attention, b.mlp
            out += [a.q, a.k, a.v, a.o, m.gate, m.up, m.down]
        return distinct(out)

    def norm_readers(self) -> list[list[Linear]]:
        """The Linears reading each norm, in the order of `norms()` (a packed QKV MatMul once, whole)."""
        groups = [
            distinct(g)
            for b in self.blocks
            for g in ([b.attention.q, b.attention.k, b.attention.v], [b.mlp.gate, b.mlp.up])
        ]
        return [*groups, [self.lm_head]]

    def norms(self) -> list[Norm]:
        return [n for b in self.blocks for n in (b.attn_norm, b.mlp_norm)] + [self.final_norm]
