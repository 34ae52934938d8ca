"""SpinQuant against QuaRot on the default model.

    python benchmarks/spinquant.py [--model rotgraph-demo/bench/dynamo/model.onnx] [--steps 20]

For each scheme: learns R1/R2 with `rotgraph learn` on the calibration split (a child process, timed,
peak RSS), starting from QuaRot's seed-0 Hadamards; quantizes the float model with QuaRot at seeds
0, 1, 2 and with the learned rotations (same scheme, same weight quantizer, QDQ format); scores all on
the same windows of the evaluation split, which learning never saw. Reports perplexity, KL and top-1
agreement to float, QuaRot's mean and spread over seeds, and the fraction of QuaRot's perplexity gap to
float that SpinQuant closes. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import measured

from rotgraph.evaluate import evaluate, windows
from rotgraph.text import load_text
from rotgraph.tokenize import encode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--schemes", nargs="+", default=["w4a4kv4", "w4a8"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--learn-windows", type=int, default=32, help="calibration windows learning draws from")
    ap.add_argument("--weights", choices=["rtn", "gptq"], default="rtn")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    args = ap.parse_args()
    source = Path(args.model)
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    tokens = windows(encode(source.parent / "tokenizer.json", load_text("evaluation")), args.windows, 512)
    rows, costs = [], []
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        for scheme in args.schemes:
            rotations = Path(tmp) / f"{scheme}.safetensors"
            learn = [rotgraph, "learn", str(source), "-o", str(rotations), "--scheme", scheme]
            learned = measured([*learn, "--steps", str(args.steps), "--windows", str(args.learn_windows)])
            costs.append((scheme, learned["seconds"], learned["peak_rss_mb"]))
            print(f"{scheme}: learned in {learned['seconds']:.0f} s", file=sys.stderr)
            quantize = [rotgraph, "quantize", str(source), "--scheme", scheme, "--weights", args.weights]
            paths = {}
            for seed in args.seeds:
                paths[f"QuaRot seed {seed}"] = out = Path(tmp) / f"{scheme}-quarot-{seed}.onnx"
                measured([*quantize, "-o", str(out), "--seed", str(seed)])
            paths["SpinQuant"] = out = Path(tmp) / f"{scheme}-spinquant.onnx"
            measured([*quantize, "-o", str(out), "--rotation", "spinquant", "--rotations", str(rotations)])
            results = evaluate([source, *paths.values()], tokens, progress=False)
            float_ppl = results[0].perplexity
            by_name = dict(zip(paths, results[1:], strict=True))
            quarot = [by_name[f"QuaRot seed {s}"].perplexity for s in args.seeds]
            mean = statistics.mean(quarot)
            spread = statistics.stdev(quarot) if len(quarot) > 1 else 0.0
            spin = by_name["SpinQuant"].perplexity
            for name, r in by_name.items():
                rows.append((scheme, name, r.perplexity, r.kl_to_reference, r.top1_agreement))
            rows.append((scheme, f"QuaRot mean ± std over seeds {args.seeds}", mean, None, None, spread))
            closed = (mean - spin) / (mean - float_ppl)
            closed0 = (quarot[0] - spin) / (quarot[0] - float_ppl)
            rows.append((scheme, "gap to float closed by SpinQuant", closed, None, None, closed0))
            print(f"{scheme}: done (float {float_ppl:.2f})", file=sys.stderr)
    print(
        f"\n### SpinQuant vs QuaRot ({args.windows} evaluation windows x 512 tokens, {args.weights.upper()} "
        f"weights in groups of 32, {args.steps} learning steps)\n"
    )
    print(f"Float perplexity {float_ppl:.2f}.\n")
    print("| scheme | rotation | perplexity | KL to float | top-1 agreement |")
    print("|---|---|---|---|---|")
    for row in rows:
        scheme, name, value, kl, top = row[:5]
        if name.startswith("QuaRot mean"):
            print(f"| {scheme} | {name} | {value:.2f} ± {row[5]:.2f} | | |")
        elif name.startswith("gap"):
            print(f"| {scheme} | {name} | {100 * value:.0f}% of the mean's gap ({100 * row[5]:.0f}% of seed 0's) | | |")
        else:
            print(f"| {scheme} | {name} | {value:.2f} | {kl:.3f} | {top:.3f} |")
    print("\n### `rotgraph learn` cost (child process, 2 CPU cores)\n")
    print("| scheme | steps | wall s | s / step | peak RSS MB |")
    print("|---|---|---|---|---|")
    for scheme, seconds, rss in costs:
        print(f"| {scheme} | {args.steps} | {seconds:.0f} | {seconds / args.steps:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
