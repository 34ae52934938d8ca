"""A quantized KV cache two ways: inside onnxruntime's GroupQueryAttention (`--kv-cache onnxruntime`, static
per-channel scales) against rotgraph's own per-token codes beside the eager attention (`--kv-cache rotgraph`).

    .venv/bin/python benchmarks/kv_cache.py [--workdir build/bench-genai] [--rounds 3] [--windows 8]
        [NAME=MODEL ...]

MODEL is an .onnx file or a genai folder. By default the models that benchmarks/genai.py's KV rows use:
the builder's fp32 graph (the reference of KL), rotgraph's `--recipe int4` folder with a float cache, and
`--recipe int4 --scheme w4a8kv8|w4a8kv4` with each cache (made by `rotgraph quantize` from the same
export; see RESULTS.md for the commands). Quality: perplexity, KL and top-1 on `--windows` x 512 tokens of
the evaluation split (`rotgraph.evaluate`, onnxruntime). Speed: `rotgraph generate`'s own greedy loop
(onnxruntime, 2 threads), 128 new tokens after the first 7 and after the first 512 tokens of the
evaluation text, the models run in turn in every round, median over rounds. Cache bytes per token: all
rank-4 cache inputs (codes, scales, zero points) per position. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
from rotgraph.evaluate import evaluate, windows  # noqa: E402
from rotgraph.genai import model_in  # noqa: E402
from rotgraph.generate import generate  # noqa: E402
from rotgraph.inputs import input_roles  # noqa: E402
from rotgraph.text import load_text  # noqa: E402
from rotgraph.tokenize import encode  # noqa: E402

THREADS = 2
NEW_TOKENS = 128
DEFAULTS = [
    ("builder fp32 (reference)", "builder-fp32"),
    ("rotgraph int4, float cache", "w4a8-recipe-int4"),
    ("rotgraph int4 kv8, onnxruntime cache", "int4-w4a8kv8"),
    ("rotgraph int4 kv8, rotgraph cache", "int4-w4a8kv8-rotgraph.onnx"),
    ("rotgraph int4 kv4, onnxruntime cache", "int4-w4a8kv4"),
    ("rotgraph int4 kv4, rotgraph cache", "int4-w4a8kv4-rotgraph.onnx"),
]


def cache_bytes_per_token(model: Path) -> int:
    """Bytes one position adds to the cache: every rank-4 input [batch, heads, past, width] (rotgraph's
    cache: codes, scales and zero points), heads and width as rotgraph's input roles read them."""
    graph = ir.from_proto(onnx.load(str(model), load_external_data=False))
    caches = input_roles(graph).caches
    named = {c.name: c for c in caches}
    total = sum(c.heads * c.width * np.dtype(c.dtype).itemsize for c in caches)
    for value in graph.graph.inputs:  # rotgraph's scales and zero points, not caches of their own
        dims = list(value.shape) if value.shape is not None else []
        if value.name not in named and len(dims) == 4 and isinstance(dims[1], int) and isinstance(dims[3], int):
            total += dims[1] * dims[3] * np.dtype(value.dtype.numpy()).itemsize  # type: ignore[union-attr]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench-genai"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument(
        "models", nargs="*", help="NAME=MODEL (an .onnx file or a genai folder); the first is the reference"
    )
    args = ap.parse_args()
    work = Path(args.workdir)
    pairs = [m.partition("=")[::2] for m in args.models] or [(n, str(work / p)) for n, p in DEFAULTS]
    models = [(name, model_in(Path(path)) if Path(path).is_dir() else Path(path)) for name, path in pairs]
    tokenizer = models[0][1].parent / "tokenizer.json"
    ids = encode(tokenizer, load_text("evaluation"))
    texts = {n: Tokenizer.from_file(str(tokenizer)).decode(list(map(int, ids[:n]))) for n in (7, 512)}
    speed: dict[str, dict[int, list[float]]] = {name: {7: [], 512: []} for name, _ in models[1:]}
    for round_index in range(args.rounds):
        for name, path in models[1:]:
            for length, text in texts.items():
                run = generate(path, text, NEW_TOKENS, threads=THREADS, tokenizer=tokenizer)
                speed[name][length].append(run.decode_tokens_per_second)
            print(
                f"round {round_index}: {name}: {speed[name][7][-1]:.1f} / {speed[name][512][-1]:.1f} tok/s",
                file=sys.stderr,
            )
    scores = evaluate([p for _, p in models], windows(ids, args.windows, 512), progress=False)
    print(
        f"\n### KV cache: {args.windows} x 512 tokens, KL to {models[0][0]}; decode: rotgraph generate, {THREADS} threads, median of {args.rounds} interleaved rounds\n"
    )
    print("| model | cache bytes/token | perplexity | KL | top-1 | decode tok/s (7 + 128) | decode tok/s (512 + 128) |")
    print("|---|---|---|---|---|---|---|")
    for (name, path), score in zip(models, scores, strict=True):
        kl = f"{score.kl_to_reference:.4f}" if score.kl_to_reference is not None else "-"
        top1 = f"{score.top1_agreement:.3f}" if score.top1_agreement is not None else "-"
        rates = speed.get(name, {7: [], 512: []})
        short, long = (f"{statistics.median(rates[n]):.1f}" if rates[n] else "-" for n in (7, 512))
        print(f"| {name} | {cache_bytes_per_token(path)} | {score.perplexity:.2f} | {kl} | {top1} | {short} | {long} |")


if __name__ == "__main__":
    main()
