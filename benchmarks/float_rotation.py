"""Float rotation on the default model: exactness, perplexity, outliers, and the cost of `rotate`.

    python benchmarks/float_rotation.py [--workdir DIR] [--windows 8] [--exporters dynamo torchscript]

Exports SmolLM2-135M-Instruct with each exporter (reusing DIR/<exporter>/model.onnx if present), runs
`rotgraph rotate` in a child process (wall time, peak RSS), then on the evaluation split of the
Wikipedia text compares rotated and original logits window by window with onnxruntime at
ORT_DISABLE_ALL, reports perplexity, KL and top-1 agreement, and the activation outlier statistics.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import measured

from rotgraph.evaluate import evaluate, make_session, run_logits, windows
from rotgraph.export import export
from rotgraph.stats import activation_stats
from rotgraph.text import load_text
from rotgraph.tokenize import encode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="rotgraph-demo/bench")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--stats-windows", type=int, default=4)
    ap.add_argument("--exporters", nargs="+", default=["dynamo", "torchscript"])
    args = ap.parse_args()
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    speed, exact, stats_tables = [], [], []
    for exporter in args.exporters:
        folder = Path(args.workdir) / exporter
        model = folder / "model.onnx"
        if not model.is_file():
            t = time.perf_counter()
            export(None, model, exporter)  # type: ignore[arg-type]
            print(f"exported with {exporter} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        rotated = folder / "rotated.onnx"
        for validate in (False, True):
            cmd = [rotgraph, "rotate", str(model), "-o", str(rotated), "--seed", "0"]
            r = measured(cmd + ([] if validate else ["--no-validate"]))
            speed.append((exporter, "yes" if validate else "no", r["seconds"], r["peak_rss_mb"]))
        ids = encode(folder / "tokenizer.json", load_text("evaluation"))
        tokens = windows(ids, args.windows, args.seq_len)
        ref, rot = make_session(model, "disable"), make_session(rotated, "disable")
        diffs = [float(np.abs(run_logits(ref, w[None]) - run_logits(rot, w[None])).max()) for w in tokens]
        del ref, rot
        base, other = evaluate([model, rotated], tokens, progress=False)
        exact.append(
            (
                exporter,
                max(diffs),
                float(np.median(diffs)),
                base.perplexity,
                other.perplexity,
                other.kl_to_reference,
                other.top1_agreement,
            )
        )
        if exporter == args.exporters[0]:
            st = windows(ids, args.stats_windows, args.seq_len)
            stats_tables = list(zip(activation_stats(model, st), activation_stats(rotated, st), strict=True))

    print(f"\n### Exactness ({args.windows} windows x {args.seq_len} tokens, evaluation split)\n")
    print(
        "| exporter | max abs logit diff | median of per-window max | perplexity float | perplexity rotated | KL | top-1 |"
    )
    print("|---|---|---|---|---|---|---|")
    for e, mx, med, p0, p1, kl, top in exact:
        print(f"| {e} | {mx:.2e} | {med:.2e} | {p0:.5f} | {p1:.5f} | {kl:.1e} | {top:.5f} |")
    print("\n### `rotgraph rotate` cost (child process, this machine)\n")
    print("| exporter | validation | wall s | peak RSS MB |")
    print("|---|---|---|---|")
    for e, v, s, m in speed:
        print(f"| {e} | {v} | {s:.1f} | {m:.0f} |")
    print(f"\n### Activation outliers ({args.exporters[0]} export, {args.stats_windows} windows)\n")
    print("| layer | residual max/RMS | residual kurtosis | down_proj input max/RMS | down_proj input kurtosis |")
    print("|---|---|---|---|---|")
    n = len(stats_tables)
    for i in sorted({0, 1, n // 4, n // 2 - 3, n // 2, 3 * n // 4, n - 2, n - 1}):
        b, a = stats_tables[i]
        print(
            f"| {i} | {b.residual_max_over_rms:.1f} -> {a.residual_max_over_rms:.1f} | "
            f"{b.residual_kurtosis:.1f} -> {a.residual_kurtosis:.1f} | "
            f"{b.down_max_over_rms:.1f} -> {a.down_max_over_rms:.1f} | {b.down_kurtosis:.1f} -> {a.down_kurtosis:.1f} |"
        )
    mean = [
        float(np.mean([getattr(x[k], f) for x in stats_tables]))
        for f in ("residual_max_over_rms", "residual_kurtosis", "down_max_over_rms", "down_kurtosis")
        for k in (0, 1)
    ]
    print(
        f"| mean | {mean[0]:.1f} -> {mean[1]:.1f} | {mean[2]:.1f} -> {mean[3]:.1f} | "
        f"{mean[4]:.1f} -> {mean[5]:.1f} | {mean[6]:.1f} -> {mean[7]:.1f} |"
    )


if __name__ == "__main__":
    main()
