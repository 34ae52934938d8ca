"""`--ray` on a real-width cut: the same command in one process, and on a local Ray runtime of 1 and of 2
worker processes, interleaved round by round; the bytes the tasks moved; a projection to Llama-3-70B on a
cluster.

    python benchmarks/ray_scaling.py [--preset llama-3.1-8b] [--layers 1] [--windows 8] [--rounds 1]
                                     [--steps rotate,int4] [--workdir /work/rotgraph-ray]

Writes a random-weight decoder of `--layers` blocks at the preset's widths with `rotgraph.synthetic` (kept
in the workdir and reused), then per round and step runs, each in its own child process:

- rotate: `rotgraph rotate --no-validate`;
- int4: `rotgraph quantize --recipe int4 --set calibration.windows=W --no-validate` (QuaRot + GPTQ, ort);

without `--ray`, with `--ray 1` and with `--ray 2` (local runtimes of 1 and 2 worker processes) (each Ray worker computes on one
thread; the run without Ray uses every core through numpy's threads and onnxruntime's). Tables go to
stdout: wall times, the 2-worker speed-up over 1 worker, and the "Ray:" line each Ray run logs (tasks,
bytes through the object store, bytes as files).

The projection splits each Ray run's time into a part the driver does alone (calibration, Hessian
factors, the save) and task work that the workers share: with T(w) = D + W / w, the 1- and 2-worker times
give W = 2 (T1 - T2) and D = T1 - W. A 70B run on N machines of C cores is then D x r_D + W x r_W / (N C)
per block-sized unit, r the 70B/cut ratios of each part's arithmetic (`big_model.py`'s), 80 units,
plus the task files' bytes scaled by parameters over the shared file system's bandwidth (an assumption,
printed). The cut's fixed costs (embedding, head, loading) count as per block: the projection is high.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

from _common import measured
from big_model import block_params, gptq_work, rotation_work

from rotgraph.synthetic import PRESETS

VARIANTS = (
    ("one process", []),
    ("Ray, 1 worker", ["--ray", "1"]),
    ("Ray, 2 workers", ["--ray", "2"]),
)
SHARED_FS_BYTES_PER_S = 1e9  # the projection's assumed shared file system bandwidth per cluster


def ray_line(stderr: str) -> tuple[int, float, float, float, float] | None:
    """(tasks, MB of payloads, MB of driver arrays, MB read by tasks, MB written by tasks) of a Ray run."""
    found = re.search(
        r"Ray: (\d+) tasks; ([\d.]+) MB of payloads .*?: ([\d.]+) MB of arrays .*?, ([\d.]+) MB of weights read "
        r"and ([\d.]+) MB of results",
        stderr,
    )
    if found is None:
        return None
    return int(found[1]), float(found[2]), float(found[3]), float(found[4]), float(found[5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", default="rotate,int4")
    parser.add_argument("--workdir", default="/work/rotgraph-ray")
    args = parser.parse_args()
    work = Path(args.workdir)
    model = work / "model" / "model.onnx"
    if not model.exists():
        r = measured(
            [
                sys.executable,
                "-m",
                "rotgraph.synthetic",
                "--preset",
                args.preset,
                "--layers",
                str(args.layers),
                "--dtype",
                "float16",
                "-o",
                str(model.parent),
                "-q",
            ]
        )
        print(f"wrote the {args.layers}-layer {args.preset} cut in {r['seconds']:.0f} s", flush=True)
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    commands = {
        "rotate": [rotgraph, "rotate", str(model), "--no-validate", "-o", str(work / "out" / "r.onnx")],
        "int4": [
            rotgraph,
            "quantize",
            str(model),
            "--recipe",
            "int4",
            "--set",
            f"calibration.windows={args.windows}",
            "--no-validate",
            "-o",
            str(work / "out" / "q.onnx"),
        ],
    }
    steps = args.steps.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    moved: dict[tuple[str, str], tuple[int, float, float, float, float] | None] = {}
    for r in range(args.rounds):
        for step in steps:
            for name, flags in VARIANTS:
                shutil.rmtree(work / "out", ignore_errors=True)
                result = measured([*commands[step], *flags])
                times.setdefault((step, name), []).append(result["seconds"])
                moved[step, name] = ray_line(result["err"])
                print(f"  round {r + 1}, {step}, {name}: {result['seconds']:.1f} s", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)

    print(f"\n{args.preset} widths, {args.layers} layer(s), float16; {args.rounds} round(s), median seconds\n")
    print("| step | one process (s) | Ray, 1 worker (s) | Ray, 2 workers (s) | 2 workers / 1 worker speed-up |")
    print("|---|---|---|---|---|")
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for step in steps:
        t = [med[step, name] for name, _ in VARIANTS]
        print(f"| {step} | {t[0]:.1f} | {t[1]:.1f} | {t[2]:.1f} | {t[1] / t[2]:.2f}x |")
    print(
        "\n| step, workers | tasks | payloads via the object store (MB) | driver arrays as files (MB) | read by tasks (MB) | written by tasks (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for step in steps:
        for name, _ in VARIANTS[1:]:
            m = moved[step, name]
            if m is not None:
                print(f"| {step}, {name} | {m[0]} | {m[1]:.2f} | {m[2]:.0f} | {m[3]:.0f} | {m[4]:.0f} |")

    big = PRESETS["llama-3-70b"]
    cut = PRESETS[args.preset]
    params = block_params(big) / block_params(cut)
    tokens = args.windows * 512
    ratios = {  # 70B at 32 x 512 calibration tokens, as big_model.py
        "rotate": rotation_work(big) / rotation_work(cut),
        "int4": gptq_work(big, 32 * 512) / gptq_work(cut, tokens),
    }
    print(
        "\nLlama-3-70B (80 blocks) on N machines of C cores, from T(w) = D + W / w per cut of "
        f"{args.layers} block(s); data at {SHARED_FS_BYTES_PER_S / 1e9:.0f} GB/s shared:\n"
    )
    print("| step | D (s) | W (s) | 70B work ratio | 1 x 2 cores (h) | 4 x 16 (h) | 16 x 32 (h) |")
    print("|---|---|---|---|---|---|---|")
    for step in steps:
        t1, t2 = med[step, VARIANTS[1][0]], med[step, VARIANTS[2][0]]
        w = 2 * (t1 - t2)
        d = t1 - w
        m = moved[step, VARIANTS[2][0]]
        data = 0.0 if m is None else (m[2] + m[3] + m[4]) * 1e6 * params / SHARED_FS_BYTES_PER_S
        ratio = ratios[step]
        units = 80 / args.layers
        hours = [units * (d * ratio + w * ratio / cores + data) / 3600 for cores in (2, 64, 512)]
        print(f"| {step} | {d:.1f} | {w:.1f} | {ratio:.1f} | {hours[0]:.1f} | {hours[1]:.1f} | {hours[2]:.1f} |")
    print(
        "\nD x ratio stays on the driver whatever the cluster (calibration, factors, the save): it bounds the speed-up."
    )


if __name__ == "__main__":
    main()
