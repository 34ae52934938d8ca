"""Fast rotation (issue 28): the weight folds of R1 and R4 as dense products, as fast transforms on the
whole float64 weight, and as rotgraph evaluates them now (fast transforms over chunks).

    python benchmarks/fast_rotation.py [--workdir /tmp/fast-rotation] [--shapes 4096x4096 ...] [--no-dense-big]

Every weight is a float32 file in WORKDIR read through a memory-mapped `ir.ExternalTensor`, as the
pipeline reads external data. Each measurement runs in a child process: wall seconds of the fold (read,
float64, steps, cast back to float32) and the child's peak RSS. The methods:

- dense (before): the former evaluation with the former steps: the whole weight in float64, X @ Q or
  Q^T @ X with the dense n x n Q (R4 factored with transposes, as `online.py` had it), cast back;
- fast, whole: the same evaluation with the factored steps (`HadamardRotation`; not on the embedding,
  where the whole float64 weight and the transform's buffers would take about 17 GB);
- fast, chunked (now): `weights._Chain.evaluate`, chunks of at most CHUNK_BYTES.

Then the choice inside the transform: B (Sylvester, order p <= 1024) as log2(p) radix-2 butterfly
stages, as rotgraph does it (butterfly stages, the lowest 5 bits as one product with S_32 along a
contiguous last axis), or as one matrix product, in process, best of 3; and R2's per-head fold of O (head_dim 128) dense and factored.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rotgraph import hadamard
from rotgraph.hadamard import HadamardRotation, hadamard_factors, randomized_hadamard
from rotgraph.structure import rotate_head_rows
from rotgraph.weights import _Chain, multiply_left, multiply_right

HIDDEN = 4096
# (shape, fold): R1 on a writer (W Q), on a reader (Q^T W), and down_proj's R1 then R4 (H^T W Q)
CASES = {
    "4096x4096": ["W Q", "Q^T W"],
    "14336x4096": ["W Q", "H^T W Q"],
    "4096x14336": ["Q^T W"],
    "128256x4096": ["W Q"],
}


def weight_file(workdir: Path, shape: tuple[int, int]) -> Path:
    """A seeded float32 weight, written in row blocks (never whole in memory)."""
    path = workdir / f"w{shape[0]}x{shape[1]}.data"
    if not path.is_file() or path.stat().st_size != shape[0] * shape[1] * 4:
        rng = np.random.default_rng(shape[0])
        with open(path, "wb") as f:
            for start in range(0, shape[0], 8192):
                rows = min(8192, shape[0] - start)
                f.write(rng.standard_normal((rows, shape[1]), dtype=np.float32).tobytes())
    return path


def old_r4_step(w: np.ndarray, factors: hadamard.HadamardFactors) -> np.ndarray:
    """R4's fold as it was: H^T W = (W^T H)^T through two transposed copies."""
    return np.ascontiguousarray(factors.apply(np.ascontiguousarray(w.T)).T)


def steps_for(fold: str, shape: tuple[int, int], method: str) -> tuple:
    q = randomized_hadamard(HIDDEN, np.random.default_rng([0, 1]))
    assert q is not None
    r1 = q.matrix() if method == "dense" else q
    if fold == "W Q":
        return (functools.partial(multiply_right, m=r1),)
    if fold == "Q^T W":
        return (functools.partial(multiply_left, m=r1.T),)
    factors = hadamard_factors(shape[0])
    assert factors is not None
    r4 = (
        functools.partial(old_r4_step, factors=factors)
        if method == "dense"
        else functools.partial(multiply_left, m=HadamardRotation(factors).T)
    )
    return (functools.partial(multiply_right, m=r1), r4)


