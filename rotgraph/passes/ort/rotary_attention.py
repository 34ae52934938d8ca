"""Move RoPE into onnxruntime's GroupQueryAttention (do_rotary with cos/sin caches)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.passes.ort.group_query_attention import MS_DOMAIN, flat_heads, rebuild_attention

logger = logging.getLogger(__name__)
T = TypeVar("T")

_THROUGH = ("Unsqueeze", "Expand", "Reshape", "Cast")  # between Cos/Sin and the Mul that applies them


@dataclass(frozen=True)
class Rope:
    """x * cos + rotate_half(x) * sin, with x [batch, heads, seq, head_dim]."""

    x: ir.Value
    cos: ir.Node  # the Cos node (its input: the angles, Concat(f, f) on the last axis)
    sin: ir.Node
    scale: float  # a constant the cos/sin tables are multiplied by (attention scaling), else 1


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = _producer(value, "Constant")
    if node is not None and "value" in node.attributes:
        return np.asarray(node.attributes["value"].as_tensor().numpy())
    return None


def _table(value: ir.Value | None, op_type: str) -> tuple[ir.Node, float] | None:
    """Walk back from the operand a RoPE Mul applies to the Cos or Sin node (through layout ops and a
    scalar scaling)."""
    scale = 1.0
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == op_type:
            return node, scale
        if node.op_type in _THROUGH:
            value = node.inputs[0]
        elif node.op_type == "Mul":
            factors = [_const(i) for i in node.inputs]
            scalar = [f for f in factors if f is not None and f.size == 1]
            if len(scalar) != 1:
                return None
            scale *= float(scalar[0].reshape(()))
            value = node.inputs[0] if factors[1] is not None else node.inputs[1]
        else:
            return None
    return None


def match_rope(value: ir.Value) -> Rope | None:
    """`value` = Add(Mul(x, cos), Mul(Concat(Neg(x2), x1), sin)) with x1, x2 the halves of x."""
    add = _producer(value, "Add")
    if add is None:
        return None
    muls = [_producer(i, "Mul") for i in add.inputs]
    if any(m is None for m in muls):
        return None
    for plain, rotated in (muls, muls[::-1]):
        assert plain is not None and rotated is not None
        for r_index in (0, 1):
            concat = _producer(rotated.inputs[r_index], "Concat")
            if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
                continue
            neg = _producer(concat.inputs[0], "Neg")
            high, low = (_producer(neg.inputs[0], "Slice") if neg else None), _producer(concat.inputs[1], "Slice")
            if high is None or low is None or high.inputs[0] is not low.inputs[0]:
                continue
            x = low.inputs[0]
            if x not in plain.inputs:
                continue
            cos = _table(plain.inputs[1 - list(plain.inputs).index(x)], "Cos")
            sin = _table(rotated.inputs[1 - r_index], "Sin")
            if cos is None or sin is None or cos[1] != sin[1]:
                return None
            assert x is not None
            return Rope(x, cos[0], sin[0], cos[1])
    return None


def inverse_frequencies(cos: ir.Node, head_dim: int) -> np.ndarray | None:
    """The constant [head_dim / 2] of the angles Concat(f, f) = positions x inv_freq feeding Cos."""
    concat = _producer(cos.inputs[0], "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    stack, seen, found = [concat.inputs[0]], set(), []
    while stack:
        value = stack.pop()
        if value is None or id(value) in seen:
            continue
        seen.add(id(value))
        array = _const(value)
        if array is not None and array.dtype.kind == "f" and array.size == head_dim // 2:
            found.append(array.reshape(-1))
            continue
        node = value.producer()
        if node is not None and node.op_type not in ("Shape", "Size"):
            stack.extend(node.inputs)
    return found[0].astype(np.float64) if len(found) == 1 else None


def plan_every_layer(nodes: list[ir.Node], plan: Callable[[ir.Node], str | T], what: str) -> list[T] | None:
    """`plan` of every attention node, or None (logging `what` and the first layer's reason, a string)
    when one layer does not match: these rewrites take all layers or none."""
    plans = []
    for index, node in enumerate(nodes):
        found = plan(node)
        if isinstance(found, str):
            logger.info("%s: layer %d: %s", what, index, found)
            return None
        plans.append(found)
    return plans


RopeTables = dict[tuple[int, int], tuple[ir.Value, ir.Value]]  # (id(Cos), id(Sin)) -> cos, sin caches


def rope_tables(
    graph: ir.Graph, rope: Rope, inv_freq: np.ndarray, max_length: int, made: RopeTables
) -> tuple[ir.Value, ir.Value]:
    """The cos/sin caches [max_length, head_dim / 2] of `rope`'s tables, scale * cos(p * inv_freq) for
    p = 0 .. max_length - 1 computed in float64 and stored in the type of the values RoPE rotates (the
    attention ops take them in their input's type: float32, or float16 in a float16 model); one pair per
    distinct (Cos, Sin) pair of the graph, kept in `made`."""
    key = (id(rope.cos), id(rope.sin))
    if key not in made:
        angles = np.arange(max_length, dtype=np.float64)[:, None] * inv_freq[None, :]
        dtype = rope.x.dtype or ir.DataType.FLOAT
        pair = []
        for name, fn in (("cos", np.cos), ("sin", np.sin)):
            array = (rope.scale * fn(angles)).astype(dtype.numpy())
            value = ir.Value(name=f"rotary_{name}_cache_{len(made)}", const_value=ir.Tensor(array))
            value.shape, value.dtype = ir.Shape(array.shape), dtype
            graph.register_initializer(value)
            pair.append(value)
        made[key] = (pair[0], pair[1])
    return made[key]


def flat_input(value: ir.Value | None) -> ir.Value | None:
    """The [batch, heads, seq, head_dim] value that GroupQueryAttentionPass flattened into `value`."""
    reshape = _producer(value, "Reshape")
    transpose = _producer(reshape.inputs[0], "Transpose") if reshape else None
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    return transpose.inputs[0]


class RotaryIntoAttentionPass(ir.passes.InPlacePass):
    """GroupQueryAttention reading RoPE'd Q and K -> GroupQueryAttention with do_rotary=1.

    For each com.microsoft GroupQueryAttention (as `GroupQueryAttentionPass` writes it: Q, K and V each
    flattened from [batch, heads, seq, head_dim]) whose Q and K are the rotate-half RoPE pattern
    x * cos + Concat(-x2, x1) * sin, with cos/sin = Cos/Sin(Concat(f, f)) of positions times a constant
    inverse-frequency vector (times an optional scalar attention scaling), the RoPE nodes are dropped: the
    attention reads the un-rotated Q and K and applies RoPE itself from cos/sin caches [max_length,
    head_dim / 2] computed here in float64 as cos(p * inv_freq) for p = 0 .. max_length - 1. Layout
    round trips (Transpose/Reshape pairs) around the heads are removed where they cancel.

    GroupQueryAttention counts positions itself (past length + i); that is the graph's own positions for
    unpadded rows, and for a left-padded row it shifts all of the row's positions by the same amount,
    which RoPE's relative scores do not see. Guarantees: the same function to float rounding for
    positions below `max_length`. All layers or none: when one layer does not match (no RoPE, partial
    rotary, interleaved RoPE, an online Hadamard after RoPE), nothing is rewritten and the reason is logged.
    """

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
        plans = plan_every_layer(nodes, self._plan, "RoPE stays outside GroupQueryAttention")
        if plans is None:
            return ir.passes.PassResult(model, False)
        tables: RopeTables = {}
        for node, (q, k, v, rope, inv_freq) in zip(nodes, plans, strict=True):
            cos_cache, sin_cache = rope_tables(graph, rope, inv_freq, self.max_length, tables)
            heads = node.attributes.get_int("num_heads", 0)
            kv_heads = node.attributes.get_int("kv_num_heads", 0)
            inputs = list(node.inputs) + [None] * max(0, 9 - len(node.inputs))
            inputs[0], inputs[1] = flat_heads(graph, q, heads), flat_heads(graph, k, kv_heads)
            inputs[2] = flat_heads(graph, v, kv_heads)
            inputs[7], inputs[8] = cos_cache, sin_cache
            attrs = {a.name: a for a in node.attributes.values()}
            attrs["do_rotary"] = ir.AttrInt64("do_rotary", 1)
            attrs["rotary_interleaved"] = ir.AttrInt64("rotary_interleaved", 0)
            rebuild_attention(graph, node, inputs, list(attrs.values()))
        RemoveUnusedNodesPass()(model)
        logger.info("RoPE moved into GroupQueryAttention in %d layers", len(nodes))
        return ir.passes.PassResult(model, bool(nodes))

    @staticmethod
    def _plan(node: ir.Node) -> str | tuple[ir.Value, ir.Value, ir.Value, Rope, np.ndarray]:
        if node.attributes.get_int("do_rotary", 0) or len(node.inputs) < 3 or node.inputs[1] is None:
            return "RoPE already inside, or packed QKV"
        q4, k4 = flat_input(node.inputs[0]), flat_input(node.inputs[1])
        if q4 is None or k4 is None:
            return "Q or K is not a head layout flattened by GroupQueryAttentionPass"
        q_rope, k_rope = match_rope(q4), match_rope(k4)
        if q_rope is None or k_rope is None:
            return "Q or K is not x * cos + rotate_half(x) * sin right before the attention"
        if (q_rope.cos, q_rope.sin, q_rope.scale) != (k_rope.cos, k_rope.sin, k_rope.scale):
            return "Q and K use different RoPE tables"
        width = q_rope.x.shape[-1] if q_rope.x.shape is not None and len(q_rope.x.shape) == 4 else None
        if not isinstance(width, int):
            return "the head width before RoPE is unknown"
        inv_freq = inverse_frequencies(q_rope.cos, width)
        if inv_freq is None:
            return "the RoPE angles are not positions x one constant vector of head_dim / 2 (Concat(f, f))"
        v4 = flat_input(node.inputs[2])
        if v4 is None:
            return "V is not a head layout flattened by GroupQueryAttentionPass"
        return q_rope.x, k_rope.x, v4, q_rope, inv_freq
