"""SpinQuant's end-to-end objective: the fake-quantized network's next-token loss as a function of R1
and the per-layer R2s (`rotgraph learn --objective end-to-end`, the default).

The network being trained is the ONNX graph itself, run by `TorchGraph`: the float model is brought to
the form the rotation passes produce (canonical norms, untied lm_head, norm scales fused, R3/R4
inserted online), activations and the KV cache get the scheme's FakeQuant ops from the same passes
`rotgraph quantize` uses, and every weight the rotations touch is replaced, on each step, by its
rotated and RTN fake-quantized value computed from the trainable R1/R2 (straight-through rounding).
Only the rotations are trained; they start from QuaRot's seeded randomized Hadamards and are updated
by Cayley SGD (`rotgraph.learning.loop`), so they stay orthogonal and fold into the weights exactly as
QuaRot's do. Each step's windows are drawn from the step number alone (`batch_indices`); under torchrun
each process takes its share of them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from rotgraph.errors import RotgraphError
from rotgraph.inputs import input_roles
from rotgraph.learning.loop import Rotations, Stage
from rotgraph.learning.quantizers import WeightQuantizer
from rotgraph.learning.torch_graph import Override, TorchGraph
from rotgraph.options import Scheme
from rotgraph.passes import InsertDownHadamardPass, InsertQKHadamardPass
from rotgraph.passes.canonical.split_rotary import SplitRotaryPass
from rotgraph.pipeline import foldable_form_passes, run_passes
from rotgraph.stages import activation_passes
from rotgraph.structure import (
    ModelDescription,
    discover,
    r1_readers,
    r1_writers,
    r2_pairs,
    rotate_head_columns,
    rotate_head_rows,
)


def learning_graph(
    model: ir.Model, scheme: Scheme, online: bool = True, act_clip: float | None = None, act_symmetric: bool = True
) -> ModelDescription:
    """Bring `model` (in place) to the form SpinQuant trains: the rotation pipeline without R1/R2,
    with the scheme's activation and KV-cache FakeQuant ops; weights stay float. As in `quantize`, a kv
    scheme first moves RoPE out of a fused attention op (R3 and the cache quantizer act after it);
    otherwise R3 is left out where RoPE stays inside (with a float cache it cancels in Q K^T)."""
    passes: list[ir.passes.PassBase] = [SplitRotaryPass()] if scheme.kv_bits is not None else []
    passes += foldable_form_passes()
    if online:
        passes += [InsertQKHadamardPass(skip_rope_inside=True), InsertDownHadamardPass()]
    # KV FakeQuant even where the graph has a cache
    passes += activation_passes(scheme, act_clip, store_cache=False, act_symmetric=act_symmetric)
    run_passes(model, passes)
    return discover(model)


def _rotated_input_times(
    x: ir.Value, key: ir.Value, r1: torch.Tensor, w: torch.Tensor, env: dict[ir.Value, torch.Tensor]
) -> torch.Tensor:
    """(x R1^T) W, with x R1^T computed once per run of the graph (or of a checkpointed segment, which
    runs on its own copy of `env`) for all the Linears reading x: `env` keeps it under `key`, a value
    of no graph."""
    if key not in env:
        env[key] = env[x] @ r1.T
    return env[key] @ w


def _times_rotated(x: ir.Value, w: torch.Tensor, r1: torch.Tensor, env: dict[ir.Value, torch.Tensor]) -> torch.Tensor:
    """(x W) R1: a residual writer's output with R1 on it rather than on W."""
    return (env[x] @ w) @ r1


