"""The QuaRot float pipeline: canonicalize, fuse norm scales, R1, R2, R3, R4, validate, save."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph import io
from rotgraph.constants import R3_KEY, ROTATION_KEY
from rotgraph.errors import RotgraphError, ValidationError
from rotgraph.evaluate import logit_difference
from rotgraph.execution import Execution, running
from rotgraph.inputs import input_roles
from rotgraph.passes import (
    CanonicalizeNormsPass,
    ExpandOrtFusedOpsPass,
    FuseNormScalesPass,
    InsertDownHadamardPass,
    InsertOutHadamardPass,
    InsertQKHadamardPass,
    RotateHeadsPass,
    RotateResidualPass,
    SplitFusedProjectionsPass,
    UntieEmbeddingPass,
)
from rotgraph.passes.canonical.record_blocks import RecordBlocksPass
from rotgraph.passes.ort.restore_ort_norms import RestoreOrtNormsPass
from rotgraph.passes.rotation.scale_channels import ScaleChannelsPass
from rotgraph.rotations import load_rotations, load_scales
from rotgraph.structure import ModelDescription, discover
from rotgraph.structure.discover import check_supported
from rotgraph.structure.summary import summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotateOptions:
    """Configuration of `rotate`: the seed of R1/R2, whether to insert R3/R4, and validation."""

    seed: int = 0
    online: bool = True
    qk_hadamard: bool = True  # with online: R3 as well as R4 (quantize drops R3 when the KV cache stays float)
    # with online: an online Hadamard before o_proj too (`InsertOutHadamardPass`; quantize adds it for 4-bit
    # activations)
    out_hadamard: bool = False
    validate: bool = True
    tolerance: float | None = None  # max |logit difference|; None: `default_tolerance` of the logits' dtype and scale
    validation_tokens: int = 256
    rotations: str | None = None  # a `rotgraph learn` file: fold its R1/R2 (SpinQuant), not seeded Hadamards


@dataclass(frozen=True)
class RotateReport:
    output: Path
    max_abs_logit_diff: float | None
    tolerance: float
    seconds: float
    description: str


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> None:
    """Run `passes` with a PassManager; a rotgraph error inside a pass surfaces as itself, and so does a
    pass's unmet precondition (e.g. a result it reads that no earlier pass produced) otherwise."""
    try:
        ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as e:
        chain: list[BaseException] = []
        cause: BaseException | None = e
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__
        for kind in (RotgraphError, ir.passes.PreconditionError):
            found = next((c for c in chain if isinstance(c, kind)), None)
            if found is not None:
                raise found from None
        raise


def canonicalize(model: ir.Model) -> ModelDescription:
    """Bring a model to the canonical form (`canonical_form_passes`) and describe it."""
    run_passes(model, canonical_form_passes())
    return discover(model)


def canonical_form_passes() -> list[ir.passes.PassBase]:
    """Shapes and types first (graphs such as optimum's exports carry no value_info, and the norm
    patterns need types), then opset 23 with fused RMSNorms, onnxruntime's fused norms expanded, fused
    projections split, and shapes again for what those rewrites added; where the blocks begin is recorded
    (for graphs lowered later, `rotgraph.segments.cuts`)."""
    return [
        common_passes.ShapeInferencePass(strict_mode=False),
        CanonicalizeNormsPass(),
        ExpandOrtFusedOpsPass(),
        SplitFusedProjectionsPass(),
        common_passes.ShapeInferencePass(strict_mode=False),
        RecordBlocksPass(),
    ]


def foldable_form_passes() -> list[ir.passes.PassBase]:
    """Canonical norms, shapes, untied lm_head and weightless norms: the form R1 folds into (and the
    form SpinQuant learns on)."""
    return [
        *canonical_form_passes(),
        UntieEmbeddingPass(),
        FuseNormScalesPass(),
    ]


def rotation_passes(options: RotateOptions) -> list[ir.passes.PassBase]:
    passes = foldable_form_passes()
    if options.rotations is not None:
        r1, r2 = load_rotations(Path(options.rotations))
        passes += [RotateResidualPass(rotation=r1), RotateHeadsPass(rotations=tuple(r2))]
        scales = load_scales(Path(options.rotations))
        passes += [ScaleChannelsPass(scales)] if scales else []  # learned with the rotations (--scaling)
    else:
        passes += [RotateResidualPass(seed=options.seed), RotateHeadsPass(seed=options.seed)]
    if options.online:
        # R3 where RoPE is reachable; a fused op with RoPE inside gets none (logged), and a KV-cache
        # quantizer that needs the rotated keys refuses such a graph itself.
        passes += [InsertQKHadamardPass(skip_rope_inside=True)] if options.qk_hadamard else []
        passes.append(InsertDownHadamardPass())
        passes += [InsertOutHadamardPass()] if options.out_hadamard else []
    return passes


def rotate_model(model: ir.Model, options: RotateOptions = RotateOptions()) -> ModelDescription:
    """Apply the float rotation pipeline to `model` in place; weights stay lazy until saved. A graph that
    came with onnxruntime's fused norms gets them back at the end (`RestoreOrtNormsPass`); the returned
    description is of the canonical form the passes rotated."""
    if ROTATION_KEY in model.metadata_props:
        raise RotgraphError(f"model is already rotated ({model.metadata_props[ROTATION_KEY]})")
    run_passes(model, [*rotation_passes(options), RemoveUnusedNodesPass()])
    model.metadata_props[ROTATION_KEY] = rotation_metadata(options, model)
    desc = discover(model)  # the description of the canonical form the passes rotated
    run_passes(model, [RestoreOrtNormsPass()])  # an input with onnxruntime's fused norms gets them back
    return desc


