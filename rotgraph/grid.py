"""The integer grids of rotgraph's quantizers and the dynamic quantizer's arithmetic, stated once.

Every quantizer in rotgraph maps a real value x to an integer code on one of two grids of `bits` bits:

    symmetric   codes in [-2^(b-1), 2^(b-1) - 1] (signed), zero point 0
    asymmetric  codes in [0, 2^b - 1]            (unsigned), zero point a code of the grid

and back to code - zero times scale. The weight quantizers (rotgraph.quant: RTN with a clipping search,
GPTQ) choose their scales offline on these grids. The dynamic quantizer (the `FakeQuant` op, the stored
KV cache, the torch fake quant SpinQuant learns through, the compiled kernels) computes them per group of
the last axis from the values themselves:

    symmetric   scale = max(max|x| * (clip / qmax) + sum(0 * x), EPS)
                code  = clip(round(x / scale), qmin, qmax)
    asymmetric  hi = max(max x, 0) * clip, lo = min(min x, 0) * clip   (the range widened to contain 0)
                scale = max((hi - lo) / qmax + sum(0 * x), EPS)
                zero  = round(-lo / scale)
                code  = clip(round(x / scale) + zero, 0, qmax)
    dequantized value = (code - zero) * scale

`round` is round half to even everywhere (numpy's `round`, ONNX `Round`, C's `nearbyint`). `clip` is the
float32 the node attribute holds (`clip_value`), and the symmetric ratio clip / qmax is one constant
computed in double and rounded to the working precision (`symmetric_ratio`), so the numpy code here, the
ONNX function bodies (rotgraph.fakequant, rotgraph.kvcache) and the C++ kernels
(rotgraph/kernels/rotgraph_ops.cc, `Quantizer`) agree to the last bit in float32; tests/test_grid.py
checks the three on edge values.

NaN and infinity: sum(0 * x) is 0 for a group of finite values (adding it changes nothing) and NaN for a
group holding a NaN or an infinity, so such a group's scale is NaN and so is every output of the group.
The term is there because a max or min over a NaN is not defined the same way everywhere (onnxruntime's
vectorized ReduceMax drops a NaN, and neighbours with it, depending on its position). A stored cache's code
and zero point of a NaN group are 0 (what onnxruntime's Cast of NaN gives on x86-64; C++ leaves it
undefined, so the kernel says so explicitly).
"""

from __future__ import annotations

import numpy as np

# The smallest scale: an all-zero group quantizes to zeros instead of dividing by zero.
EPS = 1e-8


def qmin(bits: int, symmetric: bool) -> int:
    """The smallest code of the grid."""
    return -(2 ** (bits - 1)) if symmetric else 0


def qmax(bits: int, symmetric: bool) -> int:
    """The largest code of the grid."""
    return 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1


def clip_value(clip: float) -> float:
    """The clipping ratio as every implementation uses it: the float32 that the node attribute holds."""
    return float(np.float32(clip))


def symmetric_ratio(bits: int, clip: float) -> float:
    """clip / qmax of the symmetric dynamic quantizer, in double (one constant, rounded once to the
    working precision by whoever uses it)."""
    return clip_value(clip) / qmax(bits, True)


def dynamic_params(x: np.ndarray, bits: int, symmetric: bool, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each group (row of the last axis) of x, in x's floating-point dtype,
    with the last axis kept (length 1)."""
    t = x.dtype.type
    # 0 for a group of finite values, NaN for one with a NaN or an infinity
    nonfinite = np.where(np.isfinite(x).all(axis=-1, keepdims=True), t(0), t(np.nan))
    if symmetric:
        amax = np.abs(x).max(axis=-1, keepdims=True)
        scale = np.maximum(amax * t(symmetric_ratio(bits, clip)) + nonfinite, t(EPS))
        return scale, np.zeros_like(scale)
    c = t(clip_value(clip))
    hi = np.maximum(x.max(axis=-1, keepdims=True), t(0)) * c
    lo = np.minimum(x.min(axis=-1, keepdims=True), t(0)) * c
    scale = np.maximum((hi - lo) / t(qmax(bits, False)) + nonfinite, t(EPS))
    return scale, np.round(-lo / scale)


def dynamic_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Codes (as floats of x's dtype) of x on the grid, given per-group scale and zero (broadcast)."""
    t = x.dtype.type
    q = np.round(x / scale)
    if not symmetric:  # symmetric: zero is 0, and the bodies do not add it
        q = q + zero
    return np.clip(q, t(qmin(bits, symmetric)), t(qmax(bits, symmetric)))


def fake_quant(x: np.ndarray, bits: int, symmetric: bool, clip: float) -> np.ndarray:
    """Dynamic quantize-dequantize of each row of x's last axis, in x's floating-point dtype."""
    scale, zero = dynamic_params(x, bits, symmetric, clip)
    q = dynamic_codes(x, scale, zero, bits, symmetric)
    return (q * scale) if symmetric else (q - zero) * scale
