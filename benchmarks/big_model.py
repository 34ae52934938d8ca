"""Streaming on a model bigger than the pipeline should ever hold twice: peak RSS and time of `rotate`
and `quantize` on a synthetic Llama with over 8 GB of float32 weights, and the projection to 70B.

    python benchmarks/big_model.py [--workdir /tmp/rotgraph-big] [--layers 10] [--preset NAME]
                                   [--dtype float32|float16] [--keep]

Writes a random-weight Llama with `rotgraph.synthetic` (no torch: the graph of `rotgraph export
--with-past`, trained-like weights drawn while they are written, weights as external data). By default
hidden 4096, intermediate 11008, 32 query / 8 KV heads, vocab 32000, untied (10 layers = 8.1 GB);
`--preset llama-3.1-8b` (or qwen2.5-7b, llama-3-70b) takes a real model's widths. Then, each in its own
child process: `rotgraph rotate --no-validate`, `rotgraph quantize --rotation none --scheme w4a16
--no-validate` (RTN, int4 MatMulNBits) on the rotated model, and a check that the rotated model (> 2 GB,
external data) reloads (onnx.checker on the path, onnxruntime) and computes the original logits: both run
in onnxruntime one after the other on the same tokens. Peak memory is compared with the largest single
weight; the 70B projection scales time by FLOPs of the dense R1 rotation (params x hidden) and memory by
the largest weight. Prints tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from _common import measured, size_mb

from rotgraph.synthetic import PRESETS, SyntheticConfig, parameter_count

# The widths of the runs since 2026-11-23 (a Llama-2-7B-like model with GQA).
CONFIG = SyntheticConfig(
    hidden=4096, intermediate=11008, layers=10, heads=32, kv_heads=8, head_dim=128, vocab=32000, max_positions=4096
)
_70B = PRESETS["llama-3-70b"]
LLAMA_70B = {
    "params": parameter_count(_70B),
    "hidden": _70B.hidden,
    "largest_weight_bytes": _70B.vocab * _70B.hidden * 4,
}


def weight_stats(path: Path) -> tuple[int, int, int]:
    """(total bytes, largest initializer bytes, parameter count) without loading the data."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    proto = onnx.load(path, load_external_data=False)
    sizes = [(math.prod(t.dims), tensor_dtype_to_np_dtype(t.data_type).itemsize) for t in proto.graph.initializer]
    return sum(n * b for n, b in sizes), max(n * b for n, b in sizes), sum(n for n, _ in sizes)


