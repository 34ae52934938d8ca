"""The quantization results table on the default model.

    python benchmarks/quantization.py [--model rotgraph-demo/bench/dynamo/model.onnx] [--windows 16]

For every scheme and method (RTN or GPTQ weights, with or without QuaRot, with or without
SmoothQuant at --alpha), quantizes the exported float model into the QDQ format, then scores it
against the float model on the same windows of the evaluation split: perplexity, KL to float,
top-1 agreement, size on disk. GPTQ calibrates once per rotation and smoothing setting on the
calibration split. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import size_mb

from rotgraph import io
from rotgraph.evaluate import evaluate, windows
from rotgraph.quantize import QuantOptions, calibration_tokens, quantize_model
from rotgraph.text import load_text
from rotgraph.tokenize import encode

METHODS = [  # name, rotation, weights, SmoothQuant
    ("RTN", "none", "rtn", False),
    ("GPTQ", "none", "gptq", False),
    ("SmoothQuant+RTN", "none", "rtn", True),
    ("QuaRot+RTN", "quarot", "rtn", False),
    ("QuaRot+GPTQ", "quarot", "gptq", False),
    ("QuaRot+SmoothQuant+GPTQ", "quarot", "gptq", True),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w4a16", "w4a8", "w4a4", "w4a4kv4"])
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--calibration-windows", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    args = ap.parse_args()
    source = Path(args.model)
    tokens = windows(encode(source.parent / "tokenizer.json", load_text("evaluation")), args.windows, 512)
    hessians: dict[tuple[str, bool], dict] = {}  # GPTQ statistics per (rotation, smoothing)
    calibration = None
    rows: list[tuple[str, str, float, float | None, float | None, float]] = []
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        for scheme in args.schemes:
            paths = []
            for name, rotation, weights, smooth in METHODS:
                options = QuantOptions(
                    scheme=scheme,
                    rotation=rotation,
                    weights=weights,
                    smooth=args.alpha if smooth else None,
                    group=args.group,
                    calibration_windows=args.calibration_windows,
                )
                t = time.perf_counter()
                model = io.load_model(source)
                if calibration is None:
                    calibration = calibration_tokens(source, options)
                h = quantize_model(model, options, calibration, hessians.get((rotation, smooth)))
                if h is not None:
                    hessians[rotation, smooth] = h
                out = Path(tmp) / f"{scheme}-{rotation}-{weights}-{smooth}.onnx"
                io.save_model(model, out)
                print(f"{scheme} {name}: quantized in {time.perf_counter() - t:.0f} s", file=sys.stderr)
                paths.append((name, out))
            results = evaluate([source] + [p for _, p in paths], tokens, progress=False)
            if not rows:
                rows.append(("float", "-", results[0].perplexity, 0.0, 1.0, size_mb(source)))
            for (name, path), r in zip(paths, results[1:], strict=True):
                rows.append((name, scheme, r.perplexity, r.kl_to_reference, r.top1_agreement, size_mb(path)))
            print(f"{scheme}: done", file=sys.stderr)
    print(
        f"\n### Quantization ({args.windows} windows x 512 tokens, weight groups of {args.group}, "
        f"SmoothQuant alpha {args.alpha}, QDQ format)\n"
    )
    print("| method | scheme | perplexity | ppl / float | KL to float | top-1 agreement | size MB |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2]
    for name, scheme, ppl, kl, top, mb in rows:
        print(f"| {name} | {scheme} | {ppl:.2f} | {ppl / base:.2f}x | {kl:.3f} | {top:.3f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
