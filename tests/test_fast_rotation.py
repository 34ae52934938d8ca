"""Factored rotations (`HadamardRotation`) and the chunked evaluation of weight chains, against dense
products."""

from __future__ import annotations

import functools
import tracemalloc
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from rotgraph import io
from rotgraph.errors import RotgraphError
from rotgraph.hadamard import HadamardRotation, hadamard, hadamard_factors, random_hadamard, randomized_hadamard
from rotgraph.passes import (
    CanonicalizeNormsPass,
    FuseNormScalesPass,
    InsertDownHadamardPass,
    InsertOutHadamardPass,
    RotateHeadsPass,
    RotateResidualPass,
    UntieEmbeddingPass,
)
from rotgraph.passes.rotation.rotate_heads import head_rotations
from rotgraph.passes.rotation.rotate_residual import residual_rotation
from rotgraph.pipeline import run_passes
from rotgraph.structure import discover, r1_readers, rotate_head_columns_in, rotate_head_rows
from rotgraph.weights import (
    ROWS,
    _Chain,
    acts_on,
    multiply_left,
    multiply_right,
    read_float64,
    scale_rows,
    transposing,
)


@transposing
def transposing_step(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


# Orders and their factor m: the default model's hidden size 576 = 36 * 16, a power of two (m = 1),
# SmolLM2's intermediate 1536 = 12 * 128, 2048 (its power of two above 1024 split as 2 * 1024), 4096.
ORDERS = [(576, 36), (64, 1), (1536, 12), (2048, 2), (4096, 4)]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("n,m", ORDERS)
def test_fast_transform_equals_the_dense_product(
    n: int, m: int, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Butterflies in rotgraph's compiled library where it is built (CI builds it: required here), and
    numpy's products by the Kronecker factors without it, both equal to the dense product."""
    from rotgraph import kernels

    if not compiled:
        monkeypatch.setenv(kernels.SWITCH_ENV, "0")
    assert (kernels.weight_functions() is not None) == compiled, f"rotgraph's kernels: {kernels.BUILD_HINT}"
    q = randomized_hadamard(n, np.random.default_rng(n))
    assert q is not None and q.factors.m == m
    rng = np.random.default_rng(0)
    for r in (q, q.T):
        dense = r.matrix()
        rows, columns, vector = rng.standard_normal((5, n)), rng.standard_normal((n, 3)), rng.standard_normal(n)
        for got, want in ((r.apply(rows), rows @ dense), (r.apply(columns, axis=0), dense.T @ columns)):
            assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
        assert np.abs(r.apply(vector) - vector @ dense).max() <= 1e-10 * np.abs(vector @ dense).max()
        heads = rng.standard_normal((2, n, 4))  # a middle axis, as R2 would use on O's rows per head
        want = np.einsum("hio,ij->hjo", heads, dense)
        assert np.abs(r.apply(heads, axis=1) - want).max() <= 1e-10 * np.abs(want).max()
    np.testing.assert_allclose(q.matrix() @ q.T.matrix(), np.eye(n), atol=1e-12)


def test_randomized_hadamard_draws_the_same_matrix_as_before() -> None:
    """Same seed, same Q bit for bit: the draws (signs, then the permutation) and the dense formula of the
    dense-only code, which seeds and metadata depend on."""
    for n in (576, 64, 48):
        rng = np.random.default_rng([3, 1])
        signs = rng.choice(np.array([-1.0, 1.0]), size=n)
        perm = rng.permutation(n)
        h = hadamard(n)
        assert h is not None
        old = h[perm].astype(np.float64) * signs[None, :] / np.sqrt(n)
        q = randomized_hadamard(n, np.random.default_rng([3, 1]))
        assert q is not None
        np.testing.assert_array_equal(q.matrix(), old)
        np.testing.assert_array_equal(random_hadamard(n, np.random.default_rng([3, 1])), old)
        np.testing.assert_array_equal(q.T.matrix(), old.T)
    np.testing.assert_array_equal(residual_rotation(48, 3)[0], random_hadamard(48, np.random.default_rng([3, 1])))


def test_plain_hadamard_rotation_is_the_online_matrix() -> None:
    f = hadamard_factors(1536)
    assert f is not None
    np.testing.assert_array_equal(HadamardRotation(f).matrix(), f.matrix())
    w = np.random.default_rng(1).standard_normal((1536, 7))
    got = multiply_left(w, HadamardRotation(f).T)  # R4's fold: W -> H^T W
    np.testing.assert_allclose(got, f.matrix().T @ w, rtol=0, atol=1e-12 * np.abs(w).max())


def chain(base: np.ndarray, *steps) -> _Chain:
    return _Chain(ir.Tensor(base, name="w"), tuple(steps), "w")


def both(c: _Chain, dtype: type, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    return c.evaluate(dtype, chunk_bytes=1 << 40), c.evaluate(dtype, chunk_bytes=chunk_bytes)


def test_chunked_chains_equal_the_unchunked_result() -> None:
    rng = np.random.default_rng(0)
    q = randomized_hadamard(48, rng)
    assert q is not None
    wide = rng.standard_normal((48, 300)).astype(np.float32)  # [hidden, out]: a reader
    tall = rng.standard_normal((300, 48)).astype(np.float32)  # [rows, hidden]: the embedding, a writer
    left, right = functools.partial(multiply_left, m=q.T), functools.partial(multiply_right, m=q)
    cases = [
        (tall, (right,), (0, 0)),  # E -> E Q: row chunks
        (wide, (functools.partial(scale_rows, s=rng.random(48)), left), (1, 1)),  # diag(g) W -> Q^T W: columns
        (tall, (transposing_step, left), (0, 1)),  # a tied lm_head: rows of E become columns of Q^T E^T
    ]
    for base, steps, axis in cases:
        c = chain(base, *steps)
        assert c._streaming_axis() == axis
        for dtype in (np.float32, np.float16, np.float64):
            whole, chunked = both(c, dtype, chunk_bytes=8 * 48 * 7)  # 7 rows (or columns of 48 rows) per chunk
            assert chunked.dtype == dtype
            np.testing.assert_array_equal(chunked, whole)  # the fast transform is the same per row or column
    reference = tall.astype(np.float64) @ q.matrix()
    np.testing.assert_allclose(chain(tall, right).evaluate(np.float64, 1024), reference, rtol=0, atol=1e-12)


def test_mixed_chains_run_in_place_in_order() -> None:
    """down_proj's chain (R1 on the right, then R4 on the left) holds one float64 copy; each declared step
    runs over chunks of it, in the queued order, equal to the dense products to float64 rounding."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 48)).astype(np.float32)
    q, h = randomized_hadamard(48, rng), hadamard_factors(96)
    assert q is not None and h is not None
    c = chain(w, functools.partial(multiply_right, m=q), functools.partial(multiply_left, m=HadamardRotation(h).T))
    assert c._streaming_axis() is None
    want = h.matrix().T @ (w.astype(np.float64) @ q.matrix())
    for chunk_bytes in (1 << 40, 8 * 48 * 5):
        np.testing.assert_allclose(c.evaluate(np.float64, chunk_bytes), want, rtol=0, atol=1e-12)
    shared = rng.standard_normal((96, 48))
    kept = shared.copy()
    c = chain(w, lambda _: shared, functools.partial(multiply_right, m=q))  # an undeclared step's array is not ours
    np.testing.assert_allclose(c.evaluate(np.float64, 8 * 48 * 5), kept @ q.matrix(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(shared, kept)


def test_steps_declare_how_they_act() -> None:
    q = randomized_hadamard(16, np.random.default_rng(0))
    assert acts_on(functools.partial(multiply_right, m=q)) == ROWS
    assert acts_on(functools.partial(rotate_head_rows, h=np.eye(4))) == "columns"
    assert acts_on(functools.partial(rotate_head_columns_in, h=np.eye(4), columns=None)) == ROWS
    assert acts_on(lambda w: w) is None


def test_streamed_chain_holds_no_float64_copy_of_the_weight() -> None:
    base = np.random.default_rng(0).standard_normal((8192, 64)).astype(np.float32)  # 2 MB, 4 MB in float64
    q = randomized_hadamard(64, np.random.default_rng(1))
    c = chain(base, functools.partial(multiply_right, m=q))
    tracemalloc.start()
    out = c.evaluate(np.float32, chunk_bytes=64 << 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.nbytes + (1 << 20) > peak  # the float32 output and a few 64 kB chunks, not 4 MB of float64
    np.testing.assert_array_equal(out, c.evaluate(np.float32, chunk_bytes=1 << 40))


def test_non_finite_values_are_counted_over_all_chunks() -> None:
    base = np.ones((100, 8), dtype=np.float32)
    base[3, 1] = np.nan
    base[90, 2] = np.inf
    with pytest.raises(RotgraphError, match="has 2 non-finite values"):
        chain(base, functools.partial(multiply_right, m=np.eye(8))).evaluate(np.float32, chunk_bytes=8 * 8 * 10)


def test_mapped_weights_are_unmapped_after_the_chunks(tmp_path: Path) -> None:
    array = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    (tmp_path / "w.data").write_bytes(array.tobytes())
    tensor = ir.ExternalTensor(
        "w.data", 0, array.nbytes, ir.DataType.FLOAT, shape=ir.Shape(array.shape), name="w", base_dir=tmp_path
    )
    q = randomized_hadamard(16, np.random.default_rng(0))
    out = _Chain(tensor, (functools.partial(multiply_right, m=q),), "w").evaluate(np.float32, chunk_bytes=8 * 16 * 5)
    assert tensor.raw is None
    assert q is not None
    np.testing.assert_allclose(out, array @ q.matrix(), atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_rotated_weights_are_those_of_the_dense_products(tiny, model_type: str) -> None:
    """R1 (factored), R2, R4 and the Hadamard before o_proj on a tiny model give, to float32 rounding (one
    ulp), the weights of the dense float64 products the passes computed before they were factored."""
    _, path = tiny(model_type, "dynamo")
    model = io.load_model(path)
    run_passes(
        model,
        [
            CanonicalizeNormsPass(),
            common_passes.ShapeInferencePass(strict_mode=False),
            UntieEmbeddingPass(),
            FuseNormScalesPass(),
        ],
    )
    before = {k: read_float64(v) for k, v in model.graph.initializers.items() if v.const_value is not None}
    run_passes(
        model, [RotateResidualPass(seed=3), RotateHeadsPass(seed=3), InsertDownHadamardPass(), InsertOutHadamardPass()]
    )
    desc = discover(model)
    q = residual_rotation(desc.hidden_size, 3)[0]
    heads = head_rotations(desc.blocks[0].attention.head_dim, len(desc.blocks), 3)
    want = {desc.embedding_table.name: before[desc.embedding_table.name] @ q}
    for lin in r1_readers(desc):
        want[lin.weight.name] = q.T @ before[lin.weight.name]
    for block, (h, _) in zip(desc.blocks, heads, strict=True):
        a, mlp = block.attention, block.mlp
        want[a.v.weight.name] = rotate_head_columns_in(want[a.v.weight.name], h, a.v.columns)
        if a.v.bias is not None:
            want[a.v.bias.name] = rotate_head_columns_in(before[a.v.bias.name], h, a.v.columns)
        o_hadamard, down_hadamard = hadamard_factors(a.o.shape[0]), hadamard_factors(mlp.down.shape[0])
        assert o_hadamard is not None and down_hadamard is not None
        want[a.o.weight.name] = o_hadamard.matrix().T @ rotate_head_rows(before[a.o.weight.name] @ q, h)
        want[mlp.down.weight.name] = down_hadamard.matrix().T @ (before[mlp.down.weight.name] @ q)
    for name, expected in want.items():
        tensor = model.graph.initializers[name].const_value
        assert tensor is not None and tensor.dtype == ir.DataType.FLOAT
        got = tensor.numpy()
        ulp = np.spacing(np.abs(expected).astype(np.float32))
        assert np.all(np.abs(got - expected) <= ulp), name
        assert np.mean(got == expected.astype(np.float32)) > 0.99, name