def check_reload(original: Path, rotated: Path) -> float:
    """Max |logit difference| between the original and the rotated model in onnxruntime (one session
    at a time); raises if the rotated model does not reload."""
    import onnx
    import onnxruntime as ort

    from rotgraph.evaluate import empty_cache

    onnx.checker.check_model(str(rotated))  # the path form: models over 2 GB
    tokens = np.random.default_rng(0).integers(0, 512, size=(1, 16), dtype=np.int64)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    logits = []
    for path in (original, rotated):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits.append(session.run(None, {"input_ids": tokens} | empty_cache(session, 1))[0].astype(np.float32))
        del session
        gc.collect()
    return float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rotgraph-big"))
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--preset", choices=list(PRESETS), help="a real model's widths (default: see above)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--keep", action="store_true", help="keep the models (about 22 GB) afterwards")
    parser.add_argument("--check-reload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir
    model, rotated, quantized = work / "model" / "model.onnx", work / "rotated.onnx", work / "w4a16.onnx"
    if args.check_reload:
        print(json.dumps({"relative_max_logit_difference": check_reload(model, rotated)}))
        return

    rotgraph = [str(Path(sys.executable).parent / "rotgraph")]
    rows = []
    widths = (
        ["--preset", args.preset] if args.preset else [f"--{k.replace('_', '-')}={v}" for k, v in _widths().items()]
    )
    if not model.exists():
        build = [sys.executable, "-m", "rotgraph.synthetic", *widths, "--layers", str(args.layers)]
        built = measured([*build, "--dtype", args.dtype, "-o", str(model.parent), "-q"])
        rows.append(("write the model (rotgraph.synthetic)", built["seconds"], built["peak_rss_mb"]))
    total, largest, params = weight_stats(model)
    hidden = PRESETS[args.preset].hidden if args.preset else CONFIG.hidden
    print(
        f"model: {args.layers} layers, {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB of {args.dtype} weights "
        f"({size_mb(model) / 1e3:.2f} GB on disk), largest weight {largest / 1e6:.0f} MB\n"
    )

    for out in (rotated, quantized):
        for f in out.parent.glob(out.name + "*"):
            f.unlink()
    steps = [
        (
            "rotate (R1, R2, R3/R4 online), --no-validate",
            [*rotgraph, "rotate", str(model), "-o", str(rotated), "--no-validate", "--seed", "0"],
        ),
        (
            "quantize w4a16 RTN, ort format (of the rotated model), --no-validate",
            [
                *rotgraph,
                "quantize",
                str(rotated),
                "-o",
                str(quantized),
                "--scheme",
                "w4a16",
                "--rotation",
                "none",
                "--weights",
                "rtn",  # the synthetic model has a tokenizer.json: GPTQ would be the default
                "--set",
                "weights.shared_head=false",  # its `auto` (true at 4 bits) refuses an untied lm_head
                "--format",
                "ort",
                "--no-validate",
            ],
        ),
    ]
    for name, cmd in steps:
        result = measured(cmd)
        rows.append((name, result["seconds"], result["peak_rss_mb"]))
    check = measured([sys.executable, __file__, "--workdir", str(work), "--check-reload"])
    difference = json.loads(check["out"])["relative_max_logit_difference"]
    rows.append(("reload rotated + original in onnxruntime, compare logits", check["seconds"], check["peak_rss_mb"]))

    print("| step | time (s) | peak RSS (GB) | peak RSS / largest weight |")
    print("|---|---|---|---|")
    for name, seconds, rss in rows:
        ratio = f"{rss * 1e6 / largest:.1f}x" if rss is not None else "-"
        print(
            f"| {name} | {seconds:.0f} | {rss / 1e3:.2f} | {ratio} |"
            if rss is not None
            else f"| {name} | {seconds:.0f} | - | - |"
        )
    print(
        f"\nrotated model: {size_mb(rotated) / 1e3:.2f} GB, quantized: {size_mb(quantized) / 1e3:.2f} GB; "
        f"rotated vs original logits: max |difference| / max |logit| = {difference}"
    )

    scale_mem = LLAMA_70B["largest_weight_bytes"] / largest
    scale_params = LLAMA_70B["params"] / params
    projected = [  # (time scale, peak RSS in MB at 70B); memory scales with the largest weight for both
        (scale_params * LLAMA_70B["hidden"] / hidden, rows[-3][2] * scale_mem),  # dense R1 products
        (scale_params, rows[-2][2] * scale_mem),  # RTN: time with params (quantize spills its output)
    ]
    print("\nProjection to Llama-3-70B (rotate time x the params*hidden ratio, quantize time x the params ratio;")
    print("working memory x the largest-weight ratio (70B's largest weight is its 128256 x 8192 embedding,")
    print("4.2 GB)):\n")
    print("| step | projected time (h) | projected peak RSS (GB) |")
    print("|---|---|---|")
    for (name, seconds, _), (scale, rss) in zip(rows[-3:-1], projected, strict=True):
        print(f"| {name} | {seconds * scale / 3600:.1f} | {rss / 1e3:.0f} |")
    if not args.keep:
        shutil.rmtree(work)


def _widths() -> dict[str, object]:
    """The default model's fields as `rotgraph.synthetic` flags (without layers)."""
    keys = ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab")
    return {k: getattr(CONFIG, k) for k in keys}


if __name__ == "__main__":
    main()
