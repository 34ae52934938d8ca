"""SpinQuant: learn R1 and the per-layer R2 by minimizing the fake-quantized network's loss.

This is the "end-to-end" objective of `rotgraph learn` (the default); `objective="kurtosis"` learns the
same rotations (and optionally per-channel scales) layer by layer from collected activations instead,
with no backward pass through the network (`rotgraph.layerwise`). Both write the same rotations file.

The network being trained is the ONNX graph itself, run by `TorchGraph`: the float model is brought to
the form the rotation passes produce (canonical norms, untied lm_head, norm scales fused, R3/R4
inserted online), activations and the KV cache get the scheme's FakeQuant ops from the same passes
`rotgraph quantize` uses, and every weight the rotations touch is replaced, on each step, by its
rotated and RTN fake-quantized value computed from the trainable R1/R2 (straight-through rounding).
Only the rotations are trained; they start from QuaRot's seeded randomized Hadamards and are updated
by Cayley SGD, so they stay orthogonal and fold into the weights exactly as QuaRot's do.

Data parallel learning: under `torchrun` (gloo), each process takes its share of every global batch
and the gradients are averaged before the update, so N processes compute what one process computes
on the same global batch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from rotgraph import grid, io
from rotgraph.errors import RotgraphError
from rotgraph.inputs import input_roles
from rotgraph.passes import (
    InsertDownHadamardPass,
    InsertQKHadamardPass,
)
from rotgraph.passes.rotate_heads import head_rotations
from rotgraph.passes.rotate_residual import residual_rotation
from rotgraph.passes.split_rotary import SplitRotaryPass
from rotgraph.pipeline import foldable_form_passes, run_passes
from rotgraph.quantize import Scheme, activation_passes, activation_spec, kv_spec
from rotgraph.rotations import ORTHOGONALITY_TOLERANCE, save_rotations
from rotgraph.stiefel import CayleySGD, orthogonality_error
from rotgraph.structure import (
    ModelDescription,
    discover,
    r1_readers,
    r1_writers,
    r2_pairs,
    rotate_head_columns,
    rotate_head_rows,
)
from rotgraph.torch_graph import Override, TorchGraph, round_ste

logger = logging.getLogger(__name__)


DEFAULT_STEPS = {"end-to-end": 20, "kurtosis": 60, "output-error": 60}
DEFAULT_LR = {"end-to-end": 0.1, "kurtosis": 1.0, "output-error": 5.0}
# layer-wise objectives: activation rows sampled per site (the output error overfits 128 rows per site on
# SmolLM2 at lr 5: benchmarks/RESULTS.md, "Layer-wise output error")
DEFAULT_SITE_TOKENS = {"kurtosis": 128, "output-error": 512}


@dataclass(frozen=True)
class LearnOptions:
    scheme: str = "w4a4kv4"  # w16...: weights stay float (GPTQ follows)
    # or "kurtosis" / "output-error": layer-wise, from collected activations (rotgraph.layerwise)
    objective: str = "end-to-end"
    steps: int | None = None  # None: the objective's default (DEFAULT_STEPS)
    lr: float | None = None  # None: the objective's default (DEFAULT_LR)
    momentum: float = 0.0
    batch: int = 4  # windows per step, over all processes
    seq_len: int = 512
    windows: int = 32  # calibration windows to draw batches from
    group: int = 32  # weight groups of the RTN fake quantizer (0: per channel)
    # embedding and lm_head: 8-bit RTN as `rotgraph quantize` makes them, or 16: float (the default: an
    # 8-bit lm_head changes the loss little and would cost a vocab x hidden^2 product per step)
    head_bits: int = 16
    seed: int = 0
    online: bool = True
    checkpoint_every: int = 10
    text: str | None = None
    scaling: bool = False  # layer-wise objectives: learn per-channel scales too (folded beside R1/R2)
    checkpointing: bool = True  # end-to-end: recompute each block in the backward pass (less memory, slower)
    keep_products: bool = False  # checkpointing: keep the matrix products' outputs (faster, more memory)
    compile: bool = False  # end-to-end: torch.compile the weight fake quantizer (eager if compiling fails)
    # layer-wise objectives: activation rows sampled per site (x 2 per layer for R1); None: DEFAULT_SITE_TOKENS
    site_tokens: int | None = None
    # the per-token activation quantizer's clip ratio (None: quantize's default, 0.9 at 4 bits); learn for
    # the ratio you quantize with (`rotgraph quantize --act-clip`)
    act_clip: float | None = None
    # the per-token activation quantizer's grid: asymmetric as `rotgraph quantize --act-asymmetric` makes it
    act_asymmetric: bool = False
    # output-error objective: O reads its input through the online Hadamard `rotgraph quantize` inserts
    # before o_proj at 4-bit activations (`--out-hadamard`)
    out_hadamard: bool = False
    # output-error objective: each quantized input centered on its mean, the mean added back through the
    # float weights (`rotgraph quantize --center-activations`)
    center_activations: bool = False

    def __post_init__(self) -> None:
        scheme = Scheme.parse(self.scheme)
        if scheme.weight_bits == 16 and scheme.act_bits == 16 and scheme.kv_bits is None:
            raise RotgraphError("nothing to learn for a float scheme: quantize weights, activations or KV cache")
        if self.objective not in DEFAULT_STEPS:
            raise RotgraphError(f"objective {self.objective!r}: expected one of {', '.join(DEFAULT_STEPS)}")
        if self.scaling and self.objective == "end-to-end":
            raise RotgraphError("--scaling needs a layer-wise objective (--objective kurtosis or output-error)")
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.objective])
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.objective])
        if self.site_tokens is None:
            object.__setattr__(self, "site_tokens", DEFAULT_SITE_TOKENS.get(self.objective, 0))
        elif self.site_tokens < 1:
            raise RotgraphError("site tokens must be >= 1")
        if self.total_steps < 1 or self.batch < 1 or self.step_size <= 0 or self.checkpoint_every < 1:
            raise RotgraphError("steps, batch and checkpoint interval must be >= 1 and lr > 0")
        if self.act_clip is not None and not 0.0 < self.act_clip <= 1.0:
            raise RotgraphError(f"activation clip ratio {self.act_clip}: expected a ratio in (0, 1]")
        if self.out_hadamard and (self.objective != "output-error" or not self.online):
            raise RotgraphError(
                "--out-hadamard: only the output-error objective (with the online Hadamards) models O's input"
            )
        if self.center_activations and (self.objective != "output-error" or self.scaling or scheme.act_bits == 16):
            raise RotgraphError(
                "--center-activations: only the output-error objective (without --scaling) models centered inputs, "
                f"and scheme {self.scheme} must quantize activations"
            )
        if self.act_asymmetric and scheme.act_bits == 16:
            raise RotgraphError(f"--act-asymmetric: scheme {self.scheme} keeps activations float")
        if self.head_bits not in (8, 16):
            raise RotgraphError(f"head bits must be 8 or 16, got {self.head_bits}")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else DEFAULT_STEPS[self.objective]

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.objective]


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


def weight_fake_quant(w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
    """Symmetric RTN of `w` in groups of `group` (0: the whole axis) along `axis`, straight-through."""
    axis %= w.dim()
    n = w.shape[axis]
    g = group or n
    grouped = w.reshape(*w.shape[:axis], n // g, g, *w.shape[axis + 1 :])  # a view: no transpose
    qmax = grid.qmax(bits, True)
    scale = torch.clamp(grouped.abs().amax(axis + 1, keepdim=True) / qmax, min=grid.EPS)
    q = torch.clamp(round_ste(grouped / scale), grid.qmin(bits, True), qmax) * scale
    return q.reshape(w.shape)


class WeightQuantizer:
    """`weight_fake_quant`, optionally through `torch.compile` (one graph for all weight shapes): the
    weights' RTN is about 25 elementwise passes over every weight per step, which the compiler fuses.
    Where compiling fails (no C++ compiler, an unsupported torch build) the first call says why, once,
    and every call runs eagerly; the results are the same either way."""

    def __init__(self, compiled: bool) -> None:
        self._fn: Callable[..., torch.Tensor] = weight_fake_quant
        if compiled:
            self._fn = torch.compile(weight_fake_quant, dynamic=True)

    def __call__(self, w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
        if self._fn is weight_fake_quant:
            return weight_fake_quant(w, bits, group, axis)
        try:
            return self._fn(w, bits, group, axis)
        except Exception as error:  # torch's compiler stack raises many kinds; the eager path is exact
            logger.warning("torch.compile of the weight quantizer failed, running it eagerly: %s", error)
            self._fn = weight_fake_quant
            return weight_fake_quant(w, bits, group, axis)


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


class RotatedNetwork(torch.nn.Module):
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
        super().__init__()
        self.desc = desc = discover(model)
        # checkpointing: per-block activation memory for one more forward pass (TorchGraph)
        cuts = [b.residual_out for b in desc.blocks] if checkpointing else []
        self.graph = TorchGraph(model, checkpoint_after=cuts, keep_products=keep_products)
        # token ids, and for exports that take them an all-ones mask, positions 0.. and empty KV caches
        self.roles = input_roles(model)
        self.weight_bits = scheme.weight_bits
        self.head_bits = head_bits if scheme.weight_bits < 16 else 16
        self.group = group
        self._weight_quant = WeightQuantizer(compile_quantizer)
        d = desc.blocks[0].attention.head_dim
        self.r1 = torch.nn.Parameter(torch.from_numpy(residual_rotation(desc.hidden_size, seed)[0]))
        self.r2 = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(h)) for h, _ in head_rotations(d, len(desc.blocks), seed)
        )
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

    def rotations(self) -> dict[str, torch.Tensor]:
        named = {"R1": self.r1.detach().clone()}
        named.update({f"R2.{i}": r.detach().clone() for i, r in enumerate(self.r2)})
        return named


def batch_indices(step: int, batch: int, pool: int, seed: int) -> np.ndarray:
    """The windows of global step `step`: consecutive slices of seeded permutations of the pool, a
    pure function of (step, seed) so that a resumed run sees the batches an uninterrupted one would."""
    start = step * batch
    out = []
    for i in range(start, start + batch):
        epoch, offset = divmod(i, pool)
        out.append(np.random.default_rng([seed, 3, epoch]).permutation(pool)[offset])
    return np.asarray(out)


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, owned); initializes gloo when launched by torchrun with more than one process.
    `owned` says this call made the process group, so the caller must tear it down (`_leave`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owned = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
        owned = True
    if world > 1:
        return torch.distributed.get_rank(), world, owned
    return 0, 1, owned


def _leave(owned: bool, finished: bool) -> None:
    """Destroy the process group this run made, after waiting for every process when the run finished
    (not after an error: the others may never arrive). A gloo process that exits with its group alive
    can abort in teardown ("terminate called without an active exception")."""
    if owned and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _average_gradients(net: RotatedNetwork, loss: torch.Tensor, world: int) -> float:
    """Average the rotations' gradients (and the loss, returned) over the data-parallel processes."""
    if world > 1:
        for p in net.parameters():
            assert p.grad is not None
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return float(loss)


