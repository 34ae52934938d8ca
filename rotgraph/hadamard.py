"""Hadamard matrices of order n = m * 2**k, and the random orthogonal matrices built from them.

Constructions: Sylvester (powers of two), Paley I (order q + 1 for a prime power q = 3 mod 4),
Paley II (order 2(q + 1) for a prime power q = 1 mod 4), and Kronecker products of these. Every
matrix returned is checked: entries are +-1 and H @ H.T == n * I.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q == p**e for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 else None


def _poly_mulmod(a: tuple[int, ...], b: tuple[int, ...], f: tuple[int, ...], p: int) -> tuple[int, ...]:
    """a * b mod (f, p); polynomials as coefficient tuples, lowest degree first, f monic."""
    e = len(f) - 1
    out = [0] * (2 * e - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = (out[i + j] + x * y) % p
    for d in range(len(out) - 1, e - 1, -1):
        c = out[d]
        if c:
            for i in range(e + 1):
                out[d - e + i] = (out[d - e + i] - c * f[i]) % p
    return tuple(out[:e])


def _field_elements(p: int, e: int) -> list[tuple[int, ...]]:
    return [tuple(c) for c in itertools.product(range(p), repeat=e)]


def _irreducible(p: int, e: int) -> tuple[int, ...]:
    """A monic irreducible polynomial of degree e over GF(p): its quotient ring has no zero divisors."""
    elements = _field_elements(p, e)[1:]
    for tail in itertools.product(range(p), repeat=e):
        f = (*tail, 1)
        if tail[0] == 0:
            continue
        if all(any(v for v in _poly_mulmod(a, b, f, p)) for a in elements for b in elements):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # pragma: no cover


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(x_j - x_i) over GF(q), chi the quadratic character."""
    pe = _prime_power(q)
    assert pe is not None
    p, e = pe
    elements = _field_elements(p, e)
    f = _irreducible(p, e) if e > 1 else (0, 1)
    squares = {_poly_mulmod(a, a, f, p) for a in elements[1:]}
    index = {x: i for i, x in enumerate(elements)}
    chi = np.zeros(q, dtype=np.int64)
    for x in elements[1:]:
        chi[index[x]] = 1 if x in squares else -1
    diff = np.empty((q, q), dtype=np.int64)
    for i, x in enumerate(elements):
        for j, y in enumerate(elements):
            diff[i, j] = index[tuple((b - a) % p for a, b in zip(x, y, strict=True))]
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    jac = _jacobsthal(q)
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + np.eye(n, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    jac = _jacobsthal(q)
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


@functools.cache
def _base(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from Sylvester, Paley I or Paley II alone, or None."""
    if m & (m - 1) == 0:  # powers of two: Sylvester, so the 2**k part admits a fast Walsh-Hadamard transform
        h = np.ones((1, 1), dtype=np.int64)
        while h.shape[0] < m:
            h = np.block([[h, h], [h, -h]])
        return h
    if m % 4:
        return None
    q = m - 1
    if _prime_power(q) and q % 4 == 3:
        return _paley1(q)
    q = m // 2 - 1
    if _prime_power(q) and q % 4 == 1:
        return _paley2(q)
    return None


@functools.cache
def _construct(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from the base constructions and Kronecker products."""
    h = _base(m)
    if h is not None:
        return h
    for d in range(2, int(m**0.5) + 1):
        if m % d == 0:
            a, b = _construct(d), _construct(m // d)
            if a is not None and b is not None:
                return np.kron(a, b)
    return None


@dataclass(frozen=True)
class HadamardFactors:
    """H_n = kron(A, B) / sqrt(n) with A of order m (any construction) and B Sylvester of order 2**k.

    `apply` computes x @ H_n on the last axis as A.T @ X @ B with X = x reshaped to [..., m, 2**k],
    which is what the ONNX function body of rotgraph's `Hadamard` op does.
    """

    n: int
    a: np.ndarray  # [m, m], entries +-1
    b: np.ndarray  # [p, p], entries +-1

    @property
    def m(self) -> int:
        return self.a.shape[0]

    @property
    def p(self) -> int:
        return self.b.shape[0]

    def matrix(self) -> np.ndarray:
        """The orthonormal matrix H_n (float64)."""
        return np.kron(self.a, self.b).astype(np.float64) / np.sqrt(self.n)

    def apply(self, x: np.ndarray) -> np.ndarray:
        xr = x.reshape(*x.shape[:-1], self.m, self.p)
        y = np.swapaxes(self.a, 0, 1) @ (xr @ self.b)
        return y.reshape(x.shape) / np.sqrt(self.n)


MAX_SYLVESTER_FACTOR = 1024  # B's order cap: the online op stores B densely and multiplies by it


@functools.cache
def hadamard_factors(n: int) -> HadamardFactors | None:
    """The factorization with the largest power-of-two part for which a matrix of order m exists.

    A power-of-two part above MAX_SYLVESTER_FACTOR is split: B = Sylvester(1024) and the rest joins A as
    kron(A, Sylvester(q)), which is the same matrix (Sylvester matrices are Kronecker powers), with
    O(n (m q + 1024)) work instead of O(n 2^k) and a 4 MB instead of a 2^(2k+2)-byte constant.
    """
    p = 1
    while n % (2 * p) == 0:
        p *= 2
    while p >= 1:
        a = _construct(n // p)
        if a is not None:
            if p > MAX_SYLVESTER_FACTOR:
                a, p = np.kron(a, _construct(p // MAX_SYLVESTER_FACTOR)), MAX_SYLVESTER_FACTOR
            b = _construct(p)
            assert b is not None
            return HadamardFactors(n, a, b)
        p //= 2
    return None


def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix (entries +-1, H H^T = n I) of order n, or None if rotgraph knows none."""
    f = hadamard_factors(n)
    return None if f is None else np.kron(f.a, f.b)


def random_hadamard(n: int, rng: np.random.Generator) -> np.ndarray | None:
    """P H D / sqrt(n): a Hadamard matrix with rows permuted and columns sign-flipped at random."""
    h = hadamard(n)
    if h is None:
        return None
    signs = rng.choice(np.array([-1.0, 1.0]), size=n)
    perm = rng.permutation(n)
    return h[perm].astype(np.float64) * signs[None, :] / np.sqrt(n)


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed random orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def random_rotation(n: int, rng: np.random.Generator, *, what: str) -> tuple[np.ndarray, str]:
    """A randomized Hadamard of order n, or a random orthogonal matrix where none is known.

    Returns the float64 matrix and its kind ("hadamard" or "orthogonal"); the fallback is logged.
    """
    h = random_hadamard(n, rng)
    if h is not None:
        return h, "hadamard"
    logger.warning(
        "no Hadamard matrix of order %d is known to rotgraph; %s uses a seeded random orthogonal matrix",
        n,
        what,
    )
    return random_orthogonal(n, rng), "orthogonal"
