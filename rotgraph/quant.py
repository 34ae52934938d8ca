"""Weight quantizers: round-to-nearest with a clipping search, and GPTQ. numpy, float64.

Conventions: a weight is given as `wt` with shape [rows, cols] = [out_features, in_features] (the
transpose of an ONNX MatMul initializer); groups run along `cols` (the reduction axis), so every
output channel has one scale (and zero point) per `group_size` inputs, or one in all (per channel).
Integer codes lie on the grids of `rotgraph.grid`: signed for symmetric grids ([-2^(b-1), 2^(b-1) - 1]) and
unsigned for asymmetric ones ([0, 2^b - 1]); dequantized value = (code - zero) * scale (a symmetric scale
is negative where `WeightSpec.full_range` maps a positive extreme to the code -2^(b-1)). Unlike the dynamic
quantizer, an all-zero group gets scale 1 (its codes are 0 either way), so every stored scale is a normal
number in float16 too.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.linalg.lapack

from rotgraph import grid
from rotgraph.errors import RotgraphError
from rotgraph.options import setting
from rotgraph.threads import workers


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 4
    symmetric: bool = True
    group_size: int | None = 128  # None: per output channel
    clip_search: bool = True  # try clipping ratios 1.0, 0.95, ..., 0.55 per group, keep the best
    # symmetric grids: also try the scale that puts the group's largest-magnitude value on the code
    # -2^(b-1) (the scale takes the opposite sign of that value), so all 2^b codes are used, as onnxruntime's
    # own int4 quantizer does; kept per group (and clipping ratio) where it lowers the squared error
    full_range: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RotgraphError(f"weight bits must be 4 or 8, got {self.bits}")

    @property
    def qmin(self) -> int:
        return grid.qmin(self.bits, self.symmetric)

    @property
    def qmax(self) -> int:
        return grid.qmax(self.bits, self.symmetric)

    def groups(self, cols: int) -> int:
        g = self.group_size or cols
        if cols % g:
            raise RotgraphError(
                f"group size {g} does not divide the input size {cols}: pass a group that does ({setting('group')})"
            )
        return cols // g


@dataclass
class QuantizedWeight:
    codes: np.ndarray  # [rows, cols] grid values: int8 / uint8 where they fit (`code_dtype`), else int16
    scales: np.ndarray  # [rows, groups] float64
    zeros: np.ndarray  # [rows, groups] float64 (0 for symmetric grids)
    spec: WeightSpec

    def dequantize(self) -> np.ndarray:
        g = self.codes.shape[1] // self.scales.shape[1]
        scales = np.repeat(self.scales, g, axis=1)
        zeros = np.repeat(self.zeros, g, axis=1)
        return (self.codes.astype(np.float64) - zeros) * scales


_RATIOS = np.linspace(1.0, 0.55, 10)


def _params_at(
    x: np.ndarray, spec: WeightSpec, signed: bool = False
) -> Callable[[float], tuple[np.ndarray, np.ndarray]]:
    """A function of the clipping ratio giving the scale and zero point of each row of x [..., n]; x's
    extremes are read once, however many ratios are tried. `signed` (symmetric grids): the row's
    largest-magnitude value goes to the code qmin (a negative scale when that value is positive)."""
    if spec.symmetric and signed:
        extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]

        def signed_at(ratio: float) -> tuple[np.ndarray, np.ndarray]:
            e = extreme * ratio
            scale = np.where(e != 0, e / spec.qmin, 1.0)
            return scale, np.zeros_like(scale)

        return signed_at
    if spec.symmetric:
        largest = np.abs(x).max(axis=-1)

        def symmetric_at(ratio: float) -> tuple[np.ndarray, np.ndarray]:
            amax = largest * ratio
            scale = np.where(amax > 0, amax / spec.qmax, 1.0)
            return scale, np.zeros_like(scale)

        return symmetric_at
    low, high = np.minimum(x.min(axis=-1), 0), np.maximum(x.max(axis=-1), 0)

    def asymmetric_at(ratio: float) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = low * ratio, high * ratio
        scale = np.where(hi > lo, (hi - lo) / spec.qmax, 1.0)
        return scale, np.round(-lo / scale)

    return asymmetric_at


def _codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: WeightSpec) -> np.ndarray:
    return np.clip(np.round(x / scale[..., None]) + zero[..., None], spec.qmin, spec.qmax)


def _group_params(x: np.ndarray, spec: WeightSpec) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, zero) for each row of x [..., n] over the clipping ratios (squared error)."""
    if not spec.clip_search:
        return _params_at(x, spec, spec.full_range)(1.0)
    signs = (False, True) if spec.full_range and spec.symmetric else (False,)
    at = {signed: _params_at(x, spec, signed) for signed in signs}
    best_err = np.full(x.shape[:-1], np.inf)
    best_scale, best_zero = at[False](1.0)
    buf = np.empty_like(x, dtype=np.float64)
    for r, signed in ((r, signed) for r in _RATIOS for signed in signs):
        scale, zero = at[signed](float(r))
        # ((codes - zero) * scale - x)^2 summed, in place (this search is most of RTN's and GPTQ's time)
        np.divide(x, scale[..., None], out=buf)
        np.round(buf, out=buf)
        if not spec.symmetric:
            buf += zero[..., None]
        np.clip(buf, spec.qmin, spec.qmax, out=buf)
        if not spec.symmetric:
            buf -= zero[..., None]
        buf *= scale[..., None]
        buf -= x
        err = np.square(buf, out=buf).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