class RotatedNetwork(Rotations):
    """The fake-quantized network of a `learning_graph` model as a function of trainable R1 and R2s.

    `forward(ids)` returns the logits of the graph with every weight replaced by its rotated (and,
    for w4/w8 schemes, RTN fake-quantized) value: the network `rotgraph quantize --rotation spinquant`
    builds from these rotations, up to GPTQ and the clipping search of the final weight quantizer.
    The weights each rotation touches are those `rotgraph.structure.folds` lists for the passes.
    """

    def __init__(
        self,
        model: ir.Model,
        scheme: Scheme,
        group: int,
        head_bits: int,
        seed: int,
        checkpointing: bool = True,
        keep_products: bool = False,
        compile_quantizer: bool = False,
    ) -> None:
        desc = discover(model)
        super().__init__(desc.hidden_size, desc.blocks[0].attention.head_dim, len(desc.blocks), seed)
        self.desc = desc
        # checkpointing: per-block activation memory for one more forward pass (TorchGraph)
        cuts = [b.residual_out for b in desc.blocks] if checkpointing else []
        self.graph = TorchGraph(model, checkpoint_after=cuts, keep_products=keep_products)
        # token ids, and for exports that take them an all-ones mask, positions 0.. and empty KV caches
        self.roles = input_roles(model)
        self.weight_bits = scheme.weight_bits
        self.head_bits = head_bits if scheme.weight_bits < 16 else 16
        self.group = group
        self._weight_quant = WeightQuantizer(compile_quantizer)
        for lin in desc.linears():
            if lin.weight not in self.graph.constants:
                raise RotgraphError(f"{lin.node.name}: the weight is not a float initializer")
        # R1 on the activations (`rotates_activations`): a key for each rotated Linear input, the sites
        # (products by R1 per token) and the weights' widths (products by R1 per weight row or column)
        readers = {lin.weight: lin for lin in r1_readers(desc) if lin is not desc.lm_head}
        writers = {lin.weight: lin for lin in r1_writers(desc)}
        self._rotated_inputs = {lin.input: ir.Value(name=f"{lin.input.name}.R1T") for lin in readers.values()}
        self._sites = len(self._rotated_inputs) + len(writers)
        self._widths = sum(lin.shape[1] for lin in readers.values()) + sum(lin.shape[0] for lin in writers.values())
        self.activation_side: bool | None = None  # None: whichever costs less (tests set it)

    def _quant(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        return w if bits >= 16 else self._weight_quant(w, bits, self.group, axis=0)

    def rotates_activations(self, tokens: int) -> bool:
        """Whether a step on `tokens` tokens applies R1 to the activations rather than to the weights.

        With float weights (w16) nothing needs R1^T W itself, so each Linear touched by R1 can compute
        (x R1^T) W instead (once per input the Linears share) and each writer (x W) R1: the same
        function, in tokens x hidden^2 per site instead of hidden^2 x the weights' width. That is the
        cheaper one when tokens x sites x 3 (forward and two backward products) is below the weights'
        widths x 2 (forward and R1's gradient; the weights need none). Quantized weights need R^T W.
        """
        if self.activation_side is not None:
            return self.activation_side and self.weight_bits >= 16
        return self.weight_bits >= 16 and 3 * tokens * self._sites < 2 * self._widths

    def overrides(self, ids: torch.Tensor) -> dict[ir.Value, Override]:
        """Rotated (fake-quantized) weights by initializer, and the embedding output for `ids` (rows of
        E R1 gathered first: quantization groups lie within a row, so this is exact). When R1 goes on
        the activations (`rotates_activations`), the Linears' outputs instead, as functions of their inputs."""
        desc, c = self.desc, self.graph.constants
        r1 = self.r1.to(torch.float32)
        rows = c[desc.embedding_table][ids] @ r1
        if self.head_bits < 16:
            rows = self._weight_quant(rows, self.head_bits, self.group, axis=-1)
        out: dict[ir.Value, Override] = {desc.embedding.outputs[0]: rows}
        head = desc.lm_head
        on_inputs = self.rotates_activations(ids.numel())
        readers = [lin for lin in r1_readers(desc) if lin is not head]
        writers = r1_writers(desc)
        # the blocks' weights with R2 (and R1 unless it goes on the activations), quantized at the end;
        # R2 acts on V's columns and O's rows, so it commutes with R1 on V's rows and O's columns
        weights: dict[ir.Value, torch.Tensor] = {}
        for lin in readers:
            weights[lin.weight] = c[lin.weight] if on_inputs else r1.T @ c[lin.weight]
        for lin in writers:
            weights[lin.weight] = c[lin.weight] if on_inputs else c[lin.weight] @ r1
            if lin.bias is not None:
                out[lin.bias] = c[lin.bias] @ r1
        for pair, r2 in zip(r2_pairs(desc), self.r2, strict=True):
            h = r2.to(torch.float32)
            weights[pair.v.weight] = rotate_head_columns(weights[pair.v.weight], h)
            if pair.v.bias is not None:
                out[pair.v.bias] = rotate_head_columns(c[pair.v.bias], h)
            weights[pair.o.weight] = rotate_head_rows(weights[pair.o.weight], h)
        if on_inputs:
            for lin in readers:
                out[lin.node.outputs[0]] = functools.partial(
                    _rotated_input_times, lin.input, self._rotated_inputs[lin.input], r1, weights[lin.weight]
                )
            for lin in writers:
                out[lin.node.outputs[0]] = functools.partial(_times_rotated, lin.input, weights[lin.weight], r1)
        else:
            out.update({value: self._quant(w, self.weight_bits) for value, w in weights.items()})
        if self.head_bits < 16:
            out[head.weight] = self._quant(r1.T @ c[head.weight], self.head_bits)
        else:  # (x R1^T) W costs tokens x hidden^2, R1^T W would cost vocab x hidden^2
            w_head, x = c[head.weight], head.input
            out[head.node.outputs[0]] = lambda env: (env[x] @ r1.T) @ w_head
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        feeds: dict[ir.Value | str, torch.Tensor] = {
            name: torch.from_numpy(array) for name, array in self.roles.feeds(ids.numpy()).items()
        }
        feeds[self.roles.input_ids] = ids
        return self.graph(feeds, self.overrides(ids))[0]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the windows `ids` [batch, seq]."""
        logits = self.forward(ids)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )


def batch_indices(step: int, batch: int, pool: int, seed: int) -> np.ndarray:
    """The windows of global step `step`: consecutive slices of seeded permutations of the pool, a
    pure function of (step, seed) so that a resumed run sees the batches an uninterrupted one would."""
    start = step * batch
    out = []
    for i in range(start, start + batch):
        epoch, offset = divmod(i, pool)
        out.append(np.random.default_rng([seed, 3, epoch]).permutation(pool)[offset])
    return np.asarray(out)


class EndToEndObjective:
    """`RotatedNetwork`'s loss on each step's windows of the calibration `windows` [pool, seq]: the
    global batch `batch_indices` draws, of which this process (`rank` of `world`, which must divide
    `batch`) takes its share; the loop averages the gradients over the processes."""

    def __init__(self, net: RotatedNetwork, windows: np.ndarray, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.net, self.pool, self.batch, self.seed = net, torch.from_numpy(windows), batch, seed
        self.share = slice(rank * (batch // world), (rank + 1) * (batch // world))

    def rotation_parameters(self) -> list[torch.nn.Parameter]:
        return self.net.rotation_parameters()

    def rotation_loss(self, step: int) -> torch.Tensor:
        picked = batch_indices(step, self.batch, len(self.pool), self.seed)[self.share]
        return self.net.loss(self.pool[picked])

    def later_stages(self, steps: int) -> list[Stage]:
        return []

    def rotations(self) -> dict[str, torch.Tensor]:
        return self.net.rotations()

    def state_dict(self) -> dict[str, Any]:
        return self.net.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        return self.net.load_state_dict(state_dict, strict)
