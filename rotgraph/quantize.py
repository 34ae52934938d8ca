"""`rotgraph quantize`: resolve the configuration, load, run the declared stages (`rotgraph.stages`), save
with the recorded configuration, validate against the float model (`rotgraph.validation`), move into place
(for the genai format, then write the rest of the folder)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import genai, io
from rotgraph.calibrate import Calibration, Site
from rotgraph.config import CONFIG_SUFFIX, QuantConfig, recorded, to_options
from rotgraph.constants import QUANTIZATION_KEY, RECIPE_KEY, ROTATION_KEY
from rotgraph.errors import RotgraphError
from rotgraph.evaluate import windows
from rotgraph.execution import Execution, running
from rotgraph.inputs import input_roles
from rotgraph.options import QuantOptions, Scheme
from rotgraph.pipeline import (
    check_inputs,
    rotation_metadata,
    run_passes,
    validation_tokens,
)
from rotgraph.recipes import resolve
from rotgraph.stages import quantize_stages, rotate_options
from rotgraph.validation import FLOORS, Agreement, check_against_float

logger = logging.getLogger(__name__)

VALIDATION_WINDOWS, VALIDATION_SEQ_LEN = 2, 128


@dataclass(frozen=True)
class QuantReport:
    output: Path
    seconds: float
    options: QuantOptions
    validation: Agreement | None = None


def ties_embedding(path: Path) -> bool:
    """Whether the model file's lm_head reads its embedding table, by structure (its weights are not read):
    the largest 2-D table a Gather reads is read by some other node too (a Transpose or MatMul). True when
    no such table is found (a fused graph: the quantizer decides there)."""
    graph = io.load_model(path).graph  # its errors name the file and what is wrong with it
    tables = [
        v
        for v in graph.initializers.values()
        if v.shape is not None
        and len(v.shape) == 2
        and any(u.node.op_type == "Gather" and u.idx == 0 for u in v.uses())
    ]
    if not tables:
        return True
    table = max(tables, key=lambda v: v.shape.numpy()[0] * v.shape.numpy()[1])  # type: ignore[union-attr]
    return any(u.node.op_type != "Gather" for u in table.uses())


def calibration_tokens(model_path: Path, options: QuantOptions) -> np.ndarray:
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    tok = io.find_tokenizer(model_path)
    if tok is None:
        used = options.calibration_uses
        hint = " (or --activations dynamic)" if used == ["static activations"] else ""
        raise RotgraphError(f"calibration ({', '.join(used)}) needs tokenizer.json beside {model_path}{hint}")
    text = load_text("calibration", options.text)
    length = options.calibration_seq_len
    if options.context_length is not None and options.context_length < length:
        logger.info("calibration windows of %d tokens: the model's context length", options.context_length)
        length = options.context_length  # RoPE tables end there
    return windows(encode(tok, text), options.calibration_windows, length)


def quantize_model(
    model: ir.Model,
    options: QuantOptions,
    calibration: np.ndarray | None = None,
    hessians: dict[Site, np.ndarray] | None = None,
    scratch: Path | None = None,
) -> dict[Site, np.ndarray] | None:
    """Run `quantize_stages(options)` on `model` in place and record the options in its metadata.

    SmoothQuant and GPTQ need `calibration` tokens [windows, seq_len]; GPTQ can instead take `hessians`
    from an earlier call on the same model file with the same rotation and smoothing (they are keyed by
    structural site and returned, so several schemes can share one calibration run; not on a model run
    block by block, whose Hessians are dropped block after block). `scratch`: see
    `quantize_stages` (the caller creates and removes the folder).
    """
    if ROTATION_KEY in model.metadata_props and options.rotation != "none":
        raise RotgraphError(f"model is already rotated ({model.metadata_props[ROTATION_KEY]})")
    data = Calibration() if calibration is None else Calibration(calibration)
    if hessians is not None:
        data.hessians = dict(hessians)
    stages = quantize_stages(
        options, data if calibration is not None or hessians else None, scratch, calibrated=hessians is not None
    )
    logger.debug("quantize stages:\n%s", "\n".join(map(str, stages)))
    run_passes(model, [p for stage in stages for p in stage.passes])
    if options.rotation != "none":
        model.metadata_props[ROTATION_KEY] = rotation_metadata(rotate_options(options), model)
    model.metadata_props[QUANTIZATION_KEY] = json.dumps(asdict(options))
    return dict(data.hessians) if options.weights == "gptq" and data.hessians is not None else None


def quantize(
    input_path: Path,
    output: Path,
    config: QuantConfig | QuantOptions | None = None,
    validate: bool = True,
    keep_failed: bool = False,
    execution: Execution | None = None,
) -> QuantReport:
    """Quantize the model at `input_path` into `output` (a .onnx file, or with the genai format a folder),
    atomically: nothing appears unless it is done and validated.

    `config`: a `QuantConfig` (None: the `best` recipe), whose `auto` fields are resolved for this model
    (`rotgraph.recipes.resolve`; a note is logged where the best choice needs calibration text it lacks) and
    recorded in the output's metadata and in `OUT.rotgraph.json` beside it; or an already flat
    `QuantOptions`, used as it is. With `validate`, onnxruntime runs the float input and the result on
    validation text (`rotgraph.validation`): a broken result, or one far below its scheme's floors, is
    refused (`keep_failed`: written with a warning). `execution`: where the weight rewrites and quantizers
    run (`rotgraph.execution`; the same output)."""
    with running(execution, [input_path.parent]):
        return _quantize(input_path, output, config, validate, keep_failed)


def _quantize(
    input_path: Path,
    output: Path,
    config: QuantConfig | QuantOptions | None,
    validate: bool,
    keep_failed: bool,
) -> QuantReport:
    if isinstance(config, QuantOptions):
        options, record = config, None
    else:
        config, has_text = config or QuantConfig(), io.find_tokenizer(input_path) is not None
        to_options(resolve(config, has_text)[0])  # refuses bad settings before the model is read
        resolved, notes = resolve(config, has_text, tied=ties_embedding(input_path))
        if notes:
            logger.warning("no calibration text (tokenizer.json beside %s): %s left out", input_path, ", ".join(notes))
        options, record = to_options(resolved), recorded(resolved)
    if options.fmt == "genai" and output.suffix != ".onnx":
        if output.exists() and not output.is_dir():
            raise RotgraphError(f"--format genai writes a folder: {output} is a file")
        io.require_files([input_path])
        context = options.context_length or genai.context_length(input_path)
        options = dataclasses.replace(options, context_length=context)
        report = _quantize_file(input_path, output / genai.MODEL_FILE, options, record, validate, keep_failed)
        genai.write_folder(output / genai.MODEL_FILE, input_path, context)
        return dataclasses.replace(report, output=output)
    return _quantize_file(input_path, output, options, record, validate, keep_failed)


def _quantize_file(
    input_path: Path,
    output: Path,
    options: QuantOptions,
    record: dict[str, object] | None,
    validate: bool,
    keep_failed: bool,
) -> QuantReport:
    """Scratch files (weights computed in memory, quantized tensors spilled as they are produced, so memory
    stays at the working set of one weight) live in the output's staging folder."""
    start = time.perf_counter()
    io.check_output_path([input_path], output)
    model = io.load_model(input_path)
    check_inputs(model)
    if options.fmt == "genai" and output.name == genai.MODEL_FILE and not input_roles(model).caches:
        raise RotgraphError(
            f"{input_path} has no KV-cache inputs, and onnxruntime-genai decodes with one: export the model with "
            "`rotgraph export --with-past` (or give a graph with past key/value inputs)"
        )
    calibration = calibration_tokens(input_path, options) if options.calibration_uses else None
    found = None
    with io.staged_output(output) as staged:
        scratch = staged.parent / "scratch"
        scratch.mkdir()
        try:
            quantize_model(model, options, calibration, scratch=scratch)
            if record is not None:
                model.metadata_props[RECIPE_KEY] = json.dumps(record, sort_keys=True)
            io.save_model(model, staged)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        io.copy_companions(input_path, staged, output)
        if record is not None:  # after the companions: a source's own record must not replace it
            staged.with_name(output.stem + CONFIG_SUFFIX).write_text(json.dumps(record, indent=2) + "\n")
        if validate:
            real_text = io.find_tokenizer(input_path) is not None
            tokens = validation_tokens(input_path, _vocab_size(model), VALIDATION_WINDOWS * VALIDATION_SEQ_LEN)
            tokens = tokens.reshape(VALIDATION_WINDOWS, VALIDATION_SEQ_LEN)
            floor = FLOORS[Scheme.parse(options.scheme).act_bits]
            found = check_against_float(input_path, staged, tokens, floor, real_text, keep_failed)
            logger.info("validation: %s", found)
    return QuantReport(output, time.perf_counter() - start, options, found)


def _vocab_size(model: ir.Model) -> int:
    """The last dimension of the logits (the first graph output), for seeded validation ids."""
    shape = model.graph.outputs[0].shape
    size = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(size, int):
        raise RotgraphError(f"cannot tell the vocabulary size from the logits output {model.graph.outputs[0].name!r}")
    return size