# Values per step of the clipping search: its float64 temporaries (2 MB each) stay in the cache, and
# `threads.workers()` steps run at once (numpy releases the GIL in its loops; rows are independent, so the result
# does not depend on the split).
RTN_CHUNK = 1 << 18


def _weight_params(wt: np.ndarray, spec: WeightSpec, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`_group_params` of every row group of `wt` [rows, cols] (any float dtype and layout, a transposed
    or memory-mapped view too; computed in float64), a block of rows at a time on `threads.workers()` threads, so
    memory is the weight plus its codes, not a dozen weight-sized temporaries; with `codes` ([rows,
    cols]), also the round-to-nearest codes, into it."""
    rows, cols = wt.shape
    n = spec.groups(cols)
    scale, zero = np.empty((rows, n)), np.empty((rows, n))
    step = max(1, RTN_CHUNK // cols)

    def rows_from(i: int) -> None:
        # contiguous: a transposed view's rows would otherwise be reshaped into strided groups
        block = np.ascontiguousarray(wt[i : i + step], dtype=np.float64).reshape(-1, n, cols // n)
        scale[i : i + step], zero[i : i + step] = _group_params(block, spec)
        if codes is not None:
            codes[i : i + step] = _codes(block, scale[i : i + step], zero[i : i + step], spec).reshape(-1, cols)

    starts, threads = range(0, rows, step), workers()
    if len(starts) == 1 or threads < 2:
        for i in starts:
            rows_from(i)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(rows_from, starts))  # re-raises a worker's exception
    return scale, zero


def code_dtype(spec: WeightSpec) -> type[np.integer]:
    """The narrowest array type of the codes: int8 / uint8 when the grid fits (a 128256 x 4096 table's
    8-bit codes are 0.5 GB, not 1 GB), else int16."""
    if spec.symmetric and spec.qmin >= -128 and spec.qmax <= 127:
        return np.int8
    if not spec.symmetric and spec.qmin >= 0 and spec.qmax <= 255:
        return np.uint8
    return np.int16


def quantize_rtn(wt: np.ndarray, spec: WeightSpec) -> QuantizedWeight:
    """Round to nearest per row group (`_weight_params`)."""
    codes = np.empty(wt.shape, code_dtype(spec))
    scale, zero = _weight_params(wt, spec, codes)
    return QuantizedWeight(codes, scale, zero, spec)


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of one input's Hessian, computed once for every weight that reads the input (Q, K
    and V share theirs): `v`, the upper-triangular factor of the damped H = V V^T in processing order `perm`
    (V^-1 is the upper Cholesky factor of H^-1 that GPTQ's paper writes its updates with), and the `dead`
    input columns (zero on every calibration token)."""

    v: np.ndarray
    perm: np.ndarray
    dead: np.ndarray


def hessian_factor(
    hessian: np.ndarray, damp: float = 0.01, act_order: bool = False, overwrite: bool = False
) -> HessianFactor:
    """`HessianFactor` of X^T X (`hessian`, [cols, cols]), damped by `damp` times its mean diagonal and with
    `act_order` processing columns by decreasing diagonal. float64. One Cholesky factorization in place:
    with J the order reversal, J H J = L L^T gives V = J L J (no inverse: `gptq` works with V itself; a
    14336-wide Hessian is 1.6 GB, so copies count). With `overwrite`, `hessian` (float64) is used as scratch
    instead of copied."""
    h = hessian if overwrite and hessian.dtype == np.float64 else np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    cols = len(h)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    _permute_symmetric_in_place(h, perm[::-1])  # J P H P^T J, J the reversal
    try:
        _cholesky_in_place(h)
    except np.linalg.LinAlgError:
        raise RotgraphError(f"GPTQ: the Hessian is not positive definite; raise {setting('damp')}") from None
    _reverse_in_place(h)  # contiguous: a reversed view would keep GPTQ's products off BLAS
    return HessianFactor(h, perm, dead)


CHUNK_ROWS = 256  # rows per temporary in the in-place permutation below


def _permute_symmetric_in_place(a: np.ndarray, order: np.ndarray) -> None:
    """a <- a[order][:, order] for a square C-contiguous `a`: the columns a chunk of rows at a time, then
    the rows by following the permutation's cycles (one row as temporary)."""
    n = len(a)
    for i in range(0, n, CHUNK_ROWS):
        a[i : i + CHUNK_ROWS] = a[i : i + CHUNK_ROWS][:, order]
    moved = np.zeros(n, dtype=bool)
    for start in range(n):
        if moved[start]:
            continue
        saved, i = a[start].copy(), start
        while True:  # new row i is old row order[i]; old row `start` is already overwritten when the cycle closes
            moved[i] = True
            j = int(order[i])
            if j == start:
                a[i] = saved
                break
            a[i] = a[j]
            i = j


def _cholesky_in_place(a: np.ndarray) -> None:
    """a <- L with a = L L^T, L lower triangular (the upper triangle zeroed), for a symmetric positive
    definite C-contiguous float64 `a`, in place: LAPACK's dpotrf on the transposed view (Fortran-ordered, the
    same matrix), whose upper factor U = L^T is L in `a`'s own order. Raises numpy's LinAlgError when `a`
    is not positive definite."""
    factor, info = scipy.linalg.lapack.dpotrf(a.T, lower=0, clean=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dpotrf: info {info}")
    if not np.shares_memory(factor, a):  # f2py copies an input of another order or type
        a[...] = factor.T


def _reverse_in_place(a: np.ndarray, chunk: int = 256) -> None:
    """a <- a[::-1, ::-1] for a square C-contiguous `a`, with temporaries of `chunk` rows."""
    n = len(a)
    for i in range(0, n, chunk):
        a[i : i + chunk] = a[i : i + chunk, ::-1].copy()
    for i in range(n // 2):
        a[[i, n - 1 - i]] = a[[n - 1 - i, i]]


# GPTQ's products: a block of `block` columns starts from one product with every column done before it; a
# sub-block of INNER_BLOCK columns inside it, from one with the earlier sub-blocks of its block.
INNER_BLOCK = 16


def gptq(
    wt: np.ndarray,
    hessian: np.ndarray | HessianFactor,
    spec: WeightSpec,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022): quantize columns in order, each after adding the errors of the columns
    quantized before it as the Hessian weighs them.

    `hessian` is X^T X of the layer's calibration inputs ([cols, cols]), or its `hessian_factor` (then
    `damp` and `act_order` are the factor's); `damp` is added as a fraction of its mean diagonal. Group
    scales come from the original weights (static groups), so they stay aligned with input columns when
    `act_order` permutes the processing order.

    The paper's updates, w_j -= U_ij (w_i - q_i) / U_ii after column i (H^-1 = U^T U), add up to
    W - Q = E U. With V = U^-1 (H = V V^T, `HessianFactor.v`), E = (W - Q) V, so the column that
    quantizes is w_i + sum_{k<i} (w_k - q_k) V_ki / V_ii: the same result without H^-1 or its factor
    (GPTQ read as Babai's nearest plane algorithm), summed left-looking, one product per
    block with the errors already made, so the columns not yet quantized are never written.
    """
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, damp, act_order)
    v, perm, dead = factor.v, factor.perm, factor.dead
    rows, cols = wt.shape
    # Column-major working copy: weight column j is the contiguous row w[j] (a weight stored [in, out]
    # arrives as a transposed view, so this is a plain copy). Once column i is quantized, w[i] holds its
    # error w_i - q_i.
    w = np.array(wt.T, dtype=np.float64, order="C")
    w[dead] = 0.0
    scale, zero = _weight_params(w.T, spec)  # static groups, from the original columns
    permuted = bool((perm != np.arange(cols)).any())
    if permuted:
        w = w[perm]
    g = cols // spec.groups(cols)
    codes_t = np.zeros((cols, rows), np.int16)
    scale_t, zero_t = np.ascontiguousarray(scale.T), np.ascontiguousarray(zero.T)
    group_of = perm // g
    acc = np.empty((min(block, cols), rows))  # per column i of the block: sum_{k<i} (w_k - q_k) V_ki
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        here = acc[: i2 - i1]
        np.matmul(v[:i1, i1:i2].T, w[:i1], out=here)  # every column before the block (none: zeros)
        for j1 in range(i1, i2, INNER_BLOCK):  # within the block, sub-blocks of INNER_BLOCK columns
            j2 = min(j1 + INNER_BLOCK, i2)
            if j1 > i1:
                here[j1 - i1 : j2 - i1] += v[i1:j1, j1:j2].T @ w[i1:j1]
            for i in range(j1, j2):
                col = w[i] + here[i - i1] / v[i, i]
                s, z = scale_t[group_of[i]], zero_t[group_of[i]]
                c = np.clip(np.round(col / s) + z, spec.qmin, spec.qmax)
                codes_t[i] = c
                w[i] -= (c - z) * s
                here[i - i1 + 1 : j2 - i1] += np.outer(v[i, i + 1 : j2], w[i])
    codes = np.ascontiguousarray(codes_t.T)
    return QuantizedWeight(codes[:, np.argsort(perm)] if permuted else codes, scale, zero, spec)
