"""Deployment numbers for the default model: size, latency, the cost of the online Hadamards, and
what `rotgraph quantize` costs.

    python benchmarks/deploy.py [--model rotgraph-demo/bench/dynamo/model.onnx]

Builds each model in a child process (timing it and its peak RSS): the rotated float graph;
int4 weight-only (w4a16, MatMulNBits, groups of 32, embedding and lm_head left float) by
onnxruntime's own MatMulNBitsQuantizer (RTN and GPTQ) and by rotgraph (RTN, GPTQ, QuaRot+GPTQ);
QuaRot+GPTQ w4a8 in both formats, and the ort format without R3/R4. Then times onnxruntime
(2 threads, all graph optimizations, no KV cache) on a 1-token and a 512-token input, and scores
every model on 8 evaluation windows. Ratios are from one run on one machine; prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import measured, size_mb
from onnxruntime.quantization import CalibrationDataReader

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


class _Windows(CalibrationDataReader):
    """Token windows as onnxruntime calibration feeds."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.feeds = iter([{"input_ids": w[None, :].astype(np.int64)} for w in tokens])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def onnxruntime_baseline(algorithm: str, source: Path, out: Path, calibration_windows: int, actorder: bool) -> None:
    """onnxruntime's own int4 weight-only quantizer (MatMulNBits, block 32, symmetric, accuracy_level 0)
    on the float graph: what users would otherwise run. GPTQ calibrates on the calibration split
    (damping 0.01, no activation order)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config: DefaultWeightOnlyQuantConfig | GPTQWeightOnlyQuantConfig
    if algorithm == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=0)
    else:
        ids = encode(source.parent / "tokenizer.json", load_text("calibration"))
        reader = _Windows(windows(ids, calibration_windows, 512))
        # act-order is off by default: onnxruntime's GPTQ (the Intel Neural Compressor port) forms its
        # groups of 32 over the act-order permuted rows, then re-quantizes the result in blocks of 32 in
        # the original row order (quant_tensor after gptq), mixing several GPTQ grids in every block.
        config = GPTQWeightOnlyQuantConfig(reader, percdamp=0.01, block_size=128, actorder=actorder)
    quantizer = MatMulNBitsQuantizer(
        onnx.load(source), block_size=32, is_symmetric=True, accuracy_level=0, algo_config=config
    )
    quantizer.process()
    model = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    onnx.save(model, out, save_as_external_data=True, location=out.name + ".data")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ort-calibration-windows", type=int, default=8)
    ap.add_argument("--ort-gptq-actorder", action="store_true", help="onnxruntime's GPTQ with activation order")
    ap.add_argument("--reuse", action="store_true", help="keep models built by an earlier run (time them only)")
    ap.add_argument("--onnxruntime-baseline", nargs=3, metavar=("ALGO", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.onnxruntime_baseline:
        algo, src, out = args.onnxruntime_baseline
        onnxruntime_baseline(algo, Path(src), Path(out), args.ort_calibration_windows, args.ort_gptq_actorder)
        return
    source = Path(args.model)
    folder = source.parent / "deploy"
    folder.mkdir(exist_ok=True)
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    baseline = [sys.executable, __file__, "--ort-calibration-windows", str(args.ort_calibration_windows)]
    baseline += ["--ort-gptq-actorder"] if args.ort_gptq_actorder else []
    w4a16 = [
        rotgraph,
        "quantize",
        "SRC",
        "-o",
        "OUT",
        "--scheme",
        "w4a16",
        "--format",
        "ort",
        "--set",
        "weights.head_bits=16",
    ]
    w4a8 = [rotgraph, "quantize", "SRC", "-o", "OUT", "--scheme", "w4a8", "--weights", "gptq"]
    builds = {  # SRC and OUT stand for the float model and the output
        "rotated float": [rotgraph, "rotate", "SRC", "-o", "OUT", "--no-validate"],
        "onnxruntime RTN w4a16": [*baseline, "--onnxruntime-baseline", "rtn", "SRC", "OUT"],
        "onnxruntime GPTQ w4a16": [*baseline, "--onnxruntime-baseline", "gptq", "SRC", "OUT"],
        "rotgraph RTN w4a16": [*w4a16, "--rotation", "none"],
        "rotgraph GPTQ w4a16": [*w4a16, "--rotation", "none", "--weights", "gptq"],
        "QuaRot+GPTQ w4a16": [*w4a16, "--weights", "gptq"],
        "QuaRot+GPTQ w4a8 qdq": [*w4a8, "--format", "qdq"],
        "QuaRot+GPTQ w4a8 ort": [*w4a8, "--format", "ort"],
        "QuaRot+GPTQ w4a8 ort, no R3/R4": [*w4a8, "--format", "ort", "--set", "rotation.online=false"],
    }
    paths = {"float": source}
    cost = []
    for i, (name, command) in enumerate(builds.items()):
        out = folder / f"m{i}.onnx"
        paths[name] = out
        if args.reuse and out.is_file():
            continue
        built = measured([{"SRC": str(source), "OUT": str(out)}.get(c, c) for c in command])
        cost.append((name, built["seconds"], built["peak_rss_mb"]))
        print(f"built {name} in {built['seconds']:.0f} s", file=sys.stderr)
    ids = encode(source.parent / "tokenizer.json", load_text("evaluation"))
    one = np.asarray(ids[:1], dtype=np.int64)[None, :]
    prompt = np.asarray(ids[:512], dtype=np.int64)[None, :]
    rows = []
    for name, path in paths.items():
        rows.append((name, size_mb(path), latency_ms(path, one, 50), latency_ms(path, prompt, 5)))
        print(f"timed {name}", file=sys.stderr)
    results = evaluate(list(paths.values()), windows(ids, args.windows, 512), progress=False)
    print(f"\n### Deployment (onnxruntime {ort_version()} CPU, 2 threads, ORT_ENABLE_ALL, no KV cache)\n")
    print("| model | size MB | size vs float | 1-token ms | 512-token ms | perplexity | KL to float | top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    base_size, base_one, base_512 = rows[0][1], rows[0][2], rows[0][3]
    for (name, mb, t1, t512), r in zip(rows, results, strict=True):
        kl = "-" if r.kl_to_reference is None else f"{r.kl_to_reference:.3f}"
        top = "-" if r.top1_agreement is None else f"{r.top1_agreement:.3f}"
        print(
            f"| {name} | {mb:.0f} | {base_size / mb:.2f}x smaller | {t1:.1f} ({t1 / base_one:.2f}x) | "
            f"{t512:.0f} ({t512 / base_512:.2f}x) | {r.perplexity:.2f} | {kl} | {top} |"
        )
    print("\n### Build cost (child process, wall time and peak RSS)\n")
    print("| build | wall s | peak RSS MB |")
    print("|---|---|---|")
    for name, s, mb in cost:
        print(f"| {name} | {s:.0f} | {mb:.0f} |")


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
