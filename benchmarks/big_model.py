"""A real-width model on this machine: time and peak RSS of each rotgraph step against the time to copy
the model's weights file, per-block costs, and a projection to Llama-3-70B.

    python benchmarks/big_model.py [--preset llama-3.1-8b] [--layers 32] [--dtype float16]
                                   [--windows 8] [--steps copy,rotate,int4,genai] [--base-layers 2]
                                   [--workdir /work/rotgraph-big] [--keep] [--cold]

Writes a random-weight decoder with `rotgraph.synthetic` (no torch; the graph `rotgraph export
--with-past` writes, trained-like weights, external data, written weight by weight), then runs each step
in its own child process (wall time, peak RSS from `ru_maxrss`):

- copy: `cp` of the weights file on the same disk, then `sync` (the yardstick of the rotate target);
- rotate: `rotgraph rotate --no-validate`, then `sync` (the rotation alone, against the copy);
- int4: `rotgraph quantize --recipe int4 --set calibration.windows=W` (QuaRot + GPTQ, w4a8, ort format),
  validated against the float model (streamed block by block above `ROTGRAPH_BLOCKWISE_BYTES`);
- genai: the same with `--format genai` (an onnxruntime-genai folder), validated.

The same steps run first on a model of `--base-layers` blocks (same widths); the difference between
the two runs divided by the difference in depth is the cost of one block, the rest the fixed cost (the
embedding, the head, loading). Llama-3-70B is projected from them: per-block time scaled by the ratio of
each step's arithmetic per block (rotation: parameters x the transform's multiply-adds per value; GPTQ: rows x cols^2
per projection plus cols^3 per distinct input, and the calibration forward pass), the fixed time by the
vocabulary x hidden ratio; the arithmetic is printed. `quantize` logs its median block's time in three
parts; the projection is made again part by part, each part scaled by its own arithmetic. Tables go to
stdout.

With `--cold` (Linux, root) the page cache is dropped before each step, so the copy and the steps read the
model from the disk, as a model larger than the memory is read; without it a model just written is read
from the page cache, and the copy is then a memory copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from _common import measured, size_mb

from rotgraph.calibrate import CHECK_WINDOWS
from rotgraph.hadamard import hadamard_factors
from rotgraph.synthetic import PRESETS, SyntheticConfig, parameter_count

STEPS = ("copy", "rotate", "int4", "genai")


@dataclass(frozen=True)
class Step:
    name: str
    seconds: float
    peak_gb: float
    block_parts: tuple[float, float, float] | None = None  # the median block's parts as `quantize` logged them


def block_params(c: SyntheticConfig) -> int:
    kv = c.kv_heads * c.head_dim
    return c.hidden * (c.heads * c.head_dim + 2 * kv) + c.heads * c.head_dim * c.hidden + 3 * c.hidden * c.intermediate


def transform_cost(n: int) -> int:
    """Multiply-adds per value of rotgraph's Hadamard transform of order n: its two Kronecker factors' orders."""
    f = hadamard_factors(n)
    assert f is not None, n
    f1, f2 = f.kronecker_pair
    return len(f1) + len(f2)


def rotation_work(c: SyntheticConfig) -> float:
    """Per block: every weight is rotated on its hidden side (`transform_cost(hidden)` per value), down_proj
    also on its intermediate side (R4's fold)."""
    return block_params(c) * transform_cost(c.hidden) + c.hidden * c.intermediate * transform_cost(c.intermediate)


def gptq_parts(c: SyntheticConfig, tokens: int) -> tuple[float, float, float]:
    """Per block, in the three parts `quantize` logs ("time per block"): the calibration run and Hessians
    (the block's forward pass over the tokens, 2 x parameters, and the lower triangle of X^T X of each
    input), the factors and quantization (one Cholesky factorization per distinct input, cols^3 / 3;
    GPTQ's products, rows x cols^2 per projection), and the check (a forward pass
    over `CHECK_WINDOWS` windows, whatever the calibration tokens)."""
    q, kv, h, i = c.heads * c.head_dim, c.kv_heads * c.head_dim, c.hidden, c.intermediate
    projections = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (rows, cols)
    updates = sum(r * k * k for r, k in projections)
    factors = (h**3 + q**3 + h**3 + i**3) / 3
    hessians = tokens * (h * h + q * q + h * h + i * i) / 2  # the lower triangles
    return (
        2 * tokens * block_params(c) + hessians,
        factors + updates,
        2 * CHECK_WINDOWS * 512 * block_params(c),
    )


def gptq_work(c: SyntheticConfig, tokens: int) -> float:
    return sum(gptq_parts(c, tokens))


def logged_block_seconds(stderr: str) -> tuple[float, float, float] | None:
    """The median block's three parts from `quantize`'s "time per block" line, if it printed one."""
    found = re.search(r"time per block .*?: [\d.]+ s: [^\d]*([\d.]+) s, [^\d]*([\d.]+) s, [^\d]*([\d.]+) s", stderr)
    return None if found is None else (float(found[1]), float(found[2]), float(found[3]))


def drop_page_cache() -> None:
    """Write dirty pages and drop the clean ones (Linux, root): the next step reads the model from the disk,
    as a model that does not fit in memory is read."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs root on Linux (it writes /proc/sys/vm/drop_caches): {e}") from None


def run_steps(
    work: Path, config_flags: list[str], layers: int, dtype: str, windows: int, steps: list[str], cold: bool
) -> dict:
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    model = work / "model" / "model.onnx"
    results: dict[str, Step] = {}
    if not model.exists():
        build = [sys.executable, "-m", "rotgraph.synthetic", *config_flags, "--layers", str(layers), "--dtype", dtype]
        r = measured([*build, "-o", str(model.parent), "-q"])
        results["write"] = Step("write the model (rotgraph.synthetic)", r["seconds"], r["peak_rss_mb"] / 1e3)
    quantize = [rotgraph, "quantize", str(model), "--recipe", "int4", "--set", f"calibration.windows={windows}"]
    commands = {
        "copy": ("cp of the weights file, then sync", ["sh", "-c", f'cp "{model}.data" "{work}/copy.data" && sync']),
        "rotate": (
            "rotgraph rotate --no-validate, then sync",
            ["sh", "-c", f'"{rotgraph}" rotate "{model}" -o "{work}/r.onnx" --no-validate && sync'],
        ),
        "int4": ("rotgraph quantize --recipe int4 (ort), validated", [*quantize, "-o", str(work / "int4.onnx")]),
        "genai": ("the same, --format genai", [*quantize, "--format", "genai", "-o", str(work / "genai")]),
    }
    for key in steps:
        name, cmd = commands[key]
        if cold:
            drop_page_cache()
        r = measured(cmd)
        results[key] = Step(name, r["seconds"], r["peak_rss_mb"] / 1e3, logged_block_seconds(r["err"]))
        print(f"  {layers} layers, {name}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb'] / 1e3:.2f} GB", flush=True)
        for leftover in (
            work / "copy.data",
            work / "r.onnx",
            work / "r.onnx.data",
            work / "int4.onnx",
            work / "int4.onnx.data",
        ):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(work / "genai", ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--base-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows (512 tokens each)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/work/rotgraph-big"))
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before each step (Linux, root): read from the disk"
    )
    args = parser.parse_args()
    steps = [s for s in args.steps.split(",") if s]
    if unknown := set(steps) - set(STEPS):
        parser.error(f"unknown steps {sorted(unknown)} (of {', '.join(STEPS)})")
    config = PRESETS[args.preset]
    flags = ["--preset", args.preset]

    runs = {}
    for layers in (args.base_layers, args.layers):
        work = args.workdir / f"{args.preset}-{layers}"
        work.mkdir(parents=True, exist_ok=True)
        runs[layers] = run_steps(work, flags, layers, args.dtype, args.windows, steps, args.cold)
        model = work / "model" / "model.onnx"
        full = dataclasses.replace(config, layers=layers)
        print(
            f"\n{args.preset}, {layers} layers: {parameter_count(full) / 1e9:.2f} B parameters, "
            f"{size_mb(model) / 1e3:.2f} GB of {args.dtype} weights on disk\n"
        )
        print("| step | time (s) | peak RSS (GB) | time / copy |")
        print("|---|---|---|---|")
        copy = runs[layers].get("copy")
        for step in runs[layers].values():
            ratio = f"{step.seconds / copy.seconds:.1f}x" if copy is not None and step is not copy else "-"
            print(f"| {step.name} | {step.seconds:.0f} | {step.peak_gb:.2f} | {ratio} |")
        if not args.keep:
            shutil.rmtree(work)
        print(flush=True)

    small, big = runs[args.base_layers], runs[args.layers]
    depth = args.layers - args.base_layers
    target = PRESETS["llama-3-70b"]
    tokens = args.windows * 512
    scale = {
        "rotate": rotation_work(target) / rotation_work(config),
        "int4": gptq_work(target, 32 * 512) / gptq_work(config, tokens),  # 70B at 32 x 512 calibration tokens
    }
    fixed_scale = target.vocab * target.hidden / (config.vocab * config.hidden)
    print(
        f"Per block and fixed costs ({args.layers} vs {args.base_layers} layers), projected to Llama-3-70B "
        f"({target.layers} layers):\n"
    )
    print("| step | per block (s) | fixed (s) | work ratio per block, 70B | 70B projected (h) |")
    print("|---|---|---|---|---|")
    for key in ("rotate", "int4", "genai"):
        if key not in big:
            continue
        per_block = (big[key].seconds - small[key].seconds) / depth
        fixed = big[key].seconds - per_block * args.layers
        ratio = scale["int4" if key == "genai" else key]
        hours = (per_block * ratio * target.layers + max(fixed, 0.0) * fixed_scale) / 3600
        print(f"| {big[key].name} | {per_block:.1f} | {fixed:.0f} | {ratio:.2f} | {hours:.1f} |")
    print(
        f"\n70B = per block x work ratio x {target.layers} + fixed x {fixed_scale:.2f} (vocabulary x hidden); work per "
        f"block: rotation {rotation_work(config):.3g} -> {rotation_work(target):.3g}, GPTQ at {tokens} -> 16384 "
        f"tokens {gptq_work(config, tokens):.3g} -> {gptq_work(target, 32 * 512):.3g}."
    )
    parts_table(big, args.layers, small, args.base_layers, config, target, tokens, fixed_scale)


def parts_table(
    big: dict[str, Step],
    layers: int,
    small: dict[str, Step],
    base_layers: int,
    config: SyntheticConfig,
    target: SyntheticConfig,
    tokens: int,
    fixed_scale: float,
) -> None:
    """The 70B projection again from the parts of the median block that `quantize` logged (deeper run), each
    scaled by its own arithmetic: the factorizations grow with width cubed, the Hessians with the tokens.
    The rest of the per-block time (from the two depths: rotating and writing the block, validation's
    forward passes) is scaled by the rotation's ratio, the largest of those parts'."""
    names = (
        "calibration run and Hessians",
        "factors and quantization",
        "the check",
        "the rest of the block's time (rotation, writing, validation)",
    )
    ratios = [
        *(t / c for t, c in zip(gptq_parts(target, 32 * 512), gptq_parts(config, tokens), strict=True)),
        rotation_work(target) / rotation_work(config),
    ]
    for key in ("int4", "genai"):
        step = big.get(key)
        if step is None or step.block_parts is None or key not in small:
            continue
        per_block = (step.seconds - small[key].seconds) / (layers - base_layers)
        fixed = max(step.seconds - per_block * layers, 0.0)
        print(f"\n{step.name}: the median block's parts as logged ({layers} layers), projected part by part:\n")
        print("| part | per block (s) | work ratio, 70B | 70B per block (s) |")
        print("|---|---|---|---|")
        parts = [*step.block_parts, max(per_block - sum(step.block_parts), 0.0)]
        projected = [p * r for p, r in zip(parts, ratios, strict=True)]
        for name, part, ratio, p in zip(names, parts, ratios, projected, strict=True):
            print(f"| {name} | {part:.1f} | {ratio:.2f} | {p:.0f} |")
        hours = (sum(projected) * target.layers + fixed * fixed_scale) / 3600
        print(
            f"| total | {sum(parts):.1f} | | {sum(projected):.0f} |\n\n70B = {sum(projected):.0f} s x "
            f"{target.layers} + fixed {fixed:.0f} s x {fixed_scale:.2f} = {hours:.1f} h"
        )


if __name__ == "__main__":
    main()
