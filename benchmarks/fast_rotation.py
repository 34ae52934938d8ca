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

Then the choice inside the transform, H = kron(A, B) (B Sylvester, order p <= 1024), in process, best of
3: B as radix-2 butterfly stages (the lowest 5 bits as one product with S_32 along a contiguous last
axis) then A (the former transform), B as one matrix product then A, or H as two products with the
Kronecker factors of about sqrt(n) (rotgraph's, `HadamardFactors.kronecker_pair`); and R2's per-head fold of O (head_dim 128) dense and factored.
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


def butterfly(x: np.ndarray, pre: int, p: int, post: int) -> np.ndarray:
    """v -> v @ S_p along the middle axis of x as [pre, p, post] (the former transform, kept here to measure
    it): radix-2 stages of adds and subtracts, one memory pass per bit; along a contiguous last axis the
    lowest 5 bits as one product with S_32."""
    y = x.reshape(pre, p, post)
    low = min(p, 32) if post == 1 else 1
    if low > 1:
        y = (y.reshape(-1, low) @ sylvester(low)).reshape(pre, p, post)
    out = np.empty_like(y)
    h = p // 2
    while h >= low:
        src, dst = y.reshape(pre, p // (2 * h), 2, h, post), out.reshape(pre, p // (2 * h), 2, h, post)
        np.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        np.subtract(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, out = out, y
        h //= 2
    return y


def sylvester(p: int) -> np.ndarray:
    b = hadamard.hadamard(p)
    assert b is not None
    return b.astype(np.float64)


def h_former(x: np.ndarray, f: hadamard.HadamardFactors, pre: int, post: int) -> np.ndarray:
    """v -> v @ kron(A, B): B by `butterfly`, then one product with A."""
    y = butterfly(np.array(x), pre * f.m, f.p, post).reshape(pre, f.m, f.p * post)
    return np.matmul(f.a.T.astype(np.float64), y).reshape(pre, f.n, post)


def h_matmul(x: np.ndarray, f: hadamard.HadamardFactors, pre: int, post: int) -> np.ndarray:
    """v -> v @ kron(A, B): B as one p x p product, then one product with A."""
    s, y = sylvester(f.p), x.reshape(pre * f.m, f.p, post)
    y = (y.reshape(-1, f.p) @ s) if post == 1 else np.matmul(s.T, y)
    return np.matmul(f.a.T.astype(np.float64), y.reshape(pre, f.m, f.p * post)).reshape(pre, f.n, post)


def h_now(x: np.ndarray, f: hadamard.HadamardFactors, pre: int, post: int) -> np.ndarray:
    """v -> v @ kron(F1, F2), rotgraph's transform (`HadamardFactors.kronecker_pair`)."""
    f1, f2 = f.kronecker_pair
    return hadamard._kron_apply(x, f1, f2, pre, post)


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def transform_choice() -> list[tuple[str, str, float, float, float]]:
    """v -> v @ H (H = kron(A, B), float64, no permutation or signs) by the former butterfly, by B as one
    matrix product, and by rotgraph's two Kronecker products; the three agree (checked)."""
    rows = []
    rng = np.random.default_rng(0)
    f = hadamard_factors(HIDDEN)
    assert f is not None
    for shape, axis, what in (
        ((4096, 4096), -1, "4096 x 4096, X H (rows)"),
        ((4096, 4096), 0, "4096 x 4096, H^T X (columns)"),
        ((14336, 4096), -1, "14336 x 4096, X H (rows)"),
        ((4096, 14336), 0, "4096 x 14336, H^T X (columns)"),
    ):
        x = rng.standard_normal(shape)
        pre, post = (shape[0], 1) if axis == -1 else (1, shape[1])
        want = h_now(x, f, pre, post)
        times = []
        for method in (h_former, h_matmul, h_now):
            assert np.allclose(method(x, f, pre, post), want)
            times.append(best_of(functools.partial(method, x, f, pre, post)))
        f1, f2 = f.kronecker_pair
        factors = f"A {f.m}, B {f.p}; F1 {f1.shape[0]}, F2 {f2.shape[0]}"
        rows.append((what, factors, *times))
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
        "| transform (float64) | factors | B by butterflies, then A (former, s) | B as one matmul, then A (s) "
        "| two Kronecker products (now, s) |"
    )
    print("|---|---|---:|---:|---:|")
    for what, factors, former, matmul, now in transform_choice():
        print(f"| {what} | {factors} | {former:.2f} | {matmul:.2f} | {now:.2f} |", flush=True)
    t_dense, t_fast = r2_choice()
    print()
    print("| R2 on O's rows, 4096 x 4096 float64, head_dim 128 | seconds |")
    print("|---|---:|")
    print(f"| dense h^T per head (`rotate_head_rows`) | {t_dense:.2f} |")
    print(f"| factored per head | {t_fast:.2f} |")


if __name__ == "__main__":
    main()