def one(path: Path, shape: tuple[int, int], fold: str, method: str) -> dict:
    """Run in the child: one fold of the weight at `path`; seconds and peak RSS."""
    tensor = ir.ExternalTensor(
        path.name, 0, shape[0] * shape[1] * 4, ir.DataType.FLOAT, shape=ir.Shape(shape), name="w", base_dir=path.parent
    )
    steps = steps_for(fold, shape, method)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if method == "chunked":
        out = _Chain(tensor, steps, "w").evaluate(np.float32)
    else:  # the former _Chain: the whole weight in float64, every step on it, one cast
        array = np.array(tensor.numpy(), dtype=np.float64)
        tensor.release()
        for step in steps:
            array = step(array)
        out = array.astype(np.float32)
        del array
    seconds = time.perf_counter() - t
    checksum = float(np.abs(out[:: max(1, shape[0] // 64)]).sum(dtype=np.float64))
    return {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before,
        "checksum": checksum,
    }


def in_child(path: Path, shape: tuple[int, int], fold: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--one", str(path), f"{shape[0]}x{shape[1]}", fold, method]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sylvester_matmul(x: np.ndarray, pre: int, p: int, post: int) -> np.ndarray:
    """B as one matrix product instead of the butterfly (the alternative measured)."""
    b = hadamard.hadamard(p)
    assert b is not None
    s = b.astype(np.float64)
    y = x.reshape(pre, p, post)
    return (y.reshape(pre, p) @ s).reshape(pre, p, 1) if post == 1 else np.matmul(s.T, y)


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def transform_choice() -> list[tuple[str, str, float, float, float]]:
    """B's part of X Q: radix-2 butterfly stages only; the same with the lowest 5 bits as one product with
    S_32 along a contiguous last axis (rotgraph's); B as one matrix product."""
    rows = []
    rng = np.random.default_rng(0)
    q = randomized_hadamard(HIDDEN, np.random.default_rng(0))
    assert q is not None
    for shape, axis, what in (
        ((4096, 4096), -1, "4096 x 4096, X Q (rows)"),
        ((4096, 4096), 0, "4096 x 4096, Q^T X (columns)"),
        ((14336, 4096), -1, "14336 x 4096, X Q (rows)"),
        ((4096, 14336), 0, "4096 x 14336, Q^T X (columns)"),
    ):
        x = rng.standard_normal(shape)
        order, original = hadamard.SYLVESTER_GEMM_ORDER, hadamard._sylvester_in_place
        try:
            hadamard.SYLVESTER_GEMM_ORDER = 1
            radix2 = best_of(lambda x=x, axis=axis: q.apply(x, axis))
            hadamard.SYLVESTER_GEMM_ORDER = order
            chosen = best_of(lambda x=x, axis=axis: q.apply(x, axis))
            hadamard._sylvester_in_place = sylvester_matmul  # type: ignore[assignment]
            matmul = best_of(lambda x=x, axis=axis: q.apply(x, axis))
        finally:
            hadamard.SYLVESTER_GEMM_ORDER, hadamard._sylvester_in_place = order, original
        rows.append((what, f"m={q.factors.m}, p={q.factors.p}", radix2, chosen, matmul))
    return rows


def r2_choice() -> tuple[float, float]:
    """O's rows per head (R2, head_dim 128) on a 4096 x 4096 weight: dense h^T per head vs factored."""
    w = np.random.default_rng(0).standard_normal((4096, 4096))
    h = randomized_hadamard(128, np.random.default_rng(1))
    assert h is not None
    dense = h.matrix()
    t_dense = best_of(lambda: rotate_head_rows(w, dense))
    t_fast = best_of(lambda: h.apply(w.reshape(-1, 128, 4096), axis=1).reshape(w.shape))  # h^T per head
    assert np.allclose(h.apply(w.reshape(-1, 128, 4096), axis=1).reshape(w.shape), rotate_head_rows(w, dense))
    return t_dense, t_fast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/fast-rotation")
    ap.add_argument("--shapes", nargs="+", default=list(CASES))
    ap.add_argument("--no-dense-big", action="store_true", help="skip the dense fold of 128256 x 4096")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        path, shape_s, fold, method = args.one
        shape = tuple(int(v) for v in shape_s.split("x"))
        print(json.dumps(one(Path(path), shape, fold, method)))  # type: ignore[arg-type]
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print("| weight (float32) | fold | method | seconds | peak RSS (MB) | RSS before the fold (MB) |")
    print("|---|---|---|---:|---:|---:|")
    for shape_s in args.shapes:
        shape = tuple(int(v) for v in shape_s.split("x"))
        path = weight_file(workdir, shape)  # type: ignore[arg-type]
        for fold in CASES[shape_s]:
            sums = []
            for method, label in (
                ("dense", "dense (before)"),
                ("fast", "fast, whole"),
                ("chunked", "fast, chunked (now)"),
            ):
                if shape[0] > 100_000 and (method == "fast" or (method == "dense" and args.no_dense_big)):
                    continue  # the whole embedding in float64 with the transform's buffers: about 17 GB
                r = in_child(path, shape, fold, method)  # type: ignore[arg-type]
                sums.append(r["checksum"])
                print(
                    f"| {shape[0]} x {shape[1]} | {fold} | {label} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} "
                    f"| {r['rss_before_mb']:.0f} |",
                    flush=True,
                )
            assert max(sums) - min(sums) <= 1e-5 * max(sums), sums  # the methods compute the same weight
    print()
    print(
        "| transform (float64) | factors | radix-2 butterfly (s) | butterfly, low 5 bits by S_32 (s) | B as one matmul (s) |"
    )
    print("|---|---|---:|---:|---:|")
    for what, factors, radix2, chosen, matmul in transform_choice():
        print(f"| {what} | {factors} | {radix2:.2f} | {chosen:.2f} | {matmul:.2f} |", flush=True)
    t_dense, t_fast = r2_choice()
    print()
    print("| R2 on O's rows, 4096 x 4096 float64, head_dim 128 | seconds |")
    print("|---|---:|")
    print(f"| dense h^T per head (`rotate_head_rows`) | {t_dense:.2f} |")
    print(f"| factored, butterfly per head | {t_fast:.2f} |")


if __name__ == "__main__":
    main()
