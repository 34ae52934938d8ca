"""`rotgraph learn`: learn R1 and the per-layer R2 for a scheme and write them as a rotations file.

The objective (`LearnOptions.objective`) is SpinQuant's "end-to-end" one (the default: the
fake-quantized network's loss, back-propagated through a torch run of the ONNX graph,
`rotgraph.learning.end_to_end`), or a layer-wise one, "kurtosis" or "output-error", on activations
collected once with onnxruntime, which can also learn per-channel scales (`rotgraph.learning.layerwise`).
All of them are learned by the same loop (`rotgraph.learning.loop`: Cayley SGD with a cosine learning
rate, checkpoints and resume, data parallel under torchrun) and written in the same format
(`rotgraph.rotations`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rotgraph import io
from rotgraph.errors import RotgraphError
from rotgraph.learning.end_to_end import EndToEndObjective, RotatedNetwork, learning_graph
from rotgraph.learning.layerwise import LayerwiseObjective, layerwise_objective, scale_tensors
from rotgraph.learning.loop import Objective, distributed, train
from rotgraph.learning.quantizers import Quantizers
from rotgraph.options import Scheme
from rotgraph.rotations import save_rotations
from rotgraph.stages import activation_spec, kv_spec

logger = logging.getLogger(__name__)


DEFAULT_STEPS = {"end-to-end": 20, "kurtosis": 60, "output-error": 60}
DEFAULT_LR = {"end-to-end": 0.1, "kurtosis": 1.0, "output-error": 5.0}
# layer-wise objectives: activation rows sampled per site (the output error overfits 128 rows per site on
# SmolLM2 at lr 5: benchmarks/RESULTS.md, "Layer-wise output error")
DEFAULT_SITE_TOKENS = {"kurtosis": 128, "output-error": 512}


@dataclass(frozen=True)
class LearnOptions:
    scheme: str = "w4a4kv4"  # w16...: weights stay float (GPTQ follows)
    # or "kurtosis" / "output-error": layer-wise, from collected activations (rotgraph.learning.layerwise)
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
    # the per-token activation quantizer's clip ratio (None: QuaRot's fixed clip, 0.9 at 4 bits); learn for
    # the ratio you quantize with (`rotgraph quantize --set activations.clip=RATIO`)
    act_clip: float | None = None
    # the per-token activation quantizer's grid: asymmetric as `activations.asymmetric` makes it in `quantize`
    act_asymmetric: bool = False
    # output-error objective: O reads its input through the online Hadamard `rotgraph quantize` inserts
    # before o_proj at 4-bit activations (`--out-hadamard`)
    out_hadamard: bool = False
    # output-error objective: each quantized input centered on its mean, the mean added back through the
    # float weights (`activations.center` in `rotgraph quantize`)
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
    with distributed() as (rank, world):
        if options.batch % world:
            raise RotgraphError(f"batch {options.batch} does not split over {world} processes")
        ids = _token_windows(input_path, options, token_windows)
        objective: Objective
        if options.objective == "end-to-end":
            objective = _end_to_end(input_path, options, ids, rank, world)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            objective = layerwise = _layerwise(input_path, output, options, ids)
            with torch.no_grad():
                kurtosis_start = float(layerwise.kurtosis_loss())
        checkpoint = output.with_name(output.name + ".ckpt")
        losses, err = train(
            objective,
            steps=options.total_steps,
            lr=options.step_size,
            momentum=options.momentum,
            checkpoint=checkpoint,
            checkpoint_every=options.checkpoint_every,
            options_json=json.dumps(asdict(options)),
            resume=resume,
            progress=progress,
            rank=rank,
            world=world,
            description="learn" if options.objective == "end-to-end" else "learn (layer-wise)",
        )
        rotations = objective.rotations()
        steps = options.total_steps
        meta: dict[str, object] = {
            **asdict(options),
            "source": str(input_path),
            "hidden_size": rotations["R1"].shape[0],
            "head_dim": rotations["R2.0"].shape[0],
            "layers": len(rotations) - 1,
            "orthogonality_error": err,
            "losses": losses[:steps],
        }
        tensors = dict(rotations)
        if options.objective == "end-to-end":
            meta["processes"] = world
        else:
            with torch.no_grad():
                kurtosis_end = float(layerwise.kurtosis_loss())
            logger.info("mean kurtosis %.3f (Hadamard start) -> %.3f (learned)", kurtosis_start, kurtosis_end)
            meta.update(scale_losses=losses[steps:], kurtosis=[kurtosis_start, kurtosis_end])
            tensors.update(scale_tensors(layerwise.scales()))
        if rank == 0:
            save_rotations(output, tensors, meta)
            checkpoint.unlink(missing_ok=True)
    first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
    return LearnReport(output, steps, time.perf_counter() - start, first, last, err, rank)


def _token_windows(input_path: Path, options: LearnOptions, token_windows: np.ndarray | None) -> np.ndarray:
    """The calibration windows [windows, seq_len] of `options` (or `token_windows`, given)."""
    if token_windows is not None:
        return np.asarray(token_windows, dtype=np.int64)
    from rotgraph.quantize import QuantOptions, calibration_tokens

    return calibration_tokens(
        input_path,
        QuantOptions(calibration_windows=options.windows, calibration_seq_len=options.seq_len, text=options.text),
    )


def _end_to_end(input_path: Path, options: LearnOptions, ids: np.ndarray, rank: int, world: int) -> EndToEndObjective:
    """The end-to-end objective: the fake-quantized network of the model at `input_path`."""
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
    return EndToEndObjective(net, ids, options.batch, options.seed, rank, world)


def _layerwise(input_path: Path, output: Path, options: LearnOptions, ids: np.ndarray) -> LayerwiseObjective:
    """A layer-wise objective on activations collected from the model at `input_path` (no network
    backward pass; the collection's scratch files go beside `output`)."""
    scheme = Scheme.parse(options.scheme)
    return layerwise_objective(
        input_path,
        ids,
        site_tokens=options.site_tokens or DEFAULT_SITE_TOKENS[options.objective],
        seed=options.seed,
        scaling=options.scaling,
        objective=options.objective,
        quantizers=Quantizers(
            activation_spec(scheme, options.act_clip, not options.act_asymmetric),
            kv_spec(scheme),
            scheme.weight_bits,
            options.group,
        ),
        out_hadamard=options.out_hadamard,
        center=options.center_activations,
        scratch=output.parent,
    )
