"""SpinQuant: learn R1 and the per-layer R2 by minimizing the fake-quantized network's loss.

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

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from rotgraph import io
from rotgraph.errors import RotgraphError
from rotgraph.passes import (
    InsertDownHadamardPass,
    InsertQKHadamardPass,
)
from rotgraph.passes.rotate_heads import head_rotations
from rotgraph.passes.rotate_residual import residual_rotation
from rotgraph.pipeline import foldable_form_passes, run_passes
from rotgraph.quantize import Scheme, activation_passes
from rotgraph.rotations import ORTHOGONALITY_TOLERANCE, save_rotations
from rotgraph.stiefel import CayleySGD, orthogonality_error
from rotgraph.structure import Linear, ModelDescription, discover
from rotgraph.torch_graph import Override, TorchGraph, round_ste

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnOptions:
    scheme: str = "w4a4kv4"  # w16...: weights stay float (GPTQ follows)
    steps: int = 20
    lr: float = 0.1
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

    def __post_init__(self) -> None:
        scheme = Scheme.parse(self.scheme)
        if scheme.weight_bits == 16 and scheme.act_bits == 16 and scheme.kv_bits is None:
            raise RotgraphError("nothing to learn for a float scheme: quantize weights, activations or KV cache")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0 or self.checkpoint_every < 1:
            raise RotgraphError("steps, batch and checkpoint interval must be >= 1 and lr > 0")
        if self.head_bits not in (8, 16):
            raise RotgraphError(f"head bits must be 8 or 16, got {self.head_bits}")


def learning_graph(model: ir.Model, scheme: Scheme, online: bool = True) -> ModelDescription:
    """Bring `model` (in place) to the form SpinQuant trains: the rotation pipeline without R1/R2,
    with the scheme's activation and KV-cache FakeQuant ops; weights stay float."""
    passes = foldable_form_passes()
    if online:
        passes += [InsertQKHadamardPass(), InsertDownHadamardPass()]
    passes += activation_passes(scheme)
    run_passes(model, passes)
    return discover(model)


