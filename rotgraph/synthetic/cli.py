"""The command line of `python -m rotgraph.synthetic`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rotgraph.synthetic import parameter_count, weight_bytes, write_model
from rotgraph.synthetic.config import PRESETS, TOKENIZER_VOCAB, SyntheticConfig, preset

logger = logging.getLogger(__name__)

# --- command line ------------------------------------------------------------------------------------

_WIDTHS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rotgraph.synthetic",
        description="Write a random-weight Llama/Qwen2 decoder as ONNX (model.onnx + model.onnx.data) in the "
        "form of `rotgraph export --with-past`, weight by weight.",
    )
    p.add_argument("--preset", choices=list(PRESETS), help="real widths; the flags below override its fields")
    for name in _WIDTHS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help="required without --preset")
    p.add_argument("--rope-theta", type=float)
    p.add_argument("--rms-eps", type=float)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None, help="lm_head tied to the embedding")
    p.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None, help="Q/K/V biases (Qwen2)")
    p.add_argument(
        "--kv-cache", action=argparse.BooleanOptionalAction, default=None, help="past/present inputs (default on)"
    )
    p.add_argument("--dtype", choices=["float32", "float16"])
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"write a {TOKENIZER_VOCAB}-token tokenizer.json beside the model (default on; vocab >= {TOKENIZER_VOCAB})",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write model.onnx into")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> SyntheticConfig:
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.preset is not None:
        return preset(args.preset, **given)
    missing = [f"--{name.replace('_', '-')}" for name in _WIDTHS if name not in given]
    if missing:
        raise ValueError(f"without --preset, give {' '.join(missing)}")
    return SyntheticConfig(**given)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as e:
        print(f"rotgraph.synthetic: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    path = write_model(config, args.output, progress=not args.quiet, tokenizer=args.tokenizer)
    print(
        f"{path}: {config.layers} layers, {parameter_count(config) / 1e6:,.1f} M parameters, "
        f"{weight_bytes(config) / 1e6:,.1f} MB of {config.dtype} weights, {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
