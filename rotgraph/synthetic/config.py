"""Shapes of synthetic decoders, their presets and the constants of their trained-like statistics."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

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