def weight_fake_quant(w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
    """Symmetric RTN of `w` in groups of `group` (0: the whole axis) along `axis`, straight-through."""
    axis %= w.dim()
    n = w.shape[axis]
    g = group or n
    grouped = w.reshape(*w.shape[:axis], n // g, g, *w.shape[axis + 1 :])  # a view: no transpose
    qmax = 2 ** (bits - 1) - 1
    scale = torch.clamp(grouped.abs().amax(axis + 1, keepdim=True) / qmax, min=1e-8)
    q = torch.clamp(round_ste(grouped / scale), -qmax - 1, qmax) * scale
    return q.reshape(w.shape)


def _rotate_head_columns(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return (w.reshape(*w.shape[:-1], -1, h.shape[0]) @ h).reshape(w.shape)


def _rotate_head_rows(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    d = h.shape[0]
    return torch.einsum("ji,hjk->hik", h, w.reshape(-1, d, w.shape[1])).reshape(w.shape)


class RotatedNetwork(torch.nn.Module):
    """The fake-quantized network of a `learning_graph` model as a function of trainable R1 and R2s.

    `forward(ids)` returns the logits of the graph with every weight replaced by its rotated (and,
    for w4/w8 schemes, RTN fake-quantized) value: the network `rotgraph quantize --rotation spinquant`
    builds from these rotations, up to GPTQ and the clipping search of the final weight quantizer.
    """

    def __init__(self, model: ir.Model, scheme: Scheme, group: int, head_bits: int, seed: int) -> None:
        super().__init__()
        self.desc = desc = discover(model)
        self.graph = TorchGraph(model, checkpoint_after=[b.residual_out.name or "" for b in desc.blocks])
        if len(model.graph.inputs) != 1:
            raise RotgraphError(
                f"learning needs a graph with one input (token ids), got {len(model.graph.inputs)}: learn on the "
                "export without --with-past; the rotations it learns fold into either graph"
            )
        self.input_name = model.graph.inputs[0].name or ""
        self.weight_bits = scheme.weight_bits
        self.head_bits = head_bits if scheme.weight_bits < 16 else 16
        self.group = group
        d = desc.blocks[0].attention.head_dim
        self.r1 = torch.nn.Parameter(torch.from_numpy(residual_rotation(desc.hidden_size, seed)[0]))
        self.r2 = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(h)) for h, _ in head_rotations(d, len(desc.blocks), seed)
        )
        for lin in self._linears():
            if lin.weight.name not in self.graph.constants:
                raise RotgraphError(f"{lin.node.name}: the weight is not a float initializer")

    def _linears(self) -> list[Linear]:
        out = [self.desc.lm_head]
        for b in self.desc.blocks:
            out += [b.attention.q, b.attention.k, b.attention.v, b.attention.o, b.mlp.gate, b.mlp.up, b.mlp.down]
        return out

    def _quant(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        return w if bits >= 16 else weight_fake_quant(w, bits, self.group, axis=0)

    def overrides(self, ids: torch.Tensor) -> dict[str, Override]:
        """Rotated (fake-quantized) weights by initializer name, and the embedding output for `ids`
        (rows of E R1 gathered first: quantization groups lie within a row, so this is exact)."""
        c = self.graph.constants
        r1 = self.r1.to(torch.float32)
        out: dict[str, Override] = {}

        def put(lin: Linear, w: torch.Tensor, bits: int, bias: torch.Tensor | None = None) -> None:
            out[lin.weight.name or ""] = self._quant(w, bits)
            if bias is not None and lin.bias is not None:
                out[lin.bias.name or ""] = bias

        table = c[self.desc.embedding_table.name or ""]
        rows = table[ids] @ r1
        if self.head_bits < 16:
            rows = weight_fake_quant(rows, self.head_bits, self.group, axis=-1)
        out[self.desc.embedding.outputs[0].name or ""] = rows
        head = self.desc.lm_head
        if self.head_bits < 16:
            put(head, r1.T @ c[head.weight.name or ""], self.head_bits)
        else:  # (x R1^T) W costs tokens x hidden^2, R1^T W would cost vocab x hidden^2
            w_head, x_name = c[head.weight.name or ""], head.input.name or ""
            out[head.node.outputs[0].name or ""] = lambda env: (env[x_name] @ r1.T) @ w_head
        bits = self.weight_bits
        for block, r2 in zip(self.desc.blocks, self.r2, strict=True):
            h = r2.to(torch.float32)
            a, m = block.attention, block.mlp
            for lin in (a.q, a.k, m.gate, m.up):
                put(lin, r1.T @ c[lin.weight.name or ""], bits)
            v_bias = None if a.v.bias is None else _rotate_head_columns(c[a.v.bias.name or ""], h)
            put(a.v, _rotate_head_columns(r1.T @ c[a.v.weight.name or ""], h), bits, v_bias)
            for lin, w in (
                (a.o, _rotate_head_rows(c[a.o.weight.name or ""], h)),
                (m.down, c[m.down.weight.name or ""]),
            ):
                bias = None if lin.bias is None else c[lin.bias.name or ""] @ r1
                put(lin, w @ r1, bits, bias)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.graph({self.input_name: ids}, self.overrides(ids))[0]

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


def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes gloo when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


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
    state = {
        "step": step,
        "losses": losses,
        "options": asdict(options),
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
    from rotgraph.quantize import QuantOptions, calibration_tokens

    start = time.perf_counter()
    if output.suffix != ".safetensors":
        raise RotgraphError(f"output {output} must end in .safetensors")
    rank, world = _distributed()
    if options.batch % world:
        raise RotgraphError(f"batch {options.batch} does not split over {world} processes")
    scheme = Scheme.parse(options.scheme)
    model = io.load_model(input_path)
    learning_graph(model, scheme, options.online)
    net = RotatedNetwork(model, scheme, options.group, options.head_bits, options.seed)
    if token_windows is None:
        ids = calibration_tokens(
            input_path,
            QuantOptions(calibration_windows=options.windows, calibration_seq_len=options.seq_len, text=options.text),
        )
    else:
        ids = np.asarray(token_windows, dtype=np.int64)
    pool = torch.from_numpy(ids)
    optimizer = CayleySGD(net.parameters(), lr=options.lr, momentum=options.momentum)
    checkpoint = output.with_name(output.name + ".ckpt")
    first_step, losses = 0, []
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["options"] != asdict(options):
            raise RotgraphError(f"{checkpoint} was written with other options: {state['options']}")
        net.load_state_dict(state["network"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        first_step, losses = state["step"], state["losses"]
        logger.info("resuming from step %d", first_step)
    elif resume:
        raise RotgraphError(f"nothing to resume: {checkpoint} does not exist")
    share = options.batch // world
    bar = tqdm(
        range(first_step, options.steps),
        desc="learn",
        unit="step",
        disable=not progress or rank != 0,
        initial=first_step,
        total=options.steps,
    )
    try:
        for step in bar:
            lr = options.lr * 0.5 * (1 + np.cos(np.pi * step / options.steps))  # cosine decay to 0
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
            if rank == 0 and done % options.checkpoint_every == 0 and done < options.steps:
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
        options.steps,
        time.perf_counter() - start,
        losses[0] if losses else float("nan"),
        losses[-1] if losses else float("nan"),
        err,
        rank,
    )