def _save_checkpoint(
    path: Path, step: int, losses: list[float], options: LearnOptions, net: RotatedNetwork, optimizer: CayleySGD
) -> None:
    """Tensors and plain values only, so that `torch.load(..., weights_only=True)` reads it back."""
    state = {
        "step": step,
        "meta": json.dumps({"losses": losses, "options": asdict(options)}),
        "network": {k: v for k, v in net.state_dict().items() if k.startswith("r")},
        "optimizer": optimizer.state_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class LearnReport:
    output: Path
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    orthogonality_error: float
    rank: int = 0  # this process's rank under torchrun; only rank 0 writes


def learn(
    input_path: Path,
    output: Path,
    options: LearnOptions = LearnOptions(),
    token_windows: np.ndarray | None = None,
    resume: bool = False,
    progress: bool = True,
) -> LearnReport:
    """Learn SpinQuant rotations for `options.scheme` on the calibration split; write `output`.

    A checkpoint `output.ckpt` is written every `checkpoint_every` steps; `resume` continues from it.
    `token_windows` replaces the calibration text (tests)."""
    start = time.perf_counter()
    if output.suffix != ".safetensors":
        raise RotgraphError(f"output {output} must end in .safetensors")
    rank, world, owned = _distributed()
    finished = False
    try:
        report = _learn(input_path, output, options, token_windows, resume, progress, start, rank, world)
        finished = True
        return report
    finally:
        _leave(owned, finished)


def _learn(
    input_path: Path,
    output: Path,
    options: LearnOptions,
    token_windows: np.ndarray | None,
    resume: bool,
    progress: bool,
    start: float,
    rank: int,
    world: int,
) -> LearnReport:
    from rotgraph.quantize import QuantOptions, calibration_tokens

    if options.batch % world:
        raise RotgraphError(f"batch {options.batch} does not split over {world} processes")
    if token_windows is None:
        ids = calibration_tokens(
            input_path,
            QuantOptions(calibration_windows=options.windows, calibration_seq_len=options.seq_len, text=options.text),
        )
    else:
        ids = np.asarray(token_windows, dtype=np.int64)
    if options.objective != "end-to-end":
        return _learn_layerwise(input_path, output, options, ids, resume, progress, start)
    scheme = Scheme.parse(options.scheme)
    model = io.load_model(input_path)
    learning_graph(model, scheme, options.online, options.act_clip, not options.act_asymmetric)
    net = RotatedNetwork(
        model,
        scheme,
        options.group,
        options.head_bits,
        options.seed,
        options.checkpointing,
        options.keep_products,
        options.compile,
    )
    pool = torch.from_numpy(ids)
    optimizer = CayleySGD(net.parameters(), lr=options.step_size, momentum=options.momentum)
    checkpoint = _checkpoint_path(output)
    first_step, losses = 0, []
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        meta = json.loads(state["meta"])
        if meta["options"] != json.loads(json.dumps(asdict(options))):
            raise RotgraphError(f"{checkpoint} was written with other options: {meta['options']}")
        net.load_state_dict(state["network"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        first_step, losses = state["step"], meta["losses"]
        logger.info("resuming from step %d", first_step)
    elif resume:
        raise RotgraphError(f"nothing to resume: {checkpoint} does not exist")
    share = options.batch // world
    bar = tqdm(
        range(first_step, options.total_steps),
        desc="learn",
        unit="step",
        disable=not progress or rank != 0,
        initial=first_step,
        total=options.total_steps,
    )
    try:
        for step in bar:
            lr = options.step_size * 0.5 * (1 + float(np.cos(np.pi * step / options.total_steps)))  # cosine decay to 0
            for group in optimizer.param_groups:
                group["lr"] = lr
            picked = batch_indices(step, options.batch, len(pool), options.seed)[rank * share : (rank + 1) * share]
            optimizer.zero_grad()
            loss = net.loss(pool[picked])
            loss.backward()
            losses.append(_average_gradients(net, loss.detach(), world))
            optimizer.step()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.3g}")
            done = step + 1
            if rank == 0 and done % options.checkpoint_every == 0 and done < options.total_steps:
                _save_checkpoint(checkpoint, done, losses, options, net, optimizer)
    except KeyboardInterrupt:
        if rank == 0 and checkpoint.is_file():
            logger.warning("interrupted: %s holds the last checkpoint; rerun with --resume to continue", checkpoint)
        raise
    rotations = net.rotations()
    err = max(orthogonality_error(r) for r in rotations.values())
    if not err <= ORTHOGONALITY_TOLERANCE:
        raise RotgraphError(f"learned rotations drifted from orthogonal (max |R^T R - I| = {err:.2g}); nothing written")
    if rank == 0:
        meta = {
            **asdict(options),
            "source": str(input_path),
            "hidden_size": net.desc.hidden_size,
            "head_dim": net.desc.blocks[0].attention.head_dim,
            "layers": len(net.desc.blocks),
            "orthogonality_error": err,
            "losses": losses,
            "processes": world,
        }
        save_rotations(output, rotations, meta)
        checkpoint.unlink(missing_ok=True)
    logger.info("max |R^T R - I| over the learned rotations: %.2g", err)
    return LearnReport(
        output,
        options.total_steps,
        time.perf_counter() - start,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        err,
        rank,
    )


def _checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".ckpt")


def _learn_layerwise(
    input_path: Path, output: Path, options: LearnOptions, ids: np.ndarray, resume: bool, progress: bool, start: float
) -> LearnReport:
    """`learn` with a layer-wise objective (`rotgraph.layerwise`): one process, no network backward pass."""
    from rotgraph.layerwise import Quantizers, learn_layerwise, scale_tensors

    output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint_path(output)
    scheme = Scheme.parse(options.scheme)
    result = learn_layerwise(
        input_path,
        ids,
        steps=options.total_steps,
        lr=options.step_size,
        site_tokens=options.site_tokens or DEFAULT_SITE_TOKENS[options.objective],
        seed=options.seed,
        scaling=options.scaling,
        checkpoint=checkpoint,
        objective=options.objective,
        quantizers=Quantizers(
            activation_spec(scheme, options.act_clip, not options.act_asymmetric),
            kv_spec(scheme),
            scheme.weight_bits,
            options.group,
        ),
        out_hadamard=options.out_hadamard,
        center=options.center_activations,
        checkpoint_every=options.checkpoint_every,
        options_json=json.dumps(asdict(options)),
        resume=resume,
        progress=progress,
    )
    err = max(orthogonality_error(r) for r in result.rotations.values())
    if not err <= ORTHOGONALITY_TOLERANCE:
        raise RotgraphError(f"learned rotations drifted from orthogonal (max |R^T R - I| = {err:.2g}); nothing written")
    r1, r2 = result.rotations["R1"], result.rotations["R2.0"]
    meta = {
        **asdict(options),
        "source": str(input_path),
        "hidden_size": r1.shape[0],
        "head_dim": r2.shape[0],
        "layers": len(result.rotations) - 1,
        "orthogonality_error": err,
        "losses": result.losses,
        "scale_losses": result.scale_losses,
        "kurtosis": [result.kurtosis_start, result.kurtosis_end],
    }
    save_rotations(output, {**result.rotations, **scale_tensors(result.scales)}, meta)
    checkpoint.unlink(missing_ok=True)
    logger.info("mean kurtosis %.3f (Hadamard start) -> %.3f (learned)", result.kurtosis_start, result.kurtosis_end)
    losses = result.losses + result.scale_losses
    return LearnReport(output, options.total_steps, time.perf_counter() - start, losses[0], losses[-1], err)
