"""The compiled library's functions for the weight rewrites (`rotgraph.kernels.weight_functions`): the
float64 Hadamard rotation by butterflies against dense products, and the float16 <-> float64
conversions bit for bit against numpy's."""

from __future__ import annotations

import numpy as np
import pytest

from rotgraph import kernels
from rotgraph.errors import RotgraphError
from rotgraph.hadamard import hadamard_factors


@pytest.fixture(scope="module")
def functions() -> kernels.WeightFunctions:
    found = kernels.weight_functions()
    assert found is not None, f"rotgraph's kernels are not built: {kernels.BUILD_HINT}"
    assert found.half_to_double is not None and found.double_to_half is not None, "this CPU has no F16C"
    return found


# n = m * p: powers of two (m = 1, 4 for 4096 = 4 * 1024), the default model's 576 = 36 * 16 and 1536 =
# 12 * 128, Llama-3's 14336 = 28 * 512; post 1 (rows), 16 (one tile), 37 (tiles and a remainder).
@pytest.mark.parametrize("n", [8, 64, 576, 1536, 4096, 14336])
@pytest.mark.parametrize("pre,post", [(5, 1), (1, 16), (2, 37)])
def test_compiled_rotation_equals_the_dense_product(
    functions: kernels.WeightFunctions, n: int, pre: int, post: int
) -> None:
    f = hadamard_factors(n)
    assert f is not None
    rng = np.random.default_rng(n + post)
    x = rng.standard_normal((pre, n, post))
    # v @ kron(A, B) with v as [m, p]: A^T V B, in numpy (no n x n matrix for n = 14336)
    product = np.einsum(
        "iapc,ab,pq->ibqc", x.reshape(pre, f.m, f.p, post), f.a.astype(float), f.b.astype(float), optimize=True
    )
    for scale in (None, rng.standard_normal(n)):
        want = product.reshape(x.shape) * (1.0 if scale is None else scale[None, :, None])
        got = x.copy()
        functions.rotate_f64(got, pre, f.m, f.p, post, f.a_float64 if f.m > 1 else None, scale)
        assert np.abs(got - want).max() <= 1e-13 * np.abs(want).max()


def test_compiled_rotation_refuses_what_it_cannot_do(functions: kernels.WeightFunctions) -> None:
    x = np.zeros((2, 12, 1))
    with pytest.raises(RotgraphError, match="refused sizes"):
        functions.rotate_f64(x, 2, 1, 12, 1, None, None)  # p = 12 is not a power of two
    with pytest.raises(ValueError, match="contiguous float64"):
        functions.rotate_f64(x.astype(np.float32), 2, 1, 12, 1, None, None)
    with pytest.raises(ValueError, match="m > 1 needs a"):
        functions.rotate_f64(x, 2, 3, 4, 1, None, None)


def test_half_to_double_is_exact_for_every_float16(functions: kernels.WeightFunctions) -> None:
    assert functions.half_to_double is not None
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    for h in (every, every[:, 3:203]):  # contiguous, and rows 256 apart
        got, nonfinite = functions.half_to_double(h)
        want = h.astype(np.float64)
        np.testing.assert_array_equal(got, want)  # NaNs at the same places
        assert nonfinite == int((~np.isfinite(want)).sum()) > 0


def test_double_to_half_rounds_as_numpy(functions: kernels.WeightFunctions) -> None:
    """Every finite float16, the midpoints between neighbours (ties to even), a hair off them either way (a
    first rounding to float32 to nearest would land on the tie), random magnitudes, overflow, subnormals."""
    assert functions.double_to_half is not None
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    halves = np.sort(halves[np.isfinite(halves)])
    middles = (halves[:-1] + halves[1:]) / 2
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            halves,
            middles,
            np.nextafter(middles, np.inf),
            np.nextafter(middles, -np.inf),
            middles * (1 + 2.0**-30),
            middles * (1 - 2.0**-30),
            rng.standard_normal(20000) * 10.0 ** rng.integers(-10, 6, 20000),
            [np.inf, -np.inf, np.nan, 1e300, -1e300, 5e-324, -5e-324, 65504.0, 65519.99, 65520.0, 2.0**-25],
        ]
    )
    x = values[: len(values) // 61 * 61].reshape(61, -1)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    out = np.zeros((61, x.shape[1] + 3), dtype=np.float16)
    functions.double_to_half(x, out[:, 1:-2])  # rows of the output strided
    got = out[:, 1:-2]
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(want)], want.view(np.uint16)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()
    assert (out[:, 0] == 0).all() and (out[:, -2:] == 0).all()


