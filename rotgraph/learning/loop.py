"""The one learning loop of `rotgraph learn`: Cayley SGD on the rotations, whatever the objective.

`train` runs the rotations' stage, `steps` steps of Cayley SGD (`rotgraph.learning.stiefel`) with the
learning rate decayed from `lr` to 0 on a cosine, then any further stages the objective asks for (the
layer-wise objectives' per-channel scales, by Adam). It writes a checkpoint every `checkpoint_every`
steps, continues from one with `resume` (the objective draws each step's data from the step number
alone, so a resumed run computes what an uninterrupted one does), shows progress, and refuses
rotations that drifted from orthogonal.

Data parallel learning: under `torchrun` (gloo, `distributed`), each process computes its share of
every step's loss and the gradients (and losses) are averaged before the update, so N processes compute
what one process computes on the same global batch; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from rotgraph.errors import RotgraphError
from rotgraph.learning.stiefel import CayleySGD, orthogonality_error
from rotgraph.passes.rotation.rotate_heads import head_rotations
from rotgraph.passes.rotation.rotate_residual import residual_rotation
from rotgraph.rotations import ORTHOGONALITY_TOLERANCE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """`steps` steps of `optimizer` on `loss(step)` (the global step); with `lr`, the optimizer's
    learning rate decays from `lr` to 0 on a cosine over the stage, else it is the optimizer's own."""

    loss: Callable[[int], torch.Tensor]
    optimizer: torch.optim.Optimizer
    steps: int
    lr: float | None = None


class Objective(Protocol):
    """What `train` learns rotations against: a `torch.nn.Module` (its state is checkpointed) holding
    R1 and one R2 per layer, which start at QuaRot's seeded Hadamards."""

    def rotation_parameters(self) -> list[torch.nn.Parameter]:
        """R1, then each layer's R2: square float64 orthogonal matrices (what Cayley SGD updates)."""
        ...

    def rotation_loss(self, step: int) -> torch.Tensor:
        """The rotations' objective on the data of global step `step` (a function of `step` alone)."""
        ...

    def later_stages(self, steps: int) -> list[Stage]:
        """Stages after the rotations' `steps` steps (the layer-wise scales), or none."""
        ...

    def rotations(self) -> dict[str, torch.Tensor]:
        """The rotations as the rotations file names them: R1, R2.0, R2.1, ..."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


class Rotations(torch.nn.Module):
    """R1 (hidden x hidden) and one R2 (head_dim x head_dim) per layer as trainable float64 parameters,
    starting at QuaRot's seeded randomized Hadamards (the base of the objectives' modules)."""

    def __init__(self, hidden_size: int, head_dim: int, layers: int, seed: int) -> None:
        super().__init__()
        self.r1 = torch.nn.Parameter(torch.from_numpy(residual_rotation(hidden_size, seed)[0]))
        self.r2 = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(h)) for h, _ in head_rotations(head_dim, layers, seed)
        )

    def rotation_parameters(self) -> list[torch.nn.Parameter]:
        return [self.r1, *self.r2]

    def rotations(self) -> dict[str, torch.Tensor]:
        named = {"R1": self.r1.detach().clone()}
        named.update({f"R2.{i}": r.detach().clone() for i, r in enumerate(self.r2)})
        return named


@contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """(rank, world size) of this process; initializes gloo when launched by torchrun with more than
    one process, and tears the group down on leaving: after waiting for every process when the body
    finished, not after an error (the others may never arrive). A gloo process that exits with its
    group alive can abort in teardown ("terminate called without an active exception")."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    owned = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
        owned = True
    finished = False
    try:
        yield (torch.distributed.get_rank(), world) if world > 1 else (0, 1)
        finished = True
    finally:
        if owned and torch.distributed.is_initialized():
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _average_gradients(optimizer: torch.optim.Optimizer, loss: torch.Tensor, world: int) -> float:
    """Average the gradients of `optimizer`'s parameters (and the loss, returned) over the processes."""
    if world > 1:
        for group in optimizer.param_groups:
            for p in group["params"]:
                assert p.grad is not None
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return float(loss)


