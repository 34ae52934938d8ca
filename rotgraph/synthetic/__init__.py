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

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from rotgraph import io
from rotgraph.synthetic.config import MODEL_FILE, PRESETS, TOKENIZER_VOCAB, RopeScaling, SyntheticConfig, preset
from rotgraph.synthetic.graph import build_model
from rotgraph.synthetic.weights import (
    WeightSpec,
    hf_state_dict,
    outlier_channels,
    rope_inverse_frequencies,
    weight_array,
    weight_arrays,
    weight_specs,
)

logger = logging.getLogger(__name__)

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


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rotgraph.synthetic` (`rotgraph.synthetic.cli`)."""
    from rotgraph.synthetic.cli import main as cli_main

    return cli_main(argv)


__all__ = [
    "MODEL_FILE",
    "PRESETS",
    "RopeScaling",
    "SyntheticConfig",
    "WeightSpec",
    "build_model",
    "hf_state_dict",
    "main",
    "outlier_channels",
    "parameter_count",
    "preset",
    "rope_inverse_frequencies",
    "weight_array",
    "weight_arrays",
    "weight_bytes",
    "weight_specs",
    "write_model",
]