def test_float16_weight_chains_with_and_without_the_library(
    functions: kernels.WeightFunctions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float16 weight's rewrite reads and writes float16 through the library's conversions: the same
    bits as numpy's (a scale only), and within float64 rounding of numpy's products when rotated (the
    butterflies add in another order), streamed (rows, columns) and whole (a mixed chain), a NaN counted."""
    import functools

    import onnx_ir as ir

    from rotgraph.hadamard import HadamardRotation, randomized_hadamard
    from rotgraph.weights import _Chain, multiply_left, multiply_right, scale_rows

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 576)) * 0.05).astype(np.float16)
    q, h = randomized_hadamard(576, rng), hadamard_factors(96)
    assert q is not None and h is not None
    s = rng.random(96) + 0.5
    cases = {
        "scale": (functools.partial(scale_rows, s=s),),
        "rows": (functools.partial(multiply_right, m=q),),
        "columns": (functools.partial(scale_rows, s=s), functools.partial(multiply_left, m=HadamardRotation(h).T)),
        "mixed": (functools.partial(multiply_right, m=q), functools.partial(multiply_left, m=HadamardRotation(h).T)),
    }

    def evaluate(steps: tuple) -> np.ndarray:  # type: ignore[type-arg]
        return _Chain(ir.Tensor(w, name="w"), steps, "w").evaluate(np.float16, chunk_bytes=8 * 576 * 7)

    compiled = {name: evaluate(steps) for name, steps in cases.items()}
    monkeypatch.setenv(kernels.SWITCH_ENV, "0")
    assert kernels.weight_functions() is None
    for name, steps in cases.items():
        got, want = compiled[name].astype(np.float64), evaluate(steps).astype(np.float64)
        assert compiled[name].dtype == np.float16
        if name == "scale":
            np.testing.assert_array_equal(got, want)
        else:  # at most one float16 step apart, and rarely
            assert (np.abs(got - want) <= np.spacing(np.abs(want).astype(np.float16)).astype(np.float64)).all()
            assert (got != want).mean() < 1e-3
    monkeypatch.delenv(kernels.SWITCH_ENV)
    w[5, 7] = np.nan
    with pytest.raises(RotgraphError, match="has 1 non-finite values"):
        evaluate(cases["rows"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_external_weights_are_read_from_their_file_in_chunks(tmp_path, dtype: type) -> None:  # type: ignore[no-untyped-def]
    """An external weight's chunks of rows and of columns come from positional reads of its file, from
    worker threads: the same result as the weight in memory; a file shorter than the weight is an error."""
    import functools

    import onnx_ir as ir

    from rotgraph.hadamard import HadamardRotation, randomized_hadamard
    from rotgraph.weights import _Chain, multiply_left, multiply_right

    rng = np.random.default_rng(5)
    array = (rng.standard_normal((64, 300)) * 0.1).astype(dtype)
    (tmp_path / "w.data").write_bytes(b"\0" * 24 + array.tobytes())
    external = ir.ExternalTensor(
        "w.data",
        24,
        array.nbytes,
        ir.DataType.from_numpy(np.dtype(dtype)),
        shape=ir.Shape(array.shape),
        name="w",
        base_dir=tmp_path,
    )
    q, h = randomized_hadamard(300, rng), hadamard_factors(64)
    assert q is not None and h is not None
    for step in (functools.partial(multiply_right, m=q), functools.partial(multiply_left, m=HadamardRotation(h).T)):
        want = _Chain(ir.Tensor(array, name="w"), (step,), "w").evaluate(dtype, chunk_bytes=8 * 300 * 5)
        got = _Chain(external, (step,), "w").evaluate(dtype, chunk_bytes=8 * 300 * 5)
        np.testing.assert_array_equal(got, want)
    assert external.raw is None  # never mapped
    (tmp_path / "w.data").write_bytes(b"\0" * 24 + array.tobytes()[:-10])
    with pytest.raises(RotgraphError, match="ends before its data"):
        _Chain(external, (functools.partial(multiply_right, m=q),), "w").evaluate(dtype, chunk_bytes=8 * 300 * 5)


@pytest.mark.parametrize("queued", ["none", "rows", "columns", "mixed"])
def test_a_part_of_a_weight_equals_the_same_part_of_the_whole(queued: str) -> None:
    """`weights.stored_rows` / `output_columns` (what a Ray task reads) against slices of `read_float64`: the
    same numbers, whether the queued rewrites let the part be rewritten alone or not."""
    import functools

    import onnx_ir as ir

    from rotgraph import weights
    from rotgraph.hadamard import HadamardRotation

    rng = np.random.default_rng(5)
    base = rng.standard_normal((96, 80)).astype(np.float32)
    value = ir.Value(name="w", shape=ir.Shape(base.shape), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.Tensor(base, name="w")
    right = HadamardRotation(hadamard_factors(80), signs=rng.choice([-1.0, 1.0], 80))
    left = HadamardRotation(hadamard_factors(96), perm=rng.permutation(96))
    if queued in ("rows", "mixed"):
        weights.rewrite_initializer(value, functools.partial(weights.multiply_right, m=right))
    if queued in ("columns", "mixed"):
        weights.rewrite_initializer(value, functools.partial(weights.scale_rows, s=rng.uniform(0.5, 2, 96)))
        weights.rewrite_initializer(value, functools.partial(weights.multiply_left, m=left))
    whole = weights.read_float64(value)
    chain = weights.source(value)
    for start, stop in ((0, 7), (7, 80), (33, 34)):
        assert np.array_equal(weights.output_columns(chain, start, stop), whole.T[start:stop])
        assert np.array_equal(weights.stored_rows(chain, start, stop), whole[start:stop])
