"""Deployment numbers for the default model: size, latency, the cost of the online Hadamards, and
what `rotgraph quantize` costs.

    python benchmarks/deploy.py [--model rotgraph-demo/bench/dynamo/model.onnx]

Builds (in a child process, timing it and its peak RSS) the rotated float graph and QuaRot w4a8 in
both formats with GPTQ weights, plus the ort format without R3/R4; then times onnxruntime (2 threads,
all graph optimizations, no KV cache) on a 1-token and a 512-token input, and reports perplexity on
8 windows. Ratios are from one run on one machine; prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import measured, size_mb

from rotgraph.evaluate import evaluate, make_session, windows
from rotgraph.text import load_text
from rotgraph.tokenize import encode


def latency_ms(path: Path, tokens: np.ndarray, repeats: int) -> float:
    session = make_session(path, "all", threads=2)
    feed = {session.get_inputs()[0].name: tokens}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def onnxruntime_rtn(source: Path, out: Path) -> float:
    """onnxruntime's own weight-only int4 quantizer on the float graph: what users would otherwise run."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    t = time.perf_counter()
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(onnx.load(source), algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, out, save_as_external_data=True, location=out.name + ".data")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--reuse", action="store_true", help="keep models built by an earlier run (time them only)")
    args = ap.parse_args()
    source = Path(args.model)
    folder = source.parent / "deploy"
    folder.mkdir(exist_ok=True)
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    builds = {
        "rotated float": ["rotate", "--no-validate"],
        "QuaRot+RTN w4a8 qdq": ["quantize", "--scheme", "w4a8", "--format", "qdq"],
        "QuaRot+GPTQ w4a8 qdq": ["quantize", "--scheme", "w4a8", "--format", "qdq", "--weights", "gptq"],
        "QuaRot+GPTQ w4a8 ort": ["quantize", "--scheme", "w4a8", "--format", "ort", "--weights", "gptq"],
        "QuaRot+GPTQ w4a8 ort, no R3/R4": [
            "quantize",
            "--scheme",
            "w4a8",
            "--format",
            "ort",
            "--weights",
            "gptq",
            "--no-online",
        ],
        "QuaRot+GPTQ w4a16 ort": ["quantize", "--scheme", "w4a16", "--format", "ort", "--weights", "gptq"],
    }
    paths = {"float": source}
    cost = []
    for i, (name, extra) in enumerate(builds.items()):
        out = folder / f"m{i}.onnx"
        paths[name] = out
        if args.reuse and out.is_file():
            continue
        r = measured([rotgraph, extra[0], str(source), "-o", str(out), *extra[1:]])
        cost.append((name, r["seconds"], r["peak_rss_mb"]))
        print(f"built {name} in {r['seconds']:.0f} s", file=sys.stderr)
    baseline = folder / "ort_rtn.onnx"
    if not (args.reuse and baseline.is_file()):
        cost.append(("onnxruntime MatMulNBitsQuantizer (in process)", onnxruntime_rtn(source, baseline), float("nan")))
    paths["onnxruntime RTN int4 (block 32, acc. 4)"] = baseline
    ids = encode(source.parent / "tokenizer.json", load_text("evaluation"))
    one = np.asarray(ids[:1], dtype=np.int64)[None, :]
    prompt = np.asarray(ids[:512], dtype=np.int64)[None, :]
    rows = []
    for name, path in paths.items():
        rows.append((name, size_mb(path), latency_ms(path, one, 50), latency_ms(path, prompt, 5)))
    results = evaluate(list(paths.values()), windows(ids, args.windows, 512), progress=False)
    print("\n### Deployment (onnxruntime 1.32 CPU, 2 threads, ORT_ENABLE_ALL, no KV cache)\n")
    print("| model | size MB | size vs float | 1-token ms | 512-token ms | perplexity | KL to float |")
    print("|---|---|---|---|---|---|---|")
    base_size, base_one = rows[0][1], rows[0][2]
    for (name, mb, t1, t512), r in zip(rows, results, strict=True):
        kl = "-" if r.kl_to_reference is None else f"{r.kl_to_reference:.3f}"
        print(
            f"| {name} | {mb:.0f} | {base_size / mb:.2f}x smaller | {t1:.1f} ({t1 / base_one:.2f}x) | {t512:.0f} | "
            f"{r.perplexity:.2f} | {kl} |"
        )
    print("\n### `rotgraph` cost per build (child process)\n")
    print("| build | wall s | peak RSS MB |")
    print("|---|---|---|")
    for name, s, mb in cost:
        print(f"| {name} | {s:.0f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
