"""What each `rotgraph` subcommand does with its parsed arguments (`cmd_*`); the parser and `main` are in
`rotgraph.cli`. Each imports the module that does the work when it runs, so `rotgraph --help` stays light."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from rotgraph.errors import RotgraphError

if TYPE_CHECKING:
    from rotgraph.config import QuantConfig
    from rotgraph.execution import Execution

logger = logging.getLogger("rotgraph")
T = TypeVar("T")


def _tokens(args: argparse.Namespace, model: Path, split: str = "evaluation") -> np.ndarray:
    from rotgraph import io
    from rotgraph.evaluate import windows
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    tok = io.find_tokenizer(model, args.tokenizer)
    if tok is None:
        raise RotgraphError(f"no tokenizer: put tokenizer.json beside {model} or pass --tokenizer")
    text = load_text(split, args.text)  # type: ignore[arg-type]
    return windows(encode(tok, text), args.windows, args.seq_len)


def cmd_export(args: argparse.Namespace) -> None:
    from rotgraph.export import export

    out, config, seconds = export(args.model, Path(args.output), args.exporter, args.with_past, args.dtype)
    print(
        f"exported {config['model_type']} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}) "
        f"to {out} in {seconds:.1f} s"
    )


def _options(cls: type[T], args: argparse.Namespace, **explicit: object) -> T:
    """An options dataclass from the parsed arguments of the same names, plus `explicit` values."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**{**values, **explicit})


def execution_of(args: argparse.Namespace) -> Execution:
    """The `Execution` of a parsed `--ray [ADDRESS|N]` (not part of any recipe)."""
    from rotgraph.execution import Execution

    if args.ray is None:
        return Execution()
    if args.ray == "local":
        return Execution(ray=True)
    if args.ray.isdigit():
        return Execution(ray=True, workers=int(args.ray))
    if args.ray != "auto" and ":" not in args.ray:
        raise RotgraphError(
            f"--ray {args.ray}: neither a number of local workers nor a cluster address (HOST:PORT, ray://HOST:PORT "
            "or auto); give --ray after the input model"
        )
    return Execution(ray=True, address=args.ray)


def cmd_rotate(args: argparse.Namespace) -> None:
    from rotgraph.pipeline import RotateOptions, rotate

    if (args.rotation == "spinquant") != (args.rotations is not None):
        raise RotgraphError("--rotation learned needs --rotations FILE, and --rotations needs --rotation learned")
    if args.out_hadamard and args.no_online:
        raise RotgraphError("--out-hadamard is an online Hadamard: it cannot go with --no-online")
    options = _options(RotateOptions, args, online=not args.no_online, validate=not args.no_validate)
    report = rotate(Path(args.input), Path(args.output), options, execution=execution_of(args))
    print(report.description)
    if report.max_abs_logit_diff is not None:
        print(f"validated: max |logit difference| {report.max_abs_logit_diff:.3g} <= tolerance {report.tolerance:.3g}")
    print(f"wrote {report.output} in {report.seconds:.1f} s")