def _save_checkpoint(
    path: Path, step: int, losses: list[float], options_json: str, objective: Objective, stages: list[Stage]
) -> None:
    """Tensors and plain values only, so that `torch.load(..., weights_only=True)` reads it back."""
    state = {
        "step": step,
        "meta": json.dumps({"losses": losses, "options": json.loads(options_json)}),
        "objective": objective.state_dict(),
        "optimizers": [stage.optimizer.state_dict() for stage in stages],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, options_json: str, objective: Objective, stages: list[Stage]) -> tuple[int, list]:
    """Restore the objective and the optimizers from `path`; (the next step, the losses so far)."""
    if not path.is_file():
        raise RotgraphError(f"nothing to resume: {path} does not exist")
    state = torch.load(path, weights_only=True)
    if "objective" not in state:
        raise RotgraphError(f"{path} was written by an older rotgraph; rerun without --resume")
    meta = json.loads(state["meta"])
    if meta["options"] != json.loads(options_json):
        raise RotgraphError(f"{path} was written with other options: {meta['options']}")
    objective.load_state_dict(state["objective"])
    for stage, saved in zip(stages, state["optimizers"], strict=True):
        stage.optimizer.load_state_dict(saved)
    logger.info("resuming from step %d", state["step"])
    return state["step"], meta["losses"]


def _stage_at(stages: list[Stage], step: int) -> tuple[Stage, int]:
    """The stage that global step `step` belongs to, and the step's index within the stage."""
    for stage in stages:
        if step < stage.steps:
            return stage, step
        step -= stage.steps
    raise IndexError("step past the last stage")


def train(
    objective: Objective,
    *,
    steps: int,
    lr: float,
    momentum: float,
    checkpoint: Path,
    checkpoint_every: int,
    options_json: str,
    resume: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    description: str = "learn",
) -> tuple[list[float], float]:
    """Learn `objective`'s rotations (see the module doc); the loss of every step (all stages in turn)
    and the rotations' max |R^T R - I|.

    `options_json` (the run's options) is stored in each checkpoint, and a checkpoint written with
    other options is refused on `resume`. Raises if a rotation drifted from orthogonal."""
    cayley = CayleySGD(objective.rotation_parameters(), lr=lr, momentum=momentum)
    stages = [Stage(objective.rotation_loss, cayley, steps, lr), *objective.later_stages(steps)]
    total = sum(stage.steps for stage in stages)
    first, losses = _load_checkpoint(checkpoint, options_json, objective, stages) if resume else (0, [])
    bar = tqdm(
        range(first, total),
        desc=description,
        unit="step",
        disable=not progress or rank != 0,
        initial=first,
        total=total,
    )
    try:
        for step in bar:
            stage, at = _stage_at(stages, step)
            optimizer = stage.optimizer
            if stage.lr is not None:  # cosine decay to 0 over the stage
                for group in optimizer.param_groups:
                    group["lr"] = stage.lr * 0.5 * (1 + float(np.cos(np.pi * at / stage.steps)))
            optimizer.zero_grad()
            loss = stage.loss(step)
            loss.backward()
            losses.append(_average_gradients(optimizer, loss.detach(), world))
            optimizer.step()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
            done = step + 1
            if rank == 0 and done % checkpoint_every == 0 and done < total:
                _save_checkpoint(checkpoint, done, losses, options_json, objective, stages)
    except KeyboardInterrupt:
        if rank == 0 and checkpoint.is_file():
            logger.warning("interrupted: %s holds the last checkpoint; rerun with --resume to continue", checkpoint)
        raise
    err = max(orthogonality_error(r) for r in objective.rotations().values())
    if not err <= ORTHOGONALITY_TOLERANCE:
        raise RotgraphError(f"learned rotations drifted from orthogonal (max |R^T R - I| = {err:.2g}); nothing written")
    logger.info("max |R^T R - I| over the learned rotations: %.2g", err)
    return losses, err
