"""Prefill and KV-cache decoding speed on onnxruntime, against the machine's memory-bandwidth bound.

    python benchmarks/decode.py [--workdir rotgraph-demo/bench/decode] [--reuse] [--threads 2]

Exports the default model with a KV cache (`rotgraph export --with-past`), rotates it, and quantizes it
with QuaRot + RTN in the onnxruntime format (int4 MatMulNBits weights; w4a8: int8 activations through
onnxruntime's dynamic-quantization kernels; w4a4kv4: 4-bit activations as FakeQuant functions and the
KV cache stored as 4-bit codes). Each model is then measured in its own child process: prefill of 512
tokens, decoding at contexts of 128 and 1024 tokens (tokens/s over 32 greedy steps after a prefill of
that length; the median step), KV-cache bytes per token, peak RSS. The bound for decoding is the bytes of weights read
per token (every initializer, but only one row of the embedding table) over the measured memory
bandwidth (an embedding table that lm_head also reads counts whole). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import measured, size_mb

MODELS = {  # name -> rotgraph quantize arguments (None: the float export, "rotate": the float rotation)
    "float": None,
    "float + rotation (R1-R4)": "rotate",
    "w4a16": ["--scheme", "w4a16"],
    "w4a8": ["--scheme", "w4a8"],
    "w4a8, no R3/R4": ["--scheme", "w4a8", "--no-online"],
    "w4a4kv4": ["--scheme", "w4a4kv4"],
}
STEPS = 32


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of initializers one decoding step reads: all of them, but one row of a gathered table."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    proto = onnx.load(str(path), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    gathered = {name for name, ops in readers.items() if ops <= {"Gather", "GatherBlockQuantized"}}
    total = 0
    for init in proto.graph.initializer:
        size = int(np.prod(init.dims)) * np.dtype(tensor_dtype_to_np_dtype(init.data_type)).itemsize
        total += size // init.dims[0] if init.name in gathered and init.dims else size
    return total


def memory_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: best of 5 max-reductions (SIMD, so memory-bound) over a 1 GiB float32 array split
    across `threads` threads."""
    data = np.ones(1 << 28, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def measure_one(path: Path, threads: int) -> dict:
    """Runs in a child process: prefill and decode timings, cache bytes per token, peak RSS."""
    from rotgraph.evaluate import make_session
    from rotgraph.generate import Decoder
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    ids = np.array(encode(path.parent / "tokenizer.json", load_text("evaluation"))[:2048])
    session = make_session(path, "all", threads)
    prefill = []
    for _ in range(3):
        decoder = Decoder(session)
        start = time.perf_counter()
        decoder.step(ids[None, :512])
        prefill.append(time.perf_counter() - start)
    result: dict = {"prefill_ms": 1000 * statistics.median(prefill)}
    for context in (128, 1024):
        decoder = Decoder(session)
        logits = decoder.step(ids[None, :context])
        result[f"cache_bytes_per_token_{context}"] = decoder.cache_bytes() / context
        steps = []
        for _ in range(STEPS):
            start = time.perf_counter()
            logits = decoder.step(np.array([[int(np.argmax(logits))]]))
            steps.append(time.perf_counter() - start)
        result[f"decode_tps_{context}"] = 1 / statistics.median(steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def build(rotgraph: str, workdir: Path, reuse: bool) -> dict[str, Path]:
    source = workdir / "model.onnx"
    if not (reuse and source.is_file()):
        measured([rotgraph, "export", "-o", str(source), "--with-past"])
    paths = {}
    for name, how in MODELS.items():
        if how is None:
            paths[name] = source
            continue
        out = workdir / ("rotated.onnx" if how == "rotate" else f"{'_'.join(how).replace('-', '')}.onnx")
        if not (reuse and out.is_file()):
            if how == "rotate":
                measured([rotgraph, "rotate", str(source), "-o", str(out)])
            else:
                measured([rotgraph, "quantize", str(source), "-o", str(out), "--format", "ort", *how])
        paths[name] = out
        print(f"built {name}", file=sys.stderr)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="rotgraph-demo/bench/decode")
    ap.add_argument("--reuse", action="store_true", help="keep models already built in the workdir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure_one(Path(args.measure), args.threads)))
        return
    import onnxruntime

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    paths = build(rotgraph, workdir, args.reuse)
    bandwidth = memory_bandwidth_gbs(args.threads)
    rows = []
    for name, path in paths.items():
        cmd = [sys.executable, __file__, "--measure", str(path), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"measuring {name} failed:\n{done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r["weights_mb"] = weight_bytes_per_token(path) / 1e6
        r["bound_tps"] = bandwidth * 1e3 / r["weights_mb"]
        r["size_mb"] = size_mb(path)
        rows.append((name, r))
        print(f"measured {name}", file=sys.stderr)
    base = rows[0][1]
    print(
        f"\n### KV-cache decoding (onnxruntime {onnxruntime.__version__} CPU, {args.threads} threads, "
        f"ORT_ENABLE_ALL; QuaRot + RTN weights in groups of 32, onnxruntime format)\n"
    )
    print(f"Measured read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads, max over a 1 GiB array).\n")
    print(
        "| model | prefill 512 ms | decode tok/s @128 | decode tok/s @1024 | x float @1024 | weights read/token MB "
        "| bandwidth bound tok/s | % of bound @128 | KV bytes/token | KV vs float | size MB | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        kv = r["cache_bytes_per_token_1024"]
        print(
            f"| {name} | {r['prefill_ms']:.0f} | {r['decode_tps_128']:.1f} | {r['decode_tps_1024']:.1f} | "
            f"{r['decode_tps_1024'] / base['decode_tps_1024']:.2f}x | {r['weights_mb']:.0f} | {r['bound_tps']:.0f} | "
            f"{100 * r['decode_tps_128'] / r['bound_tps']:.0f}% | {kv:.0f} | "
            f"{100 * kv / base['cache_bytes_per_token_1024']:.0f}% | {r['size_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