def cmd_learn(args: argparse.Namespace) -> None:
    from rotgraph.learn import LearnOptions, learn

    options = _options(LearnOptions, args, online=not args.no_online, checkpointing=not args.no_checkpointing)
    report = learn(Path(args.input), Path(args.output), options, resume=args.resume)
    if report.rank == 0:
        print(f"loss {report.loss_first:.4f} (first step) -> {report.loss_last:.4f} (last step)")
        print(f"orthogonality: max |R^T R - I| = {report.orthogonality_error:.2g}")
        print(f"wrote {report.output} ({report.steps} steps) in {report.seconds:.1f} s")


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The configuration of parsed `quantize` arguments: the recipe (default `best`), then the --config
    file, then the flags given, then each --set, each over the last."""
    from rotgraph import config, recipes

    base = recipes.preset(args.recipe)
    if args.config:
        base = recipes.load(Path(args.config), base)
    flags = {key: getattr(args, key) for key in config.flags() if getattr(args, key, None) is not None}
    return base.with_values(flags).with_values(config.parse_assignments(args.set or []))


def cmd_quantize(args: argparse.Namespace) -> None:
    from rotgraph.quantize import quantize

    report = quantize(
        Path(args.input),
        Path(args.output),
        quant_config(args),
        validate=not args.no_validate,
        keep_failed=args.keep_failed,
        execution=execution_of(args),
    )
    if report.validation is not None:
        print(f"validated against the float model: {report.validation}")
    o = report.options
    print(
        f"wrote {report.output} ({o.scheme}, rotation {o.rotation}, weights {o.weights}, activations {o.activations}) "
        f"in {report.seconds:.1f} s"
    )


def cmd_recipes(args: argparse.Namespace) -> None:
    from rotgraph import config, recipes

    if args.fields:
        for key, (kind, default, help_text) in config.describe_fields().items():
            print(f"{key} ({kind}, default {default!r}): {help_text}")
        return
    for name, recipe in recipes.RECIPES.items():
        print(f"{name}: {recipe.description}\n  measured: {recipe.measured}")
        values = ", ".join(f"{k}={v}" for k, v in recipe.values.items())
        print(f"  sets: {values or '(nothing: every auto field resolved)'}")


KERNELS = {"auto": None, "on": True, "off": False}


def cmd_eval(args: argparse.Namespace) -> None:
    from rotgraph.evaluate import evaluate
    from rotgraph.genai import model_in
    from rotgraph.io import require_files

    models = [model_in(Path(m)) for m in args.models]
    require_files(models)
    tokens = _tokens(args, models[0])
    results = evaluate(
        models, tokens, optimization=args.optimization, kernels=KERNELS[args.kernels], progress=not args.json
    )
    for r in results:
        if args.json:
            print(json.dumps(r.as_dict()))
        else:
            extra = ""
            if r.kl_to_reference is not None:
                extra = f"  KL {r.kl_to_reference:.5f}  top-1 {r.top1_agreement:.4f}"
            print(f"{r.model}: perplexity {r.perplexity:.4f}{extra}  ({r.tokens} tokens, {r.seconds:.1f} s)")


def cmd_generate(args: argparse.Namespace) -> None:
    from rotgraph.genai import model_in
    from rotgraph.generate import generate

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(
        model_in(Path(args.model)),
        args.prompt,
        args.max_new_tokens,
        chat=args.chat,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        on_text=show,
        threads=args.threads,
        kernels=KERNELS[args.kernels],
    )
    sys.stdout.write("\n")
    logger.info(
        "prompt %d tokens, prefill %.0f ms; %d new tokens, decode %.1f tokens/s%s",
        len(result.prompt_tokens),
        1000 * result.prefill_seconds,
        len(result.new_tokens),
        result.decode_tokens_per_second,
        " (stopped at end of sequence)" if result.stopped_at_eos else "",
    )


def cmd_inspect(args: argparse.Namespace) -> None:
    from rotgraph.io import require_files
    from rotgraph.stats import activation_stats, format_table

    model = Path(args.model)
    require_files([model] + ([Path(args.rotated)] if args.rotated else []))
    tokens = _tokens(args, model)
    if args.output:
        from rotgraph.report import write_report

        rotated = Path(args.rotated) if args.rotated else None
        index = write_report(Path(args.output), model, tokens, rotated, args.scheme, args.group)
        print(f"report: {index}")
        return
    with tempfile.TemporaryDirectory(prefix=".rotgraph-inspect.", dir=Path.cwd()) as scratch:  # removed at once
        before = activation_stats(model, tokens, scratch=Path(scratch) / "model")
        after = (
            activation_stats(Path(args.rotated), tokens, scratch=Path(scratch) / "rotated") if args.rotated else None
        )
    print(format_table(before, after))


def cmd_describe(args: argparse.Namespace) -> None:
    from rotgraph import io
    from rotgraph.pipeline import canonicalize
    from rotgraph.structure.summary import summary

    print(summary(canonicalize(io.load_model(args.model))))


def cmd_demo(args: argparse.Namespace) -> None:
    from rotgraph.evaluate import evaluate
    from rotgraph.export import export
    from rotgraph.pipeline import RotateOptions, rotate

    work = Path(args.workdir)
    original, rotated = work / "model.onnx", work / "rotated.onnx"
    if not original.is_file():
        export(None, original)
        print(f"exported the default model to {original}")
    report = rotate(original, rotated, RotateOptions(seed=args.seed))
    print(report.description)
    print(f"rotated in {report.seconds:.1f} s; max |logit difference| {report.max_abs_logit_diff:.3g}")
    for r in evaluate([original, rotated], _tokens(args, original)):
        extra = "" if r.kl_to_reference is None else f"  KL {r.kl_to_reference:.2e}  top-1 {r.top1_agreement:.4f}"
        print(f"{Path(r.model).name}: perplexity {r.perplexity:.4f}{extra}")
