"""Weights of synthetic decoders, drawn in chunks from their own seeded generators when written."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from rotgraph.synthetic.config import (
    BIAS_STD,
    CHUNK_ELEMENTS,
    EMBED_OUTLIER_GAIN,
    GLOBAL_LAYER,
    NORM_RANGE,
    WRITER_OUTLIER_GAIN,
    SyntheticConfig,
)

logger = logging.getLogger(__name__)

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
