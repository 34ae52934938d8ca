"""Prefill and KV-cache decoding speed on onnxruntime, against the machine's memory-bandwidth bound.

    python benchmarks/decode.py [--workdir rotgraph-demo/bench/decode] [--reuse] [--threads 2] [--rounds 3]

Exports the default model with a KV cache (`rotgraph export --with-past`), rotates it, and quantizes it
with QuaRot + RTN in the onnxruntime format (int4 MatMulNBits weights; w4a8: int8 activations inside
MatMulNBits; float KV caches: onnxruntime's GroupQueryAttention, also for the float model as "w16a16"
without rotation, and once without it, "eager attention"; w4a4kv4: 4-bit activations as FakeQuant ops
and the KV cache stored as 4-bit codes, attention eager). Each model is then measured in its own child process: prefill of 512
tokens, decoding at contexts of 128 and 1024 tokens (tokens/s over 32 greedy steps after a prefill of
that length; the median step), KV-cache bytes per token, peak RSS. The bound for decoding is the bytes of weights read
per token (every initializer, but only one row of the embedding table) over the measured memory
bandwidth (an embedding table that lm_head also reads counts whole). Every model with rotgraph ops is
measured with rotgraph's compiled kernels (rotgraph/kernels) and without them (the ONNX function bodies).
The whole set is measured `--rounds` times, round-robin, and each cell is the median over rounds; the
spread column is (max - min) / median of decode tok/s at 1024 over the rounds. Prints markdown tables.
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

from rotgraph.constants import ROTGRAPH_DOMAIN

MODELS = {  # name -> rotgraph quantize arguments (None: the float export, "rotate": the float rotation)
    "float": None,
    "float, GroupQueryAttention": ["--scheme", "w16a16", "--rotation", "none"],
    "float + rotation (R1-R4)": "rotate",
    "w4a16": ["--scheme", "w4a16"],
    "w4a8": ["--scheme", "w4a8"],
    "w4a8, eager attention": ["--scheme", "w4a8", "--set", "output.fused_attention=false"],
    "w4a8, no R3/R4": ["--scheme", "w4a8", "--set", "rotation.online=false"],
    "w4a4kv4": ["--scheme", "w4a4kv4"],
    "w4a4kv4, no R3/R4": ["--scheme", "w4a4kv4", "--set", "rotation.online=false"],
}
# (model, the same without online Hadamards): w4a8 keeps its KV cache in float, so rotgraph inserts R4 only
OVERHEAD = {"R4 (w4a8)": ("w4a8", "w4a8, no R3/R4"), "R3 + R4 (w4a4kv4)": ("w4a4kv4", "w4a4kv4, no R3/R4")}
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


def has_rotgraph_ops(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(node.domain == ROTGRAPH_DOMAIN for node in proto.graph.node)


def measure_one(path: Path, threads: int, kernels: bool) -> dict:
    """Runs in a child process: prefill and decode timings, cache bytes per token, peak RSS."""
    from rotgraph.evaluate import make_session
    from rotgraph.generate import Decoder
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    ids = np.array(encode(path.parent / "tokenizer.json", load_text("evaluation"))[:2048])
    session = make_session(path, "all", threads, kernels=kernels)
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
    if kernels:
        result["hadamard_us_per_step"] = hadamard_time(path, threads, ids)
    return result


def hadamard_time(path: Path, threads: int, ids: np.ndarray) -> float:
    """Microseconds per decoding step (context 128) that onnxruntime's profiler attributes to the compiled
    Hadamard kernels: 16 steps after a prefill, in a separate profiling session."""
    import tempfile

    import onnxruntime as ort

    from rotgraph import kernels
    from rotgraph.evaluate import _LEVELS
    from rotgraph.generate import Decoder

    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS["all"]
    options.intra_op_num_threads = threads
    kernels.register(options, path, True)
    steps = 16
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "decode")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        decoder = Decoder(session)
        logits = decoder.step(ids[None, :128])
        for _ in range(steps):
            logits = decoder.step(np.array([[int(np.argmax(logits))]]))
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    prefill_end = runs[0][0] + runs[0][1]
    return (
        sum(
            e["dur"]
            for e in events
            if e.get("cat") == "Node"
            and e.get("args", {}).get("op_name") == "Hadamard"
            and e["name"].endswith("_kernel_time")
            and e["ts"] >= prefill_end
        )
        / steps
    )


def paired_steps(entries: list[tuple[str, str, bool]], threads: int, steps: int = 96) -> dict:
    """Runs in a child process: every (label, model, kernels) session decodes in turn, one step each per
    round (round-robin, so a slow moment of the machine hits all of them alike; the order rotates, since
    the session that runs after another one's step runs slower than the next); median step time in ms
    per session at contexts 128 and 1024. Idle threads do not spin here: ten sessions' spinning thread
    pools would fight over the two cores."""
    from rotgraph.evaluate import make_session
    from rotgraph.generate import Decoder
    from rotgraph.text import load_text
    from rotgraph.tokenize import encode

    first = Path(entries[0][1])
    ids = np.array(encode(first.parent / "tokenizer.json", load_text("evaluation"))[:2048])
    sessions = [
        make_session(Path(path), "all", threads, kernels=kernels, spinning=False) for _, path, kernels in entries
    ]
    result: dict = {}
    for context in (128, 1024):
        decoders = [Decoder(session) for session in sessions]
        tokens = [int(np.argmax(d.step(ids[None, :context]))) for d in decoders]
        times: list[list[float]] = [[] for _ in entries]
        for round_ in range(steps):
            for j in range(len(decoders)):  # the order rotates every round: each session runs in each place
                i = (round_ + j) % len(decoders)
                decoder = decoders[i]
                start = time.perf_counter()
                logits = decoder.step(np.array([[tokens[i]]]))
                times[i].append(time.perf_counter() - start)
                tokens[i] = int(np.argmax(logits))
        for (label, _, _), t in zip(entries, times, strict=True):
            result.setdefault(label, {})[context] = 1000 * statistics.median(t)
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


def measure(path: Path, threads: int, kernels: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(path), "--threads", str(threads)]
    done = subprocess.run([*cmd, "--kernels", "on" if kernels else "off"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {path} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="rotgraph-demo/bench/decode")
    ap.add_argument("--reuse", action="store_true", help="keep models already built in the workdir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="times the whole set is measured (median reported)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    ap.add_argument("--kernels", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    ap.add_argument("--paired", help=argparse.SUPPRESS)  # internal: JSON list of (label, model, kernels)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure_one(Path(args.measure), args.threads, args.kernels == "on")))
        return
    if args.paired:
        print(json.dumps(paired_steps(json.loads(args.paired), args.threads)))
        return
    import onnxruntime

    from rotgraph.kernels import library_path

    if library_path() is None:
        raise SystemExit("rotgraph's kernels are not built: bash scripts/build_kernels.sh")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    paths = build(rotgraph, workdir, args.reuse)
    bandwidth = memory_bandwidth_gbs(args.threads)
    runs: list[tuple[str, Path, bool | None]] = []  # (name, model, kernels); None: no rotgraph ops
    for name, path in paths.items():
        if has_rotgraph_ops(path):
            runs += [(name, path, True), (name, path, False)]
        else:
            runs.append((name, path, None))
    samples: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    for round_ in range(args.rounds):
        for i, (name, path, kernels) in enumerate(runs):
            samples[i].append(measure(path, args.threads, bool(kernels)))
            print(f"round {round_ + 1}/{args.rounds}: measured {name} (kernels {kernels})", file=sys.stderr)
    rows = []
    for i, (name, path, kernels) in enumerate(runs):
        r = {key: statistics.median(s[key] for s in samples[i]) for key in samples[i][0]}
        tps = [s["decode_tps_1024"] for s in samples[i]]
        r["spread_1024"] = (max(tps) - min(tps)) / statistics.median(tps)
        r["weights_mb"] = weight_bytes_per_token(path) / 1e6
        r["bound_tps"] = bandwidth * 1e3 / r["weights_mb"]
        r["size_mb"] = size_mb(path)
        rows.append((name, kernels, r))
    base = rows[0][2]
    print(
        f"\n### KV-cache decoding (onnxruntime {onnxruntime.__version__} CPU, {args.threads} threads, "
        f"ORT_ENABLE_ALL; QuaRot + RTN weights in groups of 32, onnxruntime format; median of {args.rounds} rounds)\n"
    )
    print(f"Measured read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads, max over a 1 GiB array).\n")
    print(
        "| model | rotgraph kernels | prefill 512 ms | decode tok/s @128 | decode tok/s @1024 | spread @1024 "
        "| x float @128 | x float @1024 | weights read/token MB | bandwidth bound tok/s | % of bound @128 "
        "| KV bytes/token | KV vs float | size MB | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kernels, r in rows:
        kv = r["cache_bytes_per_token_1024"]
        print(
            f"| {name} | {'-' if kernels is None else ('yes' if kernels else 'no')} | {r['prefill_ms']:.0f} | "
            f"{r['decode_tps_128']:.1f} | {r['decode_tps_1024']:.1f} | {100 * r['spread_1024']:.0f}% | "
            f"{r['decode_tps_128'] / base['decode_tps_128']:.2f}x | "
            f"{r['decode_tps_1024'] / base['decode_tps_1024']:.2f}x | {r['weights_mb']:.0f} | {r['bound_tps']:.0f} | "
            f"{100 * r['decode_tps_128'] / r['bound_tps']:.0f}% | {kv:.0f} | "
            f"{100 * kv / base['cache_bytes_per_token_1024']:.0f}% | {r['size_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    by = {(name, kernels): r for name, kernels, r in rows}
    print("\nOnline Hadamard overhead, share of decode latency (separate processes):\n")
    print("| Hadamards | rotgraph kernels | @128 | @1024 |")
    print("|---|---|---|---|")
    for what, (name, plain_name) in OVERHEAD.items():
        for kernels in (True, False):
            r = by[(name, kernels)]
            plain = by.get((plain_name, kernels)) or by[(plain_name, None)]
            cells = [1 - r[f"decode_tps_{c}"] / plain[f"decode_tps_{c}"] for c in (128, 1024)]
            print(f"| {what} | {'yes' if kernels else 'no'} | {100 * cells[0]:.1f}% | {100 * cells[1]:.1f}% |")

    entries = [
        (
            f"{name}{'' if kernels is None else (', kernels' if kernels else ', function bodies')}",
            str(path),
            bool(kernels),
        )
        for name, path, kernels in runs
    ]
    cmd = [sys.executable, __file__, "--paired", json.dumps(entries), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"paired measurement failed:\n{done.stderr[-2000:]}")
    paired = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        "\nPaired, in one process: every session decodes one step in turn (96 rounds after a prefill, the order rotating), "
        "median step time; ratios of one row to another are the reliable numbers here:\n"
    )
    print("| session | step ms @128 | step ms @1024 | x float tok/s @128 | x float tok/s @1024 |")
    print("|---|---|---|---|---|")
    float_ms = paired[entries[0][0]]
    for label, _, _ in entries:
        ms = paired[label]
        print(
            f"| {label} | {ms['128']:.2f} | {ms['1024']:.2f} | {float_ms['128'] / ms['128']:.2f}x | "
            f"{float_ms['1024'] / ms['1024']:.2f}x |"
        )
    print("\nOnline Hadamard overhead from the paired run: (model - model without R3/R4) / model step time:\n")
    print("| Hadamards | rotgraph kernels | @128 | @1024 |")
    print("|---|---|---|---|")
    by_run = {(name, kernels): paired[entries[i][0]] for i, (name, _, kernels) in enumerate(runs)}
    for what, (name, plain_name) in OVERHEAD.items():
        for kernels in (True, False):
            ms = by_run[(name, kernels)]
            plain_ms = by_run.get((plain_name, kernels)) or by_run[(plain_name, None)]
            cells = [100 * (ms[c] - plain_ms[c]) / ms[c] for c in ("128", "1024")]
            print(f"| {what} | {'yes' if kernels else 'no'} | {cells[0]:.1f}% | {cells[1]:.1f}% |")
    print("\nProfiled: time onnxruntime's profiler puts in the Hadamard kernels per decoding step at context 128:\n")
    print("| model | Hadamard us/step | share of the median step |")
    print("|---|---|---|")
    for name, kernels, r in rows:
        if kernels:
            share = r["hadamard_us_per_step"] * 1e-6 * r["decode_tps_128"]
            print(f"| {name} | {r['hadamard_us_per_step']:.0f} | {100 * share:.1f}% |")


if __name__ == "__main__":
    main()
