from __future__ import annotations

import logging

import numpy as np
import pytest

from rotgraph.hadamard import hadamard, hadamard_factors, random_hadamard, random_rotation


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def is_hadamard(h: np.ndarray) -> bool:
    n = h.shape[0]
    hf = h.astype(np.float64)  # exact: integer sums below 2**53; float64 uses BLAS
    return bool(np.all(np.abs(h) == 1) and np.array_equal(hf @ hf.T, n * np.eye(n)))


# Size classes: powers of two (Sylvester), Paley I over a prime (12, 20, 60) and a prime power
# (28 via GF(27), 244 via GF(243)), Paley II over a prime (36) and a prime power (52 via GF(25), 100 via
# GF(49)), Kronecker products (144 = 36 * 4, 240 = 60 * 4), and SmolLM2 / Qwen sizes.
SIZES = [1, 2, 4, 64, 128, 12, 20, 60, 28, 244, 36, 52, 100, 144, 240, 576, 1536, 896, 4864, 5632]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_hadamard(n: int) -> None:
    h = hadamard(n)
    assert h is not None
    assert is_hadamard(h)


def test_every_paley_or_product_order_up_to_256_exists() -> None:
    # The multiples of 4 up to 256 that no Sylvester/Paley/product construction reaches (they need
    # Williamson-type constructions): the list is from the literature, not from rotgraph.
    hard = {92, 116, 156, 172, 184, 188, 232, 236}
    for n in range(4, 257, 4):
        assert (hadamard(n) is None) == (n in hard), n


def test_power_of_two_part_is_sylvester() -> None:
    f = hadamard_factors(1536)
    assert f is not None and (f.m, f.p) == (12, 128)
    assert np.array_equal(f.b, sylvester(128))


def test_large_power_of_two_parts_are_split() -> None:
    f = hadamard_factors(4096)
    assert f is not None and (f.m, f.p) == (4, 1024)
    assert np.array_equal(np.kron(f.a, f.b), sylvester(4096))  # the same matrix as one Sylvester factor
    f = hadamard_factors(12 * 4096)
    assert f is not None and (f.m, f.p) == (48, 1024)


@pytest.mark.parametrize(
    "n,orders", [(64, (8, 8)), (576, (36, 16)), (1536, (48, 32)), (4096, (64, 64)), (448, (28, 16))]
)
def test_kronecker_pair_is_the_same_matrix(n: int, orders: tuple[int, int]) -> None:
    """The fast transform's two factors multiply (Kronecker) to H itself, the smaller one Sylvester."""
    f = hadamard_factors(n)
    assert f is not None
    f1, f2 = f.kronecker_pair
    assert (f1.shape[0], f2.shape[0]) == orders
    assert np.array_equal(np.kron(f1, f2), np.kron(f.a, f.b))
    assert np.array_equal(f2, sylvester(orders[1]))


@pytest.mark.parametrize("n", [16, 96, 576, 4096])
def test_factors_apply_matches_matrix(n: int) -> None:
    f = hadamard_factors(n)
    assert f is not None
    x = np.random.default_rng(0).standard_normal((5, n))
    np.testing.assert_allclose(f.apply(x), x @ f.matrix(), atol=1e-12)
    np.testing.assert_allclose(f.matrix() @ f.matrix().T, np.eye(n), atol=1e-12)


def test_random_hadamard_is_seeded_and_orthogonal() -> None:
    a = random_hadamard(576, np.random.default_rng(7))
    b = random_hadamard(576, np.random.default_rng(7))
    c = random_hadamard(576, np.random.default_rng(8))
    assert a is not None and b is not None and c is not None
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_allclose(a @ a.T, np.eye(576), atol=1e-12)
    assert is_hadamard(np.round(a * np.sqrt(576)))


def test_fallback_to_random_orthogonal_is_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        q, kind = random_rotation(92, np.random.default_rng(0), what="R1")
    assert kind == "orthogonal"
    np.testing.assert_allclose(q @ q.T, np.eye(92), atol=1e-12)
    assert "no Hadamard matrix of order 92" in caplog.text
