"""Subtract the keys' mean, calibrated on text, before the KV cache quantizer reads them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph.constants import KEY_MEAN_KEY
from rotgraph.errors import StructureError
from rotgraph.passes.quantization.quantize_kv import cached_keys
from rotgraph.probe import probe
from rotgraph.structure import discover

logger = logging.getLogger(__name__)


class SubtractKeyMeanPass(ir.passes.InPlacePass):
    """keys -> keys - mean(keys) in every block: the mean over the tokens of `token_windows` [n, seq] of
    the keys after RoPE (and R3), per KV head and channel, stored as a constant.

    Each query's scores all move by q . mean, and softmax does not see a shift common to every key, so
    the float model computes the same function (masks and caches included: every key, cached or new,
    moves alike, and a `present` output holds the moved keys). What changes is what the cache quantizer
    sees: keys carry a large common component (on SmolLM2 about half their energy) that a per-token
    grid spends its range on; without it the same codes resolve the part that differs between keys.
    (The observation is SageAttention's, which smooths K this way before its int8 attention.)

    Run it on the float graph after the rotation and before `QuantizeKVCachePass`. Refuses a graph it
    already ran on, and keys whose sequence axis it cannot tell from their shape.
    """

    def __init__(self, token_windows: np.ndarray, scratch: Path | None = None) -> None:
        super().__init__()
        self.token_windows, self.scratch = token_windows, scratch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if KEY_MEAN_KEY in model.metadata_props:
            raise StructureError("the keys' mean was already subtracted from this graph")
        blocks = discover(model).blocks
        keys = [cached_keys(b.attention) for b in blocks]
        seq = self.token_windows.shape[1]
        sums: dict[int, np.ndarray] = {}
        count = 0
        for p in probe(
            model, keys, self.token_windows, scratch=self.scratch, what="calibrate (key means)", progress=True
        ):
            axes = (0, _sequence_axis(keys[p.value], p.array.shape, seq))
            s = np.asarray(p.array, dtype=np.float64).sum(axis=axes, keepdims=True)
            sums[p.value] = sums[p.value] + s if p.value in sums else s
            count += p.array.shape[0] * seq if p.value == 0 else 0
        for block, value, total in zip(blocks, keys, (sums[i] for i in range(len(keys))), strict=True):
            dtype = (value.dtype or ir.DataType.FLOAT).numpy()  # the keys' own type (float16 in a float16 model)
            _subtract(model, value, (total / count).astype(dtype), f"block{block.index}.key_mean")
        model.metadata_props[KEY_MEAN_KEY] = f"{len(self.token_windows)} windows of {seq} tokens"
        logger.info(
            "key means subtracted in %d blocks (%d windows of %d tokens)", len(blocks), len(self.token_windows), seq
        )
        return ir.passes.PassResult(model, bool(blocks))


def _sequence_axis(value: ir.Value, shape: tuple[int, ...], seq: int) -> int:
    """The one axis after the batch whose length is the window's."""
    axes = [i for i in range(1, len(shape)) if shape[i] == seq]
    if len(axes) != 1:
        raise StructureError(
            f"keys {value.name!r} of shape {shape} on windows of {seq} tokens: cannot tell their sequence axis"
        )
    return axes[0]


def _subtract(model: ir.Model, keys: ir.Value, mean: np.ndarray, name: str) -> None:
    """Make every reader of `keys` (and the graph output, if it is one) read keys - mean."""
    producer = keys.producer()
    if producer is None:
        raise StructureError(f"keys {keys.name!r} are a graph input: nothing computes them to shift")
    constant = ir.Value(name=name, const_value=ir.tensor(mean, name=name))
    model.graph.register_initializer(constant)
    sub = ir.Node("", "Sub", [keys, constant], name=f"{name}_sub")
    shifted = sub.outputs[0]
    shifted.shape, shifted.type = keys.shape, keys.type
    keys_name, is_output = keys.name, keys in model.graph.outputs
    keys.replace_all_uses_with(shifted, replace_graph_outputs=True)
    sub.replace_input_with(0, keys)  # the one reader left on the unshifted keys
    shifted.name = f"{keys_name}_centered"
    if is_output:  # the graph's output keeps its name
        keys.name, shifted.name = shifted.name, keys_name
    model.graph.insert_after(producer, sub)
