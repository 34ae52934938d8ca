"""The ONNX graph of a synthetic decoder, in the form of `rotgraph export --with-past`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from rotgraph.constants import CONFIG_KEY, EXPORTER_KEY, SOURCE_KEY
from rotgraph.synthetic.config import OPSET, SyntheticConfig
from rotgraph.synthetic.weights import SyntheticTensor, rope_inverse_frequencies, weight_specs

# --- graph -------------------------------------------------------------------------------------------


Dims = Sequence[int | str]  # a shape: sizes and symbolic dimensions


class _Builder:
    """Nodes with typed, shaped outputs, and named constants."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()
        self._constants = 0

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        dtype: ir.DataType,
        shape: Dims | None,
        **attributes: Any,
    ) -> ir.Value:
        value = self.tape.op(op_type, inputs, attributes or None)
        value.dtype = dtype
        value.shape = ir.Shape(shape) if shape is not None else None
        return value

    def const(self, array: Any, dtype: type[np.generic] = np.int64) -> ir.Value:
        self._constants += 1
        return self.tape.initializer(ir.tensor(np.asarray(array, dtype=dtype), name=f"const_{self._constants}"))

    def weight(self, tensor: ir.TensorProtocol) -> ir.Value:
        return self.tape.initializer(tensor)


def build_model(config: SyntheticConfig) -> ir.Model:
    """The model as an onnx_ir graph whose weights are `SyntheticTensor`s (nothing drawn yet)."""
    c, b = config, _Builder()
    f, i64, f32 = c.ir_dtype, ir.DataType.INT64, ir.DataType.FLOAT
    npf = c.np_dtype
    weights = {spec.name: b.weight(SyntheticTensor(c, spec)) for spec in weight_specs(c)}
    total = "past + seq" if c.kv_cache else "seq"
    input_ids = ir.val("input_ids", i64, ["batch", "seq"])
    past_values = [
        ir.val(f"past_key_values.{i}.{kind}", f, ["batch", c.kv_heads, "past", c.head_dim])
        for i in range(c.layers)
        for kind in ("key", "value")
    ]
    inputs = [input_ids, *past_values] if c.kv_cache else [input_ids]

    # Sizes, positions and the causal mask, from the shapes of the inputs.
    batch_1d = b.op("Shape", [input_ids], i64, [1], start=0, end=1)
    seq_1d = b.op("Shape", [input_ids], i64, [1], start=1, end=2)
    seq = b.op("Squeeze", [seq_1d], i64, [])
    if c.kv_cache:
        past = b.op("Squeeze", [b.op("Shape", [past_values[0]], i64, [1], start=2, end=3)], i64, [])
    else:
        past = b.const(0)
    one = b.const(1)
    length = b.op("Add", [past, seq], i64, [])
    length_1d = b.op("Reshape", [length, b.const([-1])], i64, [1])
    positions = b.op("Range", [past, length, one], i64, ["seq"])
    key_positions = b.op("Range", [b.const(0), length, one], i64, [total])
    visible = b.op(
        "LessOrEqual",
        [
            b.op("Unsqueeze", [key_positions, b.const([0])], i64, [1, total]),
            b.op("Unsqueeze", [positions, b.const([1])], i64, ["seq", 1]),
        ],
        ir.DataType.BOOL,
        ["seq", total],
    )
    mask = b.op("Where", [visible, b.const(0.0, npf), b.const(np.finfo(npf).min, npf)], f, ["seq", total])
    seq_positions = b.op("Unsqueeze", [positions, b.const([0, 2])], i64, [1, "seq", 1])
    seq_positions = b.op("Cast", [seq_positions], f32, [1, "seq", 1], to=f32)
    inverse_frequencies = b.const(rope_inverse_frequencies(c), np.float32)
    angle = b.op("Mul", [seq_positions, inverse_frequencies], f32, [1, "seq", c.head_dim // 2])
    angle = b.op("Concat", [angle, angle], f32, [1, "seq", c.head_dim], axis=-1)
    rope_shape: Dims = [1, 1, "seq", c.head_dim]
    cos, sin = (b.op(op, [angle], f32, [1, "seq", c.head_dim]) for op in ("Cos", "Sin"))
    if f != f32:
        cos, sin = (b.op("Cast", [t], f, [1, "seq", c.head_dim], to=f) for t in (cos, sin))
    cos, sin = (b.op("Unsqueeze", [t, b.const([1])], f, rope_shape) for t in (cos, sin))
    heads_shape = b.op("Concat", [batch_1d, seq_1d, b.const([-1]), b.const([c.head_dim])], i64, [4], axis=0)
    merged_shape = b.op("Concat", [batch_1d, seq_1d, b.const([-1])], i64, [3], axis=0)
    groups = c.heads // c.kv_heads
    expand_shape = b.op(
        "Concat", [batch_1d, b.const([c.kv_heads, groups]), length_1d, b.const([c.head_dim])], i64, [5], axis=0
    )
    repeat_shape = b.op("Concat", [batch_1d, b.const([c.heads]), length_1d, b.const([c.head_dim])], i64, [4], axis=0)
    half = c.head_dim // 2
    halves = (b.const([0]), b.const([half]), b.const([c.head_dim]), b.const([-1]))
    steps = b.const([1])
    eps, two = b.const(c.rms_eps, np.float32), b.const(2.0, np.float32)
    scale = b.const(1.0 / math.sqrt(c.head_dim), npf)
    hidden: Dims = ["batch", "seq", c.hidden]

    def rms_norm(x: ir.Value, weight: ir.Value) -> ir.Value:
        xf = b.op("Cast", [x], f32, hidden, to=f32) if f != f32 else x
        mean = b.op(
            "ReduceMean",
            [b.op("Pow", [xf, two], f32, hidden), halves[3]],
            f32,
            ["batch", "seq", 1],
            keepdims=1,
            noop_with_empty_axes=0,
        )
        inverse = b.op(
            "Reciprocal",
            [b.op("Sqrt", [b.op("Add", [mean, eps], f32, ["batch", "seq", 1])], f32, ["batch", "seq", 1])],
            f32,
            ["batch", "seq", 1],
        )
        normed = b.op("Mul", [xf, inverse], f32, hidden)
        if f != f32:
            normed = b.op("Cast", [normed], f, hidden, to=f)
        return b.op("Mul", [weight, normed], f, hidden)

    def linear(x: ir.Value, name: str, width: int) -> ir.Value:
        y = b.op("MatMul", [x, weights[f"{name}.weight"]], f, ["batch", "seq", width])
        bias = weights.get(f"{name}.bias")
        return b.op("Add", [y, bias], f, ["batch", "seq", width]) if bias is not None else y

    def split_heads(x: ir.Value, heads: int) -> ir.Value:
        x = b.op("Reshape", [x, heads_shape], f, ["batch", "seq", heads, c.head_dim], allowzero=1)
        return b.op("Transpose", [x], f, ["batch", heads, "seq", c.head_dim], perm=[0, 2, 1, 3])

    def rope(x: ir.Value, heads: int) -> ir.Value:
        shape: Dims = ["batch", heads, "seq", c.head_dim]
        half_shape: Dims = ["batch", heads, "seq", half]
        first = b.op("Slice", [x, halves[0], halves[1], halves[3], steps], f, half_shape)
        second = b.op("Slice", [x, halves[1], halves[2], halves[3], steps], f, half_shape)
        rotated = b.op("Concat", [b.op("Neg", [second], f, half_shape), first], f, shape, axis=-1)
        return b.op(
            "Add",
            [b.op("Mul", [x, cos], f, shape), b.op("Mul", [rotated, sin], f, shape)],
            f,
            shape,
        )

    def repeat_kv(x: ir.Value) -> ir.Value:
        if groups == 1:
            return x
        x = b.op("Unsqueeze", [x, b.const([2])], f, ["batch", c.kv_heads, 1, total, c.head_dim])
        x = b.op("Expand", [x, expand_shape], f, ["batch", c.kv_heads, groups, total, c.head_dim])
        return b.op("Reshape", [x, repeat_shape], f, ["batch", c.heads, total, c.head_dim], allowzero=1)

    outputs: list[ir.Value] = []
    x = b.op("Gather", [weights["model.embed_tokens.weight"], input_ids], f, hidden, axis=0)
    for i in range(c.layers):
        p = f"model.layers.{i}"
        h = rms_norm(x, weights[f"{p}.input_layernorm.weight"])
        q = rope(split_heads(linear(h, f"{p}.self_attn.q_proj", c.heads * c.head_dim), c.heads), c.heads)
        k = rope(split_heads(linear(h, f"{p}.self_attn.k_proj", c.kv_heads * c.head_dim), c.kv_heads), c.kv_heads)
        v = split_heads(linear(h, f"{p}.self_attn.v_proj", c.kv_heads * c.head_dim), c.kv_heads)
        if c.kv_cache:
            cache_shape: Dims = ["batch", c.kv_heads, total, c.head_dim]
            k = b.op("Concat", [past_values[2 * i], k], f, cache_shape, axis=-2)
            v = b.op("Concat", [past_values[2 * i + 1], v], f, cache_shape, axis=-2)
            k.name, v.name = f"present.{i}.key", f"present.{i}.value"
            outputs += [k, v]
        keys_t = b.op("Transpose", [repeat_kv(k)], f, ["batch", c.heads, c.head_dim, total], perm=[0, 1, 3, 2])
        score_shape: Dims = ["batch", c.heads, "seq", total]
        scores = b.op("MatMul", [q, keys_t], f, score_shape)
        scores = b.op("Add", [b.op("Mul", [scores, scale], f, score_shape), mask], f, score_shape)
        probs = b.op("Softmax", [scores], f, score_shape, axis=-1)
        attended = b.op("MatMul", [probs, repeat_kv(v)], f, ["batch", c.heads, "seq", c.head_dim])
        attended = b.op("Transpose", [attended], f, ["batch", "seq", c.heads, c.head_dim], perm=[0, 2, 1, 3])
        attended = b.op("Reshape", [attended, merged_shape], f, ["batch", "seq", c.heads * c.head_dim], allowzero=1)
        x = b.op("Add", [x, linear(attended, f"{p}.self_attn.o_proj", c.hidden)], f, hidden)
        h = rms_norm(x, weights[f"{p}.post_attention_layernorm.weight"])
        gate = linear(h, f"{p}.mlp.gate_proj", c.intermediate)
        mlp_shape: Dims = ["batch", "seq", c.intermediate]
        gate = b.op("Mul", [gate, b.op("Sigmoid", [gate], f, mlp_shape)], f, mlp_shape)
        gated = b.op("Mul", [gate, linear(h, f"{p}.mlp.up_proj", c.intermediate)], f, mlp_shape)
        x = b.op("Add", [x, linear(gated, f"{p}.mlp.down_proj", c.hidden)], f, hidden)
    h = rms_norm(x, weights["model.norm.weight"])
    embedding = weights["model.embed_tokens.weight"]
    head = b.op("Transpose", [embedding], f, [c.hidden, c.vocab], perm=[1, 0]) if c.tied else weights["lm_head.weight"]
    logits = b.op("MatMul", [h, head], f, ["batch", "seq", c.vocab])
    logits.name = "logits"

    graph = ir.Graph(
        inputs,
        [logits, *outputs],
        nodes=b.tape.nodes,
        initializers=b.tape.initializers,
        opset_imports={"": OPSET},
        name="main_graph",
    )
    model = ir.Model(graph, ir_version=10, producer_name="rotgraph.synthetic")
    model.metadata_props[CONFIG_KEY] = json.dumps(c.hf_config())
    model.metadata_props[EXPORTER_KEY] = "synthetic"
    model.metadata_props[SOURCE_KEY] = f"synthetic (seed {c.seed})"
    return model
