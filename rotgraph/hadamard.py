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

    @functools.cached_property
    def a_float64(self) -> np.ndarray:
        """A as a contiguous float64 matrix (what the compiled rotation reads)."""
        return np.ascontiguousarray(self.a, dtype=np.float64)

    @functools.cached_property
    def a_float64_t(self) -> np.ndarray:
        """A^T, contiguous float64."""
        return np.ascontiguousarray(self.a.T, dtype=np.float64)

    @functools.cached_property
    def kronecker_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """H = kron(A, B) regrouped as kron(F1, F2) (float64, entries +-1): F2 = S_q, the Sylvester matrix of
        an order q dividing p, and F1 = kron(A, S_(p/q)), with q chosen so that order(F1) + q is least.
        v @ H is then two matrix products of about 2 sqrt(n) multiply-adds per element in all (Sylvester
        matrices are Kronecker powers, so this is the same matrix)."""
        q = min((1 << k for k in range(self.p.bit_length())), key=lambda q: self.m * (self.p // q) + q)
        outer, inner = _base(self.p // q), _base(q)
        assert outer is not None and inner is not None  # powers of two
        return np.kron(self.a, outer).astype(np.float64), inner.astype(np.float64)

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


def _kron_apply(x: np.ndarray, f1: np.ndarray, f2: np.ndarray, pre: int, post: int) -> np.ndarray:
    """v -> v @ kron(f1, f2) along the middle axis of x viewed as [pre, n, post]: with v as [n1, n2], the
    product with f2 on its second index, then with f1 on its first (v[i1, i2] f1[i1, j1] f2[i2, j2]),
    each one BLAS product (or a stack of them) over the whole array."""
    n1, n2 = f1.shape[0], f2.shape[0]
    if post == 1:
        y = (x.reshape(pre * n1, n2) @ f2).reshape(pre, n1, n2)
    else:
        y = np.matmul(f2.T, x.reshape(pre * n1, n2, post)).reshape(pre, n1, n2 * post)
    y = f1.T @ y[0] if pre == 1 else np.matmul(f1.T, y)  # contracts i1: out[j1] = sum_i1 f1[i1, j1] y[i1]
    return y.reshape(pre, n1 * n2, post)


@dataclass(frozen=True, eq=False)
class HadamardRotation:
    """The orthogonal Q = P H D / sqrt(n) kept as its factors, H = kron(A, B) (`HadamardFactors`):
    Q[i, j] = H[perm[i], j] * signs[j] / sqrt(n) (no `perm`: P = I; no `signs`: D = I), or Q^T when
    `transposed`.

    `apply` computes v @ Q (v @ Q^T when transposed) for the vectors along one axis in float64: a gather by
    the permutation, H, and a scaling by signs / sqrt(n). H runs as butterflies and A's m x m mix (n
    (log2 p + m) adds per vector) in rotgraph's compiled library where it is built, else as two numpy
    matrix products with Kronecker factors of about sqrt(n) (`HadamardFactors.kronecker_pair`: radix-2
    stages in numpy make one memory pass per bit and were slower: benchmarks/RESULTS.md, "Fast rotation
    (issue 28)"). `matrix` is the dense form, equal bit for bit to the product `random_hadamard` returns
    for the same draws.
    """

    factors: HadamardFactors
    perm: np.ndarray | None = None  # [n] ints: Q's row i is H's row perm[i]
    signs: np.ndarray | None = None  # [n] +-1.0: Q's column j is multiplied by signs[j]
    transposed: bool = False

    @property
    def n(self) -> int:
        return self.factors.n

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    @property
    def T(self) -> HadamardRotation:  # named as numpy's .T, so the passes treat both forms alike
        return HadamardRotation(self.factors, self.perm, self.signs, not self.transposed)

    def matrix(self) -> np.ndarray:
        """Q (or Q^T) as a dense float64 matrix."""
        f, n = self.factors, self.n
        h = np.kron(f.a, f.b)
        q = (h if self.perm is None else h[self.perm]).astype(np.float64)
        q = q * self.signs[None, :] / np.sqrt(n) if self.signs is not None else q / np.sqrt(n)
        return np.ascontiguousarray(q.T) if self.transposed else q

    def apply(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        """v @ Q (v @ Q^T when transposed) for every vector v along `axis` of x, in float64: axis -1 is
        X @ Q (rows independent), axis 0 of a matrix X is Q^T X (columns independent). H runs as butterflies
        in rotgraph's compiled library (`rotgraph.kernels.weight_functions`) where it is built, else as two
        numpy products by its Kronecker factors; the two agree to float64 rounding."""
        from rotgraph.kernels import weight_functions

        x = np.asarray(x)
        axis %= x.ndim
        n = self.n
        if x.shape[axis] != n:
            raise ValueError(f"cannot apply a rotation of order {n} to axis {axis} of shape {x.shape}")
        pre, post = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1 :]))
        v = x.reshape(pre, n, post)
        scale = (np.ones(n) if self.signs is None else self.signs) / np.sqrt(n)
        functions = weight_functions()
        compiled = None if functions is None else functions.rotate_f64
        f = self.factors
        if not self.transposed:  # v @ Q = ((v permuted by perm^-1) @ H) * signs / sqrt(n)
            u = v if self.perm is None else np.take(v, self.inverse_perm, axis=1)
            if compiled is not None:
                y = u.astype(np.float64, order="C", copy=u is v)  # ours to write
                compiled(y, pre, f.m, f.p, post, f.a_float64, scale)
                return y.reshape(x.shape)
            u = u.astype(np.float64, copy=False)  # the products below never write to it
            y = _kron_apply(u, *f.kronecker_pair, pre, post)
            y *= scale[None, :, None]
        else:  # v @ Q^T = ((v * signs / sqrt(n)) @ H^T) permuted by perm, H^T = kron(A^T, B) (B symmetric)
            u = np.ascontiguousarray(v * scale[None, :, None])
            if compiled is not None:
                compiled(u, pre, f.m, f.p, post, f.a_float64_t, None)
                y = u
            else:
                f1, f2 = f.kronecker_pair
                y = _kron_apply(u, f1.T, f2.T, pre, post)
            if self.perm is not None:
                y = np.take(y, self.perm, axis=1)
        return y.reshape(x.shape)

    @functools.cached_property
    def inverse_perm(self) -> np.ndarray:
        assert self.perm is not None
        return np.argsort(self.perm)


Matrix = np.ndarray | HadamardRotation  # a rotation as the weight steps take it: dense, or factored


def randomized_hadamard(n: int, rng: np.random.Generator) -> HadamardRotation | None:
    """P H D / sqrt(n), factored: a Hadamard matrix with rows permuted and columns sign-flipped at random."""
    f = hadamard_factors(n)
    if f is None:
        return None
    signs = rng.choice(np.array([-1.0, 1.0]), size=n)
    perm = rng.permutation(n)
    return HadamardRotation(f, perm, signs)


def random_hadamard(n: int, rng: np.random.Generator) -> np.ndarray | None:
    """P H D / sqrt(n) as a dense matrix (the draws of `randomized_hadamard`)."""
    q = randomized_hadamard(n, rng)
    return None if q is None else q.matrix()


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed random orthogonal matrix (QR of a Gaussian matrix with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def dense(q: Matrix) -> np.ndarray:
    """A rotation as a dense float64 matrix."""
    return q.matrix() if isinstance(q, HadamardRotation) else q


def random_rotation(n: int, rng: np.random.Generator, *, what: str) -> tuple[Matrix, str]:
    """A randomized Hadamard of order n (factored), or a random orthogonal matrix where none is known.

    Returns the rotation and its kind ("hadamard" or "orthogonal"); the fallback is logged.
    """
    h = randomized_hadamard(n, rng)
    if h is not None:
        return h, "hadamard"
    logger.warning(
        "no Hadamard matrix of order %d is known to rotgraph; %s uses a seeded random orthogonal matrix",
        n,
        what,
    )
    return random_orthogonal(n, rng), "orthogonal"
