"""Subtract each projection input's calibrated mean before its activation quantizer; add it back as a bias."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph.constants import ACTIVATION_MEAN_KEY
from rotgraph.errors import StructureError
from rotgraph.passes.ort.pack_qkv import new_initializer
from rotgraph.probe import probe
from rotgraph.structure import Linear, discover
from rotgraph.structure.model import distinct

logger = logging.getLogger(__name__)


class CenterActivationsPass(ir.passes.InPlacePass):
    """x W (+ b) -> (x - m) W + (b + m W) at the inputs the per-token activation quantizers read: Q/K/V's
    (shared), O's, gate/up's (shared) and down's in every block. m is the mean of that input over the
    tokens of `token_windows` [n, seq], per channel, stored as the constant of a `Sub` that only the
    projections read; m W is computed in float64 and added to the projection's bias (a new bias `Add`
    where it had none, which structure discovery reads as Qwen2's biases).

    The float model computes the same function (up to float32 rounding of the two constants). What
    changes is what a per-token quantizer sees: after RMSNorm (and R1) about half of every token's energy
    on SmolLM2 is one direction common to all tokens, which a per-token grid spends its range on (an
    asymmetric grid too: its zero point shifts the token's own mean over channels, not a per-channel
    offset); the bias carries that part exactly. (The channel-wise shift of Outlier Suppression+.)

    Run it on the float graph after the rotation and any SmoothQuant, before the GPTQ and clip
    calibrations (so they see the centered inputs) and the activation quantizers. Guarantees: each
    distinct input is shifted once and every projection reading it reads the shifted value; refuses a
    graph it already ran on and inputs whose projections disagree on what they read.
    """

    def __init__(self, token_windows: np.ndarray, scratch: Path | None = None) -> None:
        super().__init__()
        self.token_windows, self.scratch = token_windows, scratch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if ACTIVATION_MEAN_KEY in model.metadata_props:
            raise StructureError("the activations' means were already subtracted from this graph")
        sites: list[tuple[str, ir.Value, list[Linear]]] = []
        for block in discover(model).blocks:
            a, m = block.attention, block.mlp
            for site, readers in (
                ("qkv", [a.q, a.k, a.v]),
                ("o", [a.o]),
                ("gate_up", [m.gate, m.up]),
                ("down", [m.down]),
            ):
                value = readers[0].input
                if any(lin.input is not value for lin in readers):
                    raise StructureError(f"block {block.index}: the {site} projections read different inputs")
                sites.append((f"block{block.index}.{site}", value, distinct(readers)))
        values = [value for _, value, _ in sites]
        sums = [np.zeros(_width(value), np.float64) for value in values]
        count = 0
        for p in probe(
            model, values, self.token_windows, scratch=self.scratch, what="calibrate (activation means)", progress=True
        ):
            sums[p.value] += np.asarray(p.array, dtype=np.float64).reshape(-1, sums[p.value].size).sum(axis=0)
            count += int(np.prod(p.array.shape[:-1])) if p.value == 0 else 0
        for (name, value, readers), total in zip(sites, sums, strict=True):
            _center(model, value, total / count, readers, name)
        model.metadata_props[ACTIVATION_MEAN_KEY] = (
            f"{len(self.token_windows)} windows of {self.token_windows.shape[1]} tokens"
        )
        logger.info("activation means subtracted at %d projection inputs", len(sites))
        return ir.passes.PassResult(model, bool(sites))


def _width(value: ir.Value) -> int:
    width = value.shape[-1] if value.shape is not None and len(value.shape) else None
    if not isinstance(width, int):
        raise StructureError(f"projection input {value.name!r} has no static channel count")
    return width


def _weight(lin: Linear) -> np.ndarray:
    tensor = lin.weight.const_value
    if tensor is None:
        raise StructureError(
            f"projection {lin.node.name!r}: its weight is not a float initializer (already quantized?)"
        )
    return tensor.numpy()


def _center(model: ir.Model, value: ir.Value, mean: np.ndarray, readers: list[Linear], name: str) -> None:
    """Make `readers` read value - mean and add mean W to each one's output."""
    dtype = _weight(readers[0]).dtype
    constant = new_initializer(model.graph, f"{name}.mean", mean.astype(dtype))
    sub = ir.Node("", "Sub", [value, constant], name=f"{name}_center")
    shifted = sub.outputs[0]
    shifted.name, shifted.shape, shifted.type = f"{value.name}_centered", value.shape, value.type
    producer = value.producer()
    if producer is None:
        raise StructureError(f"projection input {value.name!r} is a graph input: nothing computes it to shift")
    model.graph.insert_after(producer, sub)
    for lin in readers:
        lin.node.replace_input_with(0, shifted)
        shift = mean @ _weight(lin).astype(np.float64)
        bias_name = f"{lin.node.name}.mean_bias"
        if lin.bias is not None and lin.bias_node is not None:  # a new initializer: the old one may be shared
            assert lin.bias.const_value is not None
            shift = shift + lin.bias.const_value.numpy().astype(np.float64)
            bias = new_initializer(model.graph, bias_name, shift.astype(dtype))
            lin.bias_node.replace_input_with(list(lin.bias_node.inputs).index(lin.bias), bias)
            continue
        bias = new_initializer(model.graph, bias_name, shift.astype(dtype))
        out = lin.output
        add = ir.Node("", "Add", [out, bias], name=f"{lin.node.name}_mean_bias")
        biased = add.outputs[0]
        biased.shape, biased.type = out.shape, out.type
        out_name = out.name
        out.replace_all_uses_with(biased, replace_graph_outputs=True)
        add.replace_input_with(0, out)
        biased.name = f"{out_name}_mean_biased"
        model.graph.insert_after(lin.node, add)
