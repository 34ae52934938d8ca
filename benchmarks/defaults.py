"""What `rotgraph quantize MODEL -o OUT --scheme S [--format F]` gives with no other option.

    .venv/bin/python benchmarks/defaults.py [--workdir build/bench-defaults] [--windows 16] [--only w4a8/qdq ...]
        [--set KEY=VALUE --tag NAME]

Exports the default model (SmolLM2-135M-Instruct, with a KV cache) once, then runs the command line itself for each
scheme and format below, with no option but the scheme and the format (the `best` recipe: every `auto`
field resolved), each in a child process (wall time, peak RSS), and scores every output against the float
model on the same windows of the evaluation split (perplexity, KL and top-1 agreement; onnxruntime at its
basic level, as `rotgraph eval`). The genai folders are scored through their model file. Prints a
Markdown table with the resolved recipe of each row (from the `*.rotgraph.json` beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measured, size_mb

from rotgraph.evaluate import evaluate, windows
from rotgraph.genai import MODEL_FILE
from rotgraph.text import load_text
from rotgraph.tokenize import encode

ROWS = [
    ("w4a8", "qdq"),
    ("w4a8", "ort"),
    ("w4a8", "genai"),
    ("w4a4kv4", "qdq"),
    ("w4a4kv4", "ort"),
    ("w4a4kv4", "genai"),
    ("w8a8", "qdq"),
]
# What the resolved recipe is summarized by in the table.
SHOWN = (
    "weights.method",
    "weights.sequential",
    "weights.group",
    "weights.full_range",
    "weights.shared_head",
    "activations.mode",
    "activations.clip",
    "activations.asymmetric",
    "activations.center",
    "activations.wide_ratio",
    "kv_cache.store",
    "kv_cache.center_keys",
)


def summary(record: Path) -> str:
    config = json.loads(record.read_text())["config"]
    flat = {f"{s}.{k}": v for s, fields in config.items() if isinstance(fields, dict) for k, v in fields.items()}
    return ", ".join(f"{key.split('.')[1]}={flat[key]}" for key in SHOWN if flat[key] not in (None, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="build/bench-defaults")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows (the README table's 16)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", nargs="*", help="rows as SCHEME/FORMAT, e.g. w4a8/qdq")
    ap.add_argument("--reuse", action="store_true", help="keep outputs that exist (their build time is not measured)")
    ap.add_argument("--set", action="append", default=[], help="a configuration field for every row (KEY=VALUE)")
    ap.add_argument("--tag", default="", help="appended to the output names (rows made with --set)")
    args = ap.parse_args()
    work = Path(args.workdir)
    model = work / "export" / "model.onnx"
    rotgraph = [sys.executable, "-m", "rotgraph.cli"]
    if not model.is_file():
        measured([*rotgraph, "export", "-o", str(model), "--with-past"])  # onnxruntime-genai decodes with a cache
    rows = [r for r in ROWS if not args.only or f"{r[0]}/{r[1]}" in args.only]
    built = []
    for scheme, fmt in rows:
        name = f"{scheme}-{fmt}{'-' + args.tag if args.tag else ''}"
        out = work / name if fmt == "genai" else work / f"{name}.onnx"
        seconds, rss = None, None
        if not (args.reuse and out.exists()):
            sets = [a for value in args.set for a in ("--set", value)]
            argv = [*rotgraph, "quantize", str(model), "-o", str(out), "--scheme", scheme, "--format", fmt, *sets]
            result = measured(argv)
            seconds, rss = result["seconds"], result["peak_rss_mb"]
            print(f"{scheme} {fmt}: {seconds:.0f} s, {rss:.0f} MB; {result['out'].strip().splitlines()[0]}", flush=True)
        path = out / MODEL_FILE if fmt == "genai" else out
        built.append((scheme, fmt, path, seconds, rss))
    tokens = windows(encode(model.parent / "tokenizer.json", load_text("evaluation")), args.windows, args.seq_len)
    results = evaluate([model] + [b[2] for b in built], tokens, progress=False)
    base = results[0].perplexity
    print(
        f"\n### `rotgraph quantize MODEL -o OUT --scheme S --format F{''.join(' --set ' + v for v in args.set)}` "
        f"({args.windows} windows x {args.seq_len} tokens)\n"
    )
    print(
        "| scheme | format | perplexity | x float | KL to float | top-1 | size MB | build s | peak RSS MB | resolved recipe |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| float | - | {base:.2f} | 1.000x | - | - | {size_mb(model):.0f} | | | |")
    for (scheme, fmt, path, seconds, rss), r in zip(built, results[1:], strict=True):
        record = path.with_name(path.stem + ".rotgraph.json")
        cost = f"{seconds:.0f} | {rss:.0f}" if seconds is not None else "- | -"
        print(
            f"| {scheme} | {fmt} | {r.perplexity:.2f} | {r.perplexity / base:.3f}x | {r.kl_to_reference:.4f} | "
            f"{r.top1_agreement:.3f} | {size_mb(path):.0f} | {cost} | {summary(record)} |"
        )


if __name__ == "__main__":
    main()
