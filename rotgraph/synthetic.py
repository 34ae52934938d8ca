"""Random-weight decoders at real widths, written as ONNX directly (no torch, no transformers).

    python -m rotgraph.synthetic --preset llama-3.1-8b --layers 32 --dtype float16 -o DIR

writes `DIR/model.onnx`, its external data `DIR/model.onnx.data` and a small `DIR/tokenizer.json` in
the form of `rotgraph export --with-past` (the dynamo exporter's graph of a Hugging Face Llama or Qwen2
with eager attention):

- inputs `input_ids` [batch, seq] and `past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim];
  outputs `logits` [batch, seq, vocab] and `present.{i}.key|value` [batch, kv_heads, past + seq, head_dim]
  (`kv_cache=False`: `input_ids` -> `logits` only); opset 20, IR version 10; positions and the causal
  mask follow from the past length inside the graph;
- decomposed RMSNorm (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul; in float16 computed in float32
  between two Casts), projections as MatMul by [in, out] initializers (+ bias Add for Qwen2's Q/K/V),
  rotate-half RoPE on Q and K, grouped-query attention with the cache Concat before the KV heads are
  repeated (Unsqueeze, Expand, Reshape), scores scaled by 1/sqrt(head_dim) plus an additive causal
  mask, Softmax, SwiGLU MLP (x * Sigmoid(x) gate), lm_head as a MatMul (tied: by Transpose(E));
- the configuration in the metadata (`rotgraph.config`), as `rotgraph export` records it.

Weights are drawn when they are written, in row chunks from their own generator
(`numpy.random.default_rng([seed, layer, index])`), so writing holds at most one chunk of one weight
and a model's first layers do not depend on how many follow. They are trained-like: projections
N(0, 1/fan_in), norm weights uniform in [0.2, 2.0] (never all ones), and `outliers` fixed residual
channels that the embedding (x20) and every o_proj and down_proj (x8) write with large magnitude, so
rotating the residual stream matters. Magnitudes stay far below float16's range at 80 layers.
Initializers carry Hugging Face's names; projections are stored transposed, as exporters store them
(`hf_state_dict` gives the Hugging Face layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from rotgraph import io
from rotgraph.constants import CONFIG_KEY, EXPORTER_KEY, SOURCE_KEY

logger = logging.getLogger(__name__)

DType = Literal["float32", "float16"]
OPSET = 20  # what the dynamo exporter writes; rotgraph raises it to 23 itself
MODEL_FILE = "model.onnx"
GLOBAL_LAYER = 1 << 20  # the `layer` seed word of the weights outside the blocks
CHUNK_ELEMENTS = 1 << 22  # values drawn at once while writing (16 MB of float32)

# Trained-like statistics.
NORM_RANGE = (0.2, 2.0)
EMBED_OUTLIER_GAIN = 20.0
WRITER_OUTLIER_GAIN = 8.0
BIAS_STD = 0.1
TOKENIZER_VOCAB = 512  # the tokenizer.json written beside the model (byte-level BPE: at least 259)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's "llama3" frequency scaling of RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class SyntheticConfig:
    """A Llama (or, with `qkv_bias`, Qwen2) decoder's shape, the graph's form and the weights' seed."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = False
    qkv_bias: bool = False
    dtype: DType = "float32"
    seed: int = 0
    rope_scaling: RopeScaling | None = None
    max_positions: int = 131072
    kv_cache: bool = True
    outliers: int = 4
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        problems = []
        if min(self.hidden, self.intermediate, self.layers, self.heads, self.kv_heads, self.vocab) < 1:
            problems.append("widths, layers and vocab must be positive")
        if self.heads % max(self.kv_heads, 1):
            problems.append(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim < 2 or self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even (rotate-half RoPE)")
        if self.dtype not in ("float32", "float16"):
            problems.append(f"dtype {self.dtype!r} is not float32 or float16")
        if not 0 <= self.outliers < self.hidden:
            problems.append(f"outliers {self.outliers} must be in [0, hidden)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def model_type(self) -> str:
        return "qwen2" if self.qkv_bias else "llama"

    @property
    def np_dtype(self) -> type[np.floating[Any]]:
        return np.float16 if self.dtype == "float16" else np.float32

    @property
    def ir_dtype(self) -> ir.DataType:
        return ir.DataType.FLOAT16 if self.dtype == "float16" else ir.DataType.FLOAT

    def hf_config(self) -> dict[str, Any]:
        """The Hugging Face config fields of this model (also recorded in the graph's metadata)."""
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tied,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
        }
        if self.rope_scaling is not None:
            config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return config


PRESETS: dict[str, SyntheticConfig] = {
    "llama-3.1-8b": SyntheticConfig(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        rope_theta=500000.0,
        rms_eps=1e-5,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        max_positions=131072,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "qwen2.5-7b": SyntheticConfig(
        hidden=3584,
        intermediate=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        head_dim=128,
        vocab=152064,
        rope_theta=1000000.0,
        rms_eps=1e-6,
        qkv_bias=True,
        max_positions=32768,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    "llama-3-70b": SyntheticConfig(
        hidden=8192,
        intermediate=28672,
        layers=80,
        heads=64,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        rope_theta=500000.0,
        rms_eps=1e-5,
        max_positions=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def preset(name: str, **overrides: Any) -> SyntheticConfig:
    """The preset `name` (a key of PRESETS) with some fields replaced (layers=2, dtype="float16", ...)."""
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r} (presets: {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name], **overrides)


# --- weights -----------------------------------------------------------------------------------------

Kind = Literal["embedding", "norm", "reader", "writer", "bias", "lm_head"]


@dataclass(frozen=True)
class WeightSpec:
    """One initializer: its name, its ONNX shape ([in, out] for projections), how it is drawn, and
    the words that seed its generator."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    layer: int
    index: int


def weight_specs(config: SyntheticConfig) -> list[WeightSpec]:
    """Every weight of the model, in the order the graph reads them."""
    c = config
    q_dim, kv_dim = c.heads * c.head_dim, c.kv_heads * c.head_dim
    specs = [WeightSpec("model.embed_tokens.weight", (c.vocab, c.hidden), "embedding", GLOBAL_LAYER, 0)]
    for i in range(c.layers):
        p = f"model.layers.{i}"
        specs.append(WeightSpec(f"{p}.input_layernorm.weight", (c.hidden,), "norm", i, 7))
        for j, (proj, width) in enumerate((("q", q_dim), ("k", kv_dim), ("v", kv_dim))):
            specs.append(WeightSpec(f"{p}.self_attn.{proj}_proj.weight", (c.hidden, width), "reader", i, j))
            if c.qkv_bias:
                specs.append(WeightSpec(f"{p}.self_attn.{proj}_proj.bias", (width,), "bias", i, 9 + j))
        specs.append(WeightSpec(f"{p}.self_attn.o_proj.weight", (q_dim, c.hidden), "writer", i, 3))
        specs.append(WeightSpec(f"{p}.post_attention_layernorm.weight", (c.hidden,), "norm", i, 8))
        specs.append(WeightSpec(f"{p}.mlp.gate_proj.weight", (c.hidden, c.intermediate), "reader", i, 4))
        specs.append(WeightSpec(f"{p}.mlp.up_proj.weight", (c.hidden, c.intermediate), "reader", i, 5))
        specs.append(WeightSpec(f"{p}.mlp.down_proj.weight", (c.intermediate, c.hidden), "writer", i, 6))
    specs.append(WeightSpec("model.norm.weight", (c.hidden,), "norm", GLOBAL_LAYER, 1))
    if not c.tied:
        specs.append(WeightSpec("lm_head.weight", (c.hidden, c.vocab), "lm_head", GLOBAL_LAYER, 2))
    return specs


def outlier_channels(config: SyntheticConfig) -> np.ndarray:
    """The residual channels the embedding and the writers put large values on (sorted)."""
    rng = np.random.default_rng([config.seed, GLOBAL_LAYER, 3])
    return np.sort(rng.choice(config.hidden, size=config.outliers, replace=False))


def _chunks(config: SyntheticConfig, spec: WeightSpec) -> Iterator[np.ndarray]:
    """The weight's values in row chunks, in the model's dtype. The chunking depends only on the shape,
    so drawing the whole weight and writing it chunk by chunk give the same values."""
    rng = np.random.default_rng([config.seed, spec.layer, spec.index])
    if spec.kind == "norm":
        low, high = NORM_RANGE
        yield (low + (high - low) * rng.random(spec.shape, dtype=np.float32)).astype(config.np_dtype)
        return
    if spec.kind == "bias":
        yield (BIAS_STD * rng.standard_normal(spec.shape, dtype=np.float32)).astype(config.np_dtype)
        return
    rows, columns = spec.shape
    std = np.float32(1.0 / math.sqrt(columns if spec.kind == "embedding" else rows))
    gain = {"embedding": EMBED_OUTLIER_GAIN, "writer": WRITER_OUTLIER_GAIN}.get(spec.kind)
    outliers = outlier_channels(config) if gain is not None else None
    step = max(1, CHUNK_ELEMENTS // columns)
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), columns), dtype=np.float32)
        chunk *= std
        if outliers is not None:
            chunk[:, outliers] *= np.float32(gain)
        yield chunk.astype(config.np_dtype, copy=False)


def weight_array(config: SyntheticConfig, spec: WeightSpec) -> np.ndarray:
    """The whole weight (ONNX layout, the model's dtype)."""
    return np.concatenate(list(_chunks(config, spec))).reshape(spec.shape)


def weight_arrays(config: SyntheticConfig) -> dict[str, np.ndarray]:
    """Every weight by initializer name (ONNX layout); for small models and tests."""
    return {spec.name: weight_array(config, spec) for spec in weight_specs(config)}


def hf_state_dict(config: SyntheticConfig) -> dict[str, np.ndarray]:
    """The weights under Hugging Face's names and layouts ([out, in] projections, lm_head tied or not),
    to load into `LlamaForCausalLM` / `Qwen2ForCausalLM` as an independent reference."""
    state = {}
    for name, array in weight_arrays(config).items():
        state[name] = array.T.copy() if array.ndim == 2 and name != "model.embed_tokens.weight" else array
    if config.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


class SyntheticTensor(ir.LazyTensor):
    """A weight that is drawn only when read: whole by `numpy()`, chunk by chunk by `tofile()` (what
    `ir.save` calls for external data), so saving a model holds one chunk at a time."""

    def __init__(self, config: SyntheticConfig, spec: WeightSpec) -> None:
        super().__init__(partial(_as_tensor, config, spec), config.ir_dtype, ir.Shape(spec.shape), name=spec.name)
        self._draw = partial(_chunks, config, spec)

    def tofile(self, file: Any) -> None:
        for chunk in self._draw():
            file.write(chunk.tobytes())


def _as_tensor(config: SyntheticConfig, spec: WeightSpec) -> ir.Tensor:
    return ir.Tensor(weight_array(config, spec), name=spec.name)


def rope_inverse_frequencies(config: SyntheticConfig) -> np.ndarray:
    """RoPE's inverse frequencies [head_dim / 2] (float32), with Llama 3.1's scaling when configured."""
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


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


# --- writing -----------------------------------------------------------------------------------------


def weight_bytes(config: SyntheticConfig) -> int:
    """Bytes of all weights in the model's dtype."""
    itemsize = np.dtype(config.np_dtype).itemsize
    return sum(math.prod(spec.shape) for spec in weight_specs(config)) * itemsize


def parameter_count(config: SyntheticConfig) -> int:
    return sum(math.prod(spec.shape) for spec in weight_specs(config))


def write_model(config: SyntheticConfig, folder: str | Path, progress: bool = False, tokenizer: bool = True) -> Path:
    """Write `folder/model.onnx` and `folder/model.onnx.data`; returns the model's path. Staged beside
    the output and moved into place at the end (`io.staged_output`): an interrupted run leaves no file.

    With `tokenizer` (and a vocabulary of at least TOKENIZER_VOCAB), also `tokenizer.json`: a byte-level
    BPE of TOKENIZER_VOCAB tokens (`rotgraph.testing.train_tokenizer`), so that the commands that read
    text (calibration, eval, generate) run on the model as on an export."""
    path = Path(folder) / MODEL_FILE
    model = build_model(config)
    if tokenizer and config.vocab < TOKENIZER_VOCAB:
        logger.info("no tokenizer: the vocabulary (%d) is below %d", config.vocab, TOKENIZER_VOCAB)
        tokenizer = False
    logger.info(
        "writing %s: %d layers, %.2f B parameters, %.2f GB of %s weights",
        path,
        config.layers,
        parameter_count(config) / 1e9,
        weight_bytes(config) / 1e9,
        config.dtype,
    )
    with io.staged_output(path) as staged:
        if progress:
            from tqdm import tqdm

            with tqdm(desc="weights", unit="weight") as bar:  # the callback sets the total
                io.save_model(model, staged, callback=_progress(bar))
                bar.update((bar.total or 0) - bar.n)
        else:
            io.save_model(model, staged)
        if tokenizer:
            from rotgraph.testing import train_tokenizer

            train_tokenizer(TOKENIZER_VOCAB).save(str(staged.parent / io.TOKENIZER_FILE))
    return path


def _progress(bar: Any) -> Callable[[ir.TensorProtocol, Any], None]:
    def update(tensor: ir.TensorProtocol, info: Any) -> None:
        bar.total = info.total
        bar.update(info.index - bar.n)
        bar.set_postfix_str(str(tensor.name), refresh=False)

    return update


# --- command line ------------------------------------------------------------------------------------

_WIDTHS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rotgraph.synthetic",
        description="Write a random-weight Llama/Qwen2 decoder as ONNX (model.onnx + model.onnx.data) in the "
        "form of `rotgraph export --with-past`, weight by weight.",
    )
    p.add_argument("--preset", choices=list(PRESETS), help="real widths; the flags below override its fields")
    for name in _WIDTHS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="required without --preset")
    p.add_argument("--rope-theta", type=float)
    p.add_argument("--rms-eps", type=float)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="lm_head tied to the embedding")
    p.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None, help="Q/K/V biases (Qwen2)")
    p.add_argument(
        "--kv-cache", action=argparse.BooleanOptionalAction, default=None, help="past/present inputs (default on)"
    )
    p.add_argument("--dtype", choices=["float32", "float16"])
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write a {TOKENIZER_VOCAB}-token tokenizer.json beside the model (default on; vocab >= {TOKENIZER_VOCAB})",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write model.onnx into")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.preset is not None:
        return preset(args.preset, **given)
    missing = [f"--{name.replace('_', '-')}" for name in _WIDTHS if name not in given]
    if missing:
        raise ValueError(f"without --preset, give {' '.join(missing)}")
    return SyntheticConfig(**given)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"rotgraph.synthetic: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = write_model(config, args.output, progress=not args.quiet, tokenizer=args.tokenizer)
    print(
        f"{path}: {config.layers} layers, {parameter_count(config) / 1e6:,.1f} M parameters, "
        f"{weight_bytes(config) / 1e6:,.1f} MB of {config.dtype} weights, {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
