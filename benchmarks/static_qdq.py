"""Static per-tensor QDQ (the edge-compiler form) on the default model, against onnxruntime's quantize_static.

    python benchmarks/static_qdq.py --model build/bench-exporters/rotgraph/model.onnx [--windows 8]

For w8a8 and w4a8 (and w4a4 with --schemes), quantizes the float model with static per-tensor activation
scales (minmax on the calibration split, uint8 codes + zero point) and standard ONNX only (--opset 21):
no rotation, SmoothQuant, QuaRot, QuaRot+GPTQ, and QuaRot (+GPTQ) with 16-bit Q/DQ on the projection
inputs whose range massive tokens set (--wide-ratio), and with --rotations FILE SpinQuant (learned rotations,
with and without those sites); beside them onnxruntime's own `quantize_static` (QDQ,
uint8 activations, int8 per-channel weights, MatMul only, the same calibration windows) and rotgraph's
dynamic per-token rows. Scores every model against the float one on the evaluation split (perplexity, KL,
top-1; onnxruntime at the "basic" level, which computes the Q/DQ arithmetic exactly), then times a
512-token prefill of the static w8a8 QuaRot graphs and of the float graph in onnxruntime with every
optimization on (integer kernels), interleaved round by round, and counts the integer nodes onnxruntime
made. Prints markdown tables; each row is also appended to OUT.jsonl as it is measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import size_mb

from rotgraph import io
from rotgraph.evaluate import empty_cache, evaluate, windows
from rotgraph.quantize import QuantOptions, calibration_tokens, quantize_model
from rotgraph.text import load_text
from rotgraph.tokenize import encode

METHODS = [  # name, rotation, weights, SmoothQuant, activations, 16-bit sites above --wide-ratio
    ("static, no rotation", "none", "rtn", False, "static", False),
    ("static, SmoothQuant", "none", "rtn", True, "static", False),
    ("static, QuaRot", "quarot", "rtn", False, "static", False),
    ("static, QuaRot+GPTQ", "quarot", "gptq", False, "static", False),
    ("static, no rotation, 16-bit massive sites", "none", "rtn", False, "static", True),
    ("static, QuaRot, 16-bit massive sites", "quarot", "rtn", False, "static", True),
    ("static, QuaRot+GPTQ, 16-bit massive sites", "quarot", "gptq", False, "static", True),
    ("dynamic per-token, QuaRot", "quarot", "rtn", False, "dynamic", False),
]
SPINQUANT = [  # with --rotations FILE (`rotgraph learn`)
    ("static, SpinQuant", "spinquant", "rtn", False, "static", False),
    ("static, SpinQuant, 16-bit massive sites", "spinquant", "rtn", False, "static", True),
]


def ort_quantize_static(source: Path, out: Path, calibration: np.ndarray, work: Path) -> None:
    """onnxruntime's quantize_static on the float graph: QDQ, uint8 activations, int8 per-channel weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self.rows, None)
            if row is None:
                return None
            return {"input_ids": row[None, :].astype(np.int64)} | empty_cache(session, 1)

    quantize_static(
        str(source),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )


def prefill_seconds(
    paths: list[Path], tokens: np.ndarray, rounds: int, work: Path
) -> tuple[list[float], list[Counter]]:
    """Median 512-token prefill time of each model (onnxruntime, every optimization on, 2 threads),
    interleaved round by round, and the op counts of the graph onnxruntime optimized."""
    sessions, counts = [], []
    for i, path in enumerate(paths):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        optimized = work / f"optimized{i}.onnx"
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"opt{i}.data")
        sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
        counts.append(Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node))
    feeds = [{"input_ids": tokens} | empty_cache(s, 1) for s in sessions]
    times: list[list[float]] = [[] for _ in paths]
    for s, f in zip(sessions, feeds, strict=True):  # warm-up
        s.run(None, f)
    for _ in range(rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds, strict=True)):
            t = time.perf_counter()
            s.run(None, f)
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times], counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w4a8"])
    ap.add_argument("--calibration-windows", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--group", type=int, default=32, help="4-bit weight group size (8-bit weights: per channel)")
    ap.add_argument("--out", default="static_qdq.jsonl")
    ap.add_argument("--calibration", default="minmax", help="static ranges: minmax | percentile | entropy")
    ap.add_argument("--only", nargs="+", help="method names to run (default: all, with onnxruntime's)")
    ap.add_argument("--wide-ratio", type=float, default=16.0, help="the 16-bit massive-sites rows' --wide-ratio")
    ap.add_argument("--rotations", help="learned rotations (`rotgraph learn`): adds the SpinQuant rows")
    args = ap.parse_args()
    source = Path(args.model)
    tokens = windows(encode(source.parent / "tokenizer.json", load_text("evaluation")), args.windows, 512)
    log = Path(args.out)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")

    calibration = None
    hessians: dict[str, dict] = {}
    speed_paths: dict[str, Path] = {}  # the float graph and the static w8a8 QuaRot graphs, timed together
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        for scheme in args.schemes:
            paths = []
            for name, rotation, weights, smooth, activations, wide in METHODS + (SPINQUANT if args.rotations else []):
                if args.only and name not in args.only:
                    continue
                options = QuantOptions(
                    scheme=scheme,
                    rotation=rotation,
                    rotations=args.rotations if rotation == "spinquant" else None,
                    weights=weights,
                    smooth=args.alpha if smooth else None,
                    group=0 if scheme.startswith("w8") else args.group,  # integer kernels take per-channel int8 weights
                    calibration_windows=args.calibration_windows,
                    activations=activations,
                    calibration=args.calibration,
                    wide_ratio=args.wide_ratio if wide else None,
                    opset=21,
                )
                t = time.perf_counter()
                model = io.load_model(source)
                if calibration is None:
                    calibration = calibration_tokens(source, options)
                scratch = Path(tmp) / f"scratch-{scheme}-{len(paths)}"  # weights computed in memory go here
                scratch.mkdir()
                h = quantize_model(model, options, calibration, hessians.get(rotation), scratch=scratch)
                if h is not None:
                    hessians[rotation] = h
                out = Path(tmp) / f"{scheme}-{len(paths)}.onnx"
                io.save_model(model, out)
                del model
                shutil.rmtree(scratch, ignore_errors=True)
                print(f"{scheme} {name}: quantized in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
                paths.append((name, out))
                if scheme == "w8a8" and name.startswith("static, QuaRot") and "GPTQ" not in name:
                    speed_paths[name] = out
            if scheme == "w8a8" and (not args.only or "onnxruntime quantize_static" in args.only):
                assert calibration is not None
                t = time.perf_counter()
                out = Path(tmp) / "ort-quantize-static.onnx"
                ort_quantize_static(source, out, calibration, Path(tmp))
                print(f"onnxruntime quantize_static: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
                paths.append(("onnxruntime quantize_static", out))
            for start in range(0, len(paths), 4):  # a few sessions at a time (memory)
                group = paths[start : start + 4]
                results = evaluate([source] + [p for _, p in group], tokens, progress=False)
                if not rows:
                    record(
                        {
                            "method": "float",
                            "scheme": "-",
                            "perplexity": results[0].perplexity,
                            "kl": 0.0,
                            "top1": 1.0,
                            "mb": size_mb(source),
                        }
                    )
                for (name, path), r in zip(group, results[1:], strict=True):
                    record(
                        {
                            "method": name,
                            "scheme": scheme,
                            "perplexity": r.perplexity,
                            "kl": r.kl_to_reference,
                            "top1": r.top1_agreement,
                            "mb": size_mb(path),
                        }
                    )
            print(f"{scheme}: scored", file=sys.stderr, flush=True)
        speed = None
        if speed_paths and args.rounds:
            prompt = tokens[:1, :512].astype(np.int64)
            seconds, counts = prefill_seconds([source, *speed_paths.values()], prompt, args.rounds, Path(tmp))
            speed = (list(speed_paths), seconds, counts)
            for name, s, c in zip(speed_paths, seconds[1:], counts[1:], strict=True):
                record(
                    {
                        "prefill": name,
                        "prefill_float_s": seconds[0],
                        "prefill_static_w8a8_s": s,
                        "integer_nodes": {k: v for k, v in c.items() if "Integer" in k or "QLinear" in k},
                        "float_matmuls_left": c.get("MatMul", 0),
                        "float_graph_matmuls": counts[0].get("MatMul", 0),
                    }
                )
    print(
        f"\n### Static per-tensor QDQ ({args.windows} windows x 512 tokens, calibration {args.calibration_windows} "
        f"windows, {args.calibration}, uint8 activations; w8 per channel, w4 groups of {args.group}; SmoothQuant alpha {args.alpha})\n"
    )
    print("| method | scheme | perplexity | ppl / float | KL to float | top-1 agreement | size MB |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0]["perplexity"]
    for r in rows:
        if "method" in r:
            print(
                f"| {r['method']} | {r['scheme']} | {r['perplexity']:.2f} | {r['perplexity'] / base:.3f}x | "
                f"{r['kl']:.4f} | {r['top1']:.3f} | {r['mb']:.0f} |"
            )
    if speed is not None:
        names, seconds, counts = speed
        print(
            f"\n512-token prefill, onnxruntime all optimizations, 2 threads, median of {args.rounds} interleaved "
            f"rounds: float {seconds[0]:.3f} s"
        )
        for name, q_s, q_counts in zip(names, seconds[1:], counts[1:], strict=True):
            integer = ", ".join(f"{k} {v}" for k, v in sorted(q_counts.items()) if "Integer" in k or "QLinear" in k)
            print(
                f"- w8a8 {name}: {q_s:.3f} s ({seconds[0] / q_s:.2f}x float); integer nodes: {integer}; "
                f"float MatMuls left {q_counts.get('MatMul', 0)}"
            )


if __name__ == "__main__":
    main()
