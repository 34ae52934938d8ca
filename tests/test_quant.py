from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from rotgraph import quant
from rotgraph.errors import RotgraphError
from rotgraph.quant import WeightSpec, gptq, hessian_factor, quantize_rtn


def reference_gptq(wt: np.ndarray, h: np.ndarray, spec: WeightSpec, damp: float) -> np.ndarray:
    """Textbook OBQ/GPTQ order: one column at a time with the full inverse Hessian, no blocking."""
    w = wt.copy()
    cols = w.shape[1]
    g = spec.group_size or cols
    h = h + damp * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.inv(h)
    out = np.zeros_like(w)
    # static group parameters from the original weights, symmetric grid without clipping search
    amax = np.abs(wt.reshape(w.shape[0], -1, g)).max(-1)
    scales = np.where(amax > 0, amax / spec.qmax, 1.0)
    for j in range(cols):
        s = scales[:, j // g]
        q = np.clip(np.round(w[:, j] / s), spec.qmin, spec.qmax) * s
        out[:, j] = q
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j + 1 :] -= np.outer(err, hinv[j, j + 1 :])
        # the inverse Hessian of the remaining columns (Schur complement)
        hinv[j + 1 :, j + 1 :] -= np.outer(hinv[j + 1 :, j], hinv[j, j + 1 :]) / hinv[j, j]
    return out


@pytest.fixture
def problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))  # correlated inputs
    wt = rng.standard_normal((24, 64))
    return wt, x.T @ x


@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("block", [16, 64])  # 64: sub-blocks of quant.INNER_BLOCK inside a block
def test_gptq_matches_the_unblocked_algorithm(problem, group, block) -> None:
    wt, h = problem
    spec = WeightSpec(bits=4, symmetric=True, group_size=group, clip_search=False)
    got = gptq(wt, h, spec, damp=0.01, block=block).dequantize()
    np.testing.assert_allclose(got, reference_gptq(wt, h, spec, 0.01), atol=1e-9)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_layer_output(problem, act_order) -> None:
    wt, h = problem
    spec = WeightSpec(bits=4, group_size=16)

    def output_error(q: np.ndarray) -> float:
        d = q - wt
        return float(np.trace(d @ h @ d.T))

    rtn = output_error(quantize_rtn(wt, spec).dequantize())
    assert output_error(gptq(wt, h, spec, act_order=act_order).dequantize()) < 0.7 * rtn


# The grids written out (rotgraph.grid states them once for the code): (bits, symmetric) -> (qmin, qmax)
GRIDS = {(4, True): (-8, 7), (8, True): (-128, 127), (4, False): (0, 15), (8, False): (0, 255)}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_codes_lie_on_the_grid_and_round_to_nearest(symmetric, bits) -> None:
    wt = np.random.default_rng(1).standard_normal((8, 32))
    spec = WeightSpec(bits=bits, symmetric=symmetric, group_size=8, clip_search=False)
    assert (spec.qmin, spec.qmax) == GRIDS[bits, symmetric]
    q = quantize_rtn(wt, spec)
    lo, hi = GRIDS[bits, symmetric]
    assert q.codes.min() >= lo and q.codes.max() <= hi
    # without clipping a group's largest magnitude lands on the end of the grid (symmetric: +qmax or, for
    # a negative extreme, -qmax; asymmetric: its max on qmax and its min on 0)
    if symmetric:
        assert np.all(np.abs(q.codes).reshape(8, 4, 8).max(axis=-1) == hi)
    else:
        codes = q.codes.reshape(8, 4, 8)
        assert np.all(codes.max(axis=-1) == hi) and np.all(codes.min(axis=-1) == 0)
    step = np.repeat(q.scales, 8, axis=1)
    # without clipping every weight is within half a step of its dequantized value
    assert np.all(np.abs(q.dequantize() - wt) <= step / 2 + 1e-12)


def test_clip_search_never_hurts() -> None:
    wt = np.random.default_rng(2).standard_t(3, size=(16, 128))  # heavy tails: clipping pays
    plain = quantize_rtn(wt, WeightSpec(group_size=32, clip_search=False)).dequantize()
    clipped = quantize_rtn(wt, WeightSpec(group_size=32, clip_search=True)).dequantize()
    assert ((clipped - wt) ** 2).sum() < ((plain - wt) ** 2).sum()


def test_group_must_divide() -> None:
    with pytest.raises(Exception, match="does not divide"):
        quantize_rtn(np.zeros((2, 48)), WeightSpec(group_size=32))