def check_inputs(model: ir.Model) -> None:
    """Refuse, before any work, a graph with an input rotgraph cannot feed (`rotgraph.inputs`). An
    unsupported architecture (a LayerNorm decoder) is the cause named first when it is there."""
    try:
        input_roles(model)
    except RotgraphError:
        if any(n.op_type == "LayerNormalization" for n in model.graph):
            check_supported(model.graph)
        raise


def rotation_metadata(options: RotateOptions, model: ir.Model) -> str:
    """What `ROTATION_KEY` records: the method (seeded QuaRot or a SpinQuant file) and the online parts
    the rotated `model` has (R3 is left out where RoPE is inside a fused attention; `R3_KEY` says so)."""
    method: dict[str, object] = {"method": "quarot", "seed": options.seed}
    if options.rotations is not None:
        method = {"method": "spinquant", "rotations": Path(options.rotations).name}
    r3 = options.online and options.qk_hadamard and not model.metadata_props.get(R3_KEY, "").startswith("none")
    online = {"online": options.online, "r3": r3, "o_hadamard": options.online and options.out_hadamard}
    return json.dumps({**method, **online})


def validation_tokens(model_path: Path, vocab_size: int, count: int) -> np.ndarray:
    """A [1, count] batch of real text tokens when a tokenizer is beside the model, else seeded ids."""
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    tok = io.find_tokenizer(model_path)
    if tok is None:
        logger.warning("no tokenizer beside %s: validating on seeded random token ids", model_path)
        return np.random.default_rng(0).integers(0, vocab_size, size=(1, count))
    ids = encode(tok, load_text("calibration")[:20000])
    if len(ids) < count:
        raise RotgraphError(f"validation text has {len(ids)} tokens, {count} needed")
    return np.asarray(ids[:count], dtype=np.int64)[None, :]


def rotate(
    input_path: Path, output: Path, options: RotateOptions = RotateOptions(), execution: Execution | None = None
) -> RotateReport:
    """Rotate the model at `input_path`, check it against the input with onnxruntime, write `output`.

    The output (model, external data, tokenizer) appears only if validation passes; the input is
    never modified. `execution`: where the weight rewrites run (`rotgraph.execution`; the same output).
    """
    io.check_output_path([input_path], output)
    with running(execution, [input_path.parent]):
        return _rotate(input_path, output, options)


def _rotate(input_path: Path, output: Path, options: RotateOptions) -> RotateReport:
    start = time.perf_counter()
    model = io.load_model(input_path)
    check_inputs(model)
    dtype = model.graph.outputs[0].dtype
    desc = rotate_model(model, options)
    diff, tolerance = None, options.tolerance if options.tolerance is not None else default_tolerance(dtype, 0.0)
    with io.staged_output(output) as staged:
        io.save_model(model, staged)
        io.copy_companions(input_path, staged, output)
        if options.validate:
            tokens = validation_tokens(input_path, desc.vocab_size, options.validation_tokens)
            try:
                diff, scale = logit_difference(input_path, staged, tokens)
            except RotgraphError as e:
                if dtype != ir.DataType.BFLOAT16:
                    raise
                raise RotgraphError(
                    f"{e}; onnxruntime's CPU provider runs few bfloat16 ops, so a bfloat16 model cannot be "
                    "validated here: rotate it with --no-validate (the weights are rotated in float64 and written "
                    "as bfloat16 all the same)"
                ) from None
            if options.tolerance is None:
                tolerance = default_tolerance(dtype, scale)
            logger.info("validation: max |logit difference| %.3g (tolerance %.3g)", diff, tolerance)
            if not diff <= tolerance:
                raise ValidationError(
                    f"rotated model differs from the input by max |logit diff| {diff:.3g} > tolerance "
                    f"{tolerance:.3g}; nothing written"
                )
    return RotateReport(output, diff, tolerance, time.perf_counter() - start, summary(desc))


# A rotation's rounding error in the logits, by their dtype: an absolute floor and a fraction of the logits'
# scale (max |logit| on the validation tokens), whichever is larger. Rounding grows with the logits' scale and
# with the kernels that run (the default model's onnxscript-fused graph rotates to 7.25e-4 on the function
# bodies and 1.35e-3 with the compiled kernels, at max |logit| ~ 30: 4.5e-5 of the scale); a wrong rotation
# moves the logits by a sizeable fraction of their scale. float32: floor 1e-3, 2e-4 of the scale (the rotated
# SmolLM2 differs by 1.5e-4, measured 2026-11-30). float16 rounds at 1e-3 relative in every op of both graphs
# (a tiny random Llama in float16 differed by 7.8e-3, 2026-11-30).
TOLERANCES = {
    ir.DataType.FLOAT: (1e-3, 2e-4),
    ir.DataType.FLOAT16: (5e-2, 4e-3),
    ir.DataType.BFLOAT16: (2e-1, 3e-2),
}


def default_tolerance(dtype: ir.DataType | None, scale: float) -> float:
    """The max |logit difference| a rotation may cause in logits of `dtype` whose max |logit| is `scale`."""
    floor, relative = TOLERANCES.get(dtype, TOLERANCES[ir.DataType.FLOAT]) if dtype is not None else (1e-3, 2e-4)
    return max(floor, relative * scale)
