"""Streaming on a model bigger than the pipeline should ever hold twice: peak RSS and time of `rotate`
and `quantize` on a synthetic Llama with over 8 GB of float32 weights, and the projection to 70B.

    python benchmarks/big_model.py [--workdir /tmp/rotgraph-big] [--layers 10] [--keep]

Builds a random-weight Llama (hidden 4096, intermediate 11008, 32 query / 8 KV heads, vocab 32000,
untied, random norm weights; 10 layers = 8.1 GB) with transformers and exports it with rotgraph's
exporter (weights as external data). Then, each in its own child process: `rotgraph rotate
--no-validate`, `rotgraph quantize --rotation none --scheme w4a16 --no-validate` (RTN, int4 MatMulNBits) on the rotated
model, and a check that the rotated model (> 2 GB, external data) reloads (onnx.checker on the path,
onnxruntime) and computes the original logits: both run in onnxruntime one after the other on the same
tokens. Peak memory is compared with the largest single weight; the 70B projection scales time by
FLOPs of the dense R1 rotation (params x hidden) and memory by the largest weight. Prints tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import measured, size_mb

CONFIG = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
# Llama-3-70B: hidden 8192, intermediate 28672, 80 layers, vocab 128256, untied
LLAMA_70B = {"params": 70.6e9, "hidden": 8192, "largest_weight_bytes": 128256 * 8192 * 4}


def build(path: Path, layers: int) -> float:
    """Random-weight Llama exported to `path`; returns seconds. Peak RSS is about twice the weights (the
    exporter folds the Linear transposes into new arrays), which is the builder's cost, not rotgraph's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rotgraph import io
    from rotgraph.constants import CONFIG_KEY
    from rotgraph.export import to_onnx
    from rotgraph.testing import make_tokenizer

    start = time.perf_counter()
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, **CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.2, 2.0)
    onnx_model = to_onnx(model)
    del model
    gc.collect()
    meta = {"model_type": "llama", "num_hidden_layers": layers, **CONFIG, "head_dim": 128}
    onnx_model.metadata_props[CONFIG_KEY] = json.dumps(meta | {"eos_token_id": 2, "bos_token_id": 1})
    with io.staged_output(path) as staged:
        io.save_model(onnx_model, staged)
        make_tokenizer(staged.parent, 512)
    return time.perf_counter() - start


def weight_stats(path: Path) -> tuple[int, int, int]:
    """(total bytes, largest initializer bytes, parameter count) without loading the data."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    sizes = [int(np.prod(t.dims)) for t in proto.graph.initializer]
    return 4 * sum(sizes), 4 * max(sizes), sum(sizes)


def check_reload(original: Path, rotated: Path) -> float:
    """Max |logit difference| between the original and the rotated model in onnxruntime (one session
    at a time); raises if the rotated model does not reload."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(rotated))  # the path form: models over 2 GB
    tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], size=(1, 16), dtype=np.int64)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    logits = []
    for path in (original, rotated):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        logits.append(session.run(None, {"input_ids": tokens})[0])
        del session
        gc.collect()
    return float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rotgraph-big"))
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the models (about 22 GB) afterwards")
    parser.add_argument("--check-reload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir
    model, rotated, quantized = work / "model" / "model.onnx", work / "rotated.onnx", work / "w4a16.onnx"
    if args.build:
        build(model, args.layers)
        return
    if args.check_reload:
        print(json.dumps({"relative_max_logit_difference": check_reload(model, rotated)}))
        return

    rotgraph = [str(Path(sys.executable).parent / "rotgraph")]
    rows = []
    if not model.exists():
        built = measured([sys.executable, __file__, "--workdir", str(work), "--layers", str(args.layers), "--build"])
        rows.append(("build + export (transformers, torch exporter; not rotgraph's cost)", built["seconds"], None))
    total, largest, params = weight_stats(model)
    print(
        f"model: {args.layers} layers, {params / 1e9:.2f} B parameters, {total / 1e9:.2f} GB of float32 weights "
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
        (scale_params * LLAMA_70B["hidden"] / CONFIG["hidden_size"], rows[-3][2] * scale_mem),  # dense R1 products
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


if __name__ == "__main__":
    main()