@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_factor_is_the_reversed_cholesky_factor(act_order: bool) -> None:
    """V V^T = H (V upper triangular, as numpy's Cholesky of the reversed matrix gives it), V^-1 the upper
    Cholesky factor of H^-1 that GPTQ's paper uses, and a column that no token reads is handled as dead."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 600)) * rng.uniform(0.1, 10.0, 600)
    x[:, 7] = 0.0
    h = x.T @ x
    factor = hessian_factor(h, damp=0.01, act_order=act_order)
    assert factor.dead.tolist() == [i == 7 for i in range(600)]
    fixed = h.copy()
    fixed[7, 7] = 1.0
    order = np.argsort(-np.diag(fixed), kind="stable") if act_order else np.arange(600)
    damped = fixed[order][:, order] + 0.01 * np.mean(np.diag(fixed)) * np.eye(600)
    expected = np.linalg.cholesky(damped[::-1, ::-1])[::-1, ::-1]
    np.testing.assert_array_equal(factor.perm, order)
    np.testing.assert_allclose(factor.v, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert np.array_equal(factor.v, np.triu(factor.v))
    paper = np.linalg.cholesky(np.linalg.inv(damped)).T
    np.testing.assert_allclose(np.linalg.inv(factor.v), paper, rtol=0, atol=1e-9 * np.abs(paper).max())


@pytest.mark.parametrize("order", ["C", "F"])
def test_in_place_cholesky_matches_numpy(order: str) -> None:
    """LAPACK's in-place factorization gives numpy's Cholesky factor in the array itself, whichever its
    memory order (LAPACK gets a copy of a Fortran-ordered one, written back)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 300))
    h = x.T @ x
    a = np.array(h, order=order)
    quant._cholesky_in_place(a)
    np.testing.assert_allclose(a, np.linalg.cholesky(h), rtol=0, atol=1e-10 * np.abs(a).max())


def test_hessian_that_is_not_positive_definite_names_the_setting() -> None:
    with pytest.raises(RotgraphError, match=r"not positive definite.*damp"):
        hessian_factor(-np.eye(8), damp=0.01)


@pytest.mark.parametrize("act_order", [False, True])
def test_hessian_factor_overwrites_instead_of_copying(act_order: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `overwrite`, the factor is computed in the Hessian's own memory: the temporaries (chunks of 64
    rows here) stay under a quarter of it (a 14336-wide Hessian is 1.6 GB; a copy for the order, the
    Cholesky or the inverse would be another 1.6 GB each), and the result equals the copying call's."""
    monkeypatch.setattr(quant, "CHUNK_ROWS", 64)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1500, 1200)) * rng.uniform(0.1, 10.0, 1200)
    h = x.T @ x
    expected = hessian_factor(h, damp=0.01, act_order=act_order)
    tracemalloc.start()
    factor = hessian_factor(h, damp=0.01, act_order=act_order, overwrite=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.shares_memory(factor.v, h)
    assert peak < h.nbytes / 4, f"{peak / 1e6:.1f} MB of temporaries for a {h.nbytes / 1e6:.1f} MB Hessian"
    np.testing.assert_array_equal(factor.v, expected.v)


def test_hessian_sums_add_several_windows_per_product_in_place_a_slab_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`calibrate.Grams` gives X^T X / tokens in float64 from one float32 product (as numpy computes it) per
    `GRAM_TOKENS` rows, i.e. several windows, summed in float64, without a product made whole at once:
    temporaries stay under half its bytes."""
    from rotgraph import calibrate

    monkeypatch.setattr(calibrate, "GRAM_ROWS", 256)
    monkeypatch.setattr(calibrate, "GRAM_TOKENS", 400)
    rng = np.random.default_rng(4)
    windows = [rng.standard_normal((200, 2000)).astype(np.float32) for _ in range(5)]
    grams = calibrate.Grams()
    grams.add("site", windows[0])
    grams.add("site", windows[1])  # the first product: held until here
    tracemalloc.start()
    for x in windows[2:]:
        grams.add("site", x)
    sums = grams.result(1000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    groups = [np.concatenate(windows[0:2]), np.concatenate(windows[2:4]), windows[4]]
    expected = sum((x.T @ x).astype(np.float64) for x in groups) / 1000
    np.testing.assert_allclose(sums["site"], expected, rtol=1e-12, atol=0)
    assert peak < 2000 * 2000 * 4 / 2, f"{peak / 1e6:.1f} MB of temporaries"
