"""The dynamic quantizer's three implementations against one reference written here, bit for bit.

rotgraph.grid states the integer grids and the dynamic quantizer's arithmetic once; the numpy code
(`ActSpec.reference` in float32, `CacheSpec.quantize`), the ONNX function bodies run by onnxruntime with
every graph rewrite off, and the compiled kernels (rotgraph/kernels/rotgraph_ops.cc) each implement it.
`reference` below restates the arithmetic element by element in float32, from the formulas rather than
from rotgraph's code, and every implementation must equal it on edge values: exact ties (x / scale =
k + 1/2, which round half to even decides), values on and just beyond the clipping boundary, all-zero
groups, a huge outlier, negative-only groups, values below the smallest scale, signed zeros, NaN.
Outputs are compared bit for bit, except that +0 and -0 count as equal: onnxruntime's Max of -0 and +0
returns either, so the sign of a zero output is not part of the contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from rotgraph import grid, io, kernels
from rotgraph.evaluate import make_session
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.kvcache import CacheSpec, add_functions, dequantize_node, quantize_node

F = np.float32
G = 16  # the group size of the edge-value rows


@pytest.fixture(scope="module", autouse=True)
def library() -> None:
    path = kernels.library_path()
    assert path is not None, f"rotgraph's kernels are not built: {kernels.BUILD_HINT}"
    assert kernels.unsupported_reason(path) is None


def grid_bounds(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def reference_group(row: np.ndarray, bits: int, symmetric: bool, clip: float) -> tuple[np.ndarray, F, F]:
    """(dequantized values, scale, zero) of one group, one float32 operation at a time."""
    with np.errstate(over="ignore", invalid="ignore"):  # the groups that overflow to inf
        return _reference_group(row, bits, symmetric, clip)


def _reference_group(row: np.ndarray, bits: int, symmetric: bool, clip: float) -> tuple[np.ndarray, F, F]:
    lo_q, hi_q = grid_bounds(bits, symmetric)
    c = F(clip)  # the float32 node attribute
    if not all(np.isfinite(v) for v in row):  # a NaN or an infinity: NaN throughout
        return np.full_like(row, np.nan), F(np.nan), F(np.nan)
    if symmetric:
        amax = max(abs(v) for v in row)
        ratio = F(float(c) / hi_q)  # clip / qmax in double, rounded once
        scale, zero = max(F(amax * ratio), F(1e-8)), F(0)
    else:
        hi = F(max(max(row), F(0)) * c)
        lo = F(min(min(row), F(0)) * c)
        scale = max(F(F(hi - lo) / F(hi_q)), F(1e-8))
        zero = F(np.round(F(-lo / scale)))
    out = np.empty_like(row)
    for i, v in enumerate(row):
        q = F(np.round(F(v / scale)))  # half to even
        if not symmetric:
            q = F(q + zero)
        q = F(min(max(q, F(lo_q)), F(hi_q)))
        out[i] = F(q * scale) if symmetric else F(F(q - zero) * scale)
    return out, scale, zero


def reference(x: np.ndarray, bits: int, symmetric: bool, clip: float, group: int) -> np.ndarray:
    rows = x.reshape(-1, group)
    return np.stack([reference_group(r, bits, symmetric, clip)[0] for r in rows]).reshape(x.shape)


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit for bit (NaN where NaN; +0 and -0 equal)."""
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    g, w = got[~nan], want[~nan]
    bits = g.view(np.uint32 if g.dtype == np.float32 else np.uint8)
    same = (bits == w.view(bits.dtype)) | ((g == 0) & (w == 0))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, f"{what}: {bad.size} values differ, first {g[bad[:5]]} != {w[bad[:5]]}"


def anchor(scale: F, ratio: F) -> F:
    """An amax whose symmetric scale amax * ratio is exactly `scale` in float32 (the nearest try when none
    is), so that chosen multiples of the scale are exact ties."""
    a = F(scale / ratio)
    for step in range(64):
        for candidate in (a, np.nextafter(a, F(np.inf))):
            if F(candidate * ratio) == scale:
                return F(candidate)
        a = np.nextafter(a, F(-np.inf) if F(a * ratio) > scale else F(np.inf))
        del step
    return a


def pad(values: list[float] | np.ndarray, fill: float = 0.0) -> np.ndarray:
    row = np.full(G, fill, F)
    values = np.asarray(values, F)[:G]
    row[: len(values)] = values
    return row


def edge_rows(bits: int, symmetric: bool, clip: float) -> np.ndarray:
    """Groups of G values that put each implementation on an edge of the quantizer."""
    lo_q, hi_q = grid_bounds(bits, symmetric)
    c = F(clip)
    s = F(0.125)  # a power of two: multiples of it are exact in float32
    rows = []
    if symmetric:
        amax = anchor(s, F(float(c) / hi_q))
        scale = F(amax * F(float(c) / hi_q))
        ties = [F((k + 0.5) * scale) for k in range(lo_q, hi_q + 1)]
        rows.append(pad([amax, *[t for t in ties if abs(t) <= amax]]))
        beyond = [hi_q, hi_q + 0.5, hi_q + 1, lo_q, lo_q - 0.5, lo_q - 1]
        edge = [F(k * scale) for k in beyond]
        edge += [np.nextafter(F((hi_q + 0.5) * scale), F(np.inf)), np.nextafter(F((lo_q - 0.5) * scale), F(-np.inf))]
        rows.append(pad([amax, -amax, *[e for e in edge if abs(e) <= amax]]))
    else:
        z = hi_q // 3
        lo, hi = F(-(z + 0.5) * s), F((hi_q - z - 0.5) * s)  # zero = round(z + 1/2): a tie too
        ties = [F(lo + k * s) for k in range(hi_q + 1)]
        rows.append(pad([lo, hi, *ties[1:]]))
        lo_c, hi_c = F(lo * c), F(hi * c)
        scale = F(F(hi_c - lo_c) / F(hi_q))
        zero = np.round(-lo_c / scale)
        edge = [F((k - zero) * scale) for k in (hi_q, hi_q + 0.5, hi_q + 1, -0.5, -1)]
        edge += [np.nextafter(F((hi_q + 0.5 - zero) * scale), F(np.inf))]
        rows.append(pad([lo, hi, *[e for e in edge if lo <= e <= hi]]))
        rows.append(pad(-np.arange(1, G + 1) * 0.37))  # negative only: hi = 0
        rows.append(pad(np.arange(1, G + 1) * 0.37))  # positive only: lo = 0
    rows.append(np.zeros(G, F))  # all zero: the scale is the smallest one
    rows.append(pad([-0.0, 0.0, -0.0, 1e-12], fill=-0.0))
    rows.append(pad([3e-9, -2e-9, 5e-10, -7e-9]))  # below the smallest scale
    rows.append(pad([1e6, *np.linspace(-1e-3, 1e-3, G - 1)]))  # one huge outlier
    rows.append(pad([3e38, 1.0, -1.0, 2.5]))  # near the float32 maximum
    rows.append(pad([3e38, -3e38, 1.0]))  # hi - lo overflows to inf
    rows.append(pad([np.nan, 1.0, -2.0, 3.0]))  # NaN: the whole group is NaN
    rows.append(pad([1.0, 2.0, -2.0, 3.0, 0.25, np.nan]))
    rows.append(pad([-4.0, 2.0, np.inf, 1.0]))  # an infinity too
    rows.append(np.random.default_rng(bits).standard_normal(G).astype(F) * 3)
    return np.stack(rows)


def fake_quant_model(spec: ActSpec, width: int, path: Path) -> Path:
    x = ir.Value(name="x", shape=ir.Shape(["rows", width]), type=ir.TensorType(ir.DataType.FLOAT))
    model = ir.Model(ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g"), ir_version=10)
    model.graph.outputs.append(insert_fake_quant(model, x, spec).outputs[0])
    io.save_model(model, path)
    return path


def run_both(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> tuple[list, list]:
    """Outputs of the function bodies and of the kernels, every graph rewrite off."""
    body = make_session(path, "disable", threads=threads, kernels=False).run(None, feeds)
    kernel = make_session(path, "disable", threads=threads, kernels=True).run(None, feeds)
    return body, kernel


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7, 8])
def test_fake_quant_implementations_agree_bit_for_bit(tmp_path, bits: int, symmetric: bool, clip: float) -> None:
    data = edge_rows(bits, symmetric, clip)
    if len(data) % 2:
        data = np.concatenate([data, np.zeros((1, G), F)])
    want = reference(data, bits, symmetric, clip, G)
    with np.errstate(invalid="ignore", over="ignore"):
        for group, width in ((G, 2 * G), (0, G)):  # groups of a wider last axis, and the whole axis
            spec = ActSpec(bits, symmetric, group, clip)
            x = data.reshape(-1, width)
            (body,), (kernel,) = run_both(fake_quant_model(spec, width, tmp_path / f"fq{group}.onnx"), {"x": x})
            assert_same(body, want.reshape(x.shape), f"function body, group {group}")
            assert_same(kernel, want.reshape(x.shape), f"kernel, group {group}")
            assert_same(spec.reference(x, np.float32), want.reshape(x.shape), f"rotgraph.grid, group {group}")


def test_the_edge_rows_hit_the_edges() -> None:
    """The tie rows really are ties, and rows do reach beyond the clipping boundary (else the test above
    would prove less than it claims)."""
    for bits in (3, 8):
        rows = edge_rows(bits, True, 1.0)
        _, scale, _ = reference_group(rows[0], bits, True, 1.0)
        q = rows[0][1:] / scale
        assert np.count_nonzero(q == np.floor(q) + 0.5) >= 2
        rows = edge_rows(bits, False, 1.0)
        _, scale, zero = reference_group(rows[0], bits, False, 1.0)
        assert -rows[0][0] / scale == zero + 0.5 or -rows[0][0] / scale == zero - 0.5  # the zero point is a tie
    rows = edge_rows(4, True, 0.9)
    out, scale, _ = reference_group(rows[1], 4, True, 0.9)
    assert np.any(rows[1] / scale > grid.qmax(4, True))  # beyond the boundary: clipped to qmax
    assert out.max() == grid.qmax(4, True) * scale and out.min() == grid.qmin(4, True) * scale


@pytest.mark.parametrize("spec", [ActSpec(4, True, 8, 1.0), ActSpec(4, False, 8, 1.0), ActSpec(8, False, 0, 0.9)])
def test_nan_gives_the_same_outputs_as_the_function_body(tmp_path, spec: ActSpec) -> None:
    """A NaN (or an infinity) anywhere in a group makes the whole group NaN, in the kernel as in the body;
    the other groups are untouched."""
    g = spec.group or 16
    data = np.random.default_rng(0).standard_normal((g + 2, 16)).astype(F)
    for i in range(g):  # row i has a NaN at position i of its first group
        data[i, i] = np.nan
    data[g, 3] = np.inf
    (body,), (kernel,) = run_both(fake_quant_model(spec, 16, tmp_path / "fq.onnx"), {"x": data})
    assert_same(kernel, body, "kernel vs body")
    groups, finite = kernel.reshape(-1, g), np.isfinite(data.reshape(-1, g)).all(axis=1)
    assert np.isnan(groups[~finite]).all() and not np.isnan(groups[finite]).any()
    clean = data.reshape(-1, g)[finite]
    np.testing.assert_array_equal(groups[finite], reference(clean, spec.bits, spec.symmetric, spec.clip, g))


def kv_model(spec: CacheSpec, path: Path) -> Path:
    x = ir.Value(name="x", shape=ir.Shape([1, 1, "seq", spec.head_dim]), type=ir.TensorType(ir.DataType.FLOAT))
    model = ir.Model(ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g"), ir_version=10)
    add_functions(model, spec)
    quantize = quantize_node(spec, x)
    dequantize = dequantize_node(spec, *quantize.outputs)
    model.graph.extend([quantize, dequantize])
    model.graph.outputs.extend([*quantize.outputs, dequantize.outputs[0]])
    io.save_model(model, path)
    return path


@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("bits", [4, 8])
def test_kv_cache_implementations_agree_bit_for_bit(tmp_path, bits: int, clip: float) -> None:
    data = edge_rows(bits, False, clip)
    head_dim = 2 * G
    spec = CacheSpec(bits, head_dim, G, clip)
    if len(data) % 2:
        data = np.concatenate([data, np.zeros((1, G), F)])
    x = data.reshape(1, 1, -1, head_dim)
    groups = data.reshape(-1, G)
    parts = [reference_group(r, bits, False, clip) for r in groups]
    codes = np.empty(groups.shape, np.uint8)
    for i, (row, (_, scale, zero)) in enumerate(zip(groups, parts, strict=True)):
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.clip(np.round(row / scale) + zero, 0, (1 << bits) - 1)
        codes[i] = np.where(np.isnan(q), 0, q).astype(np.uint8)  # NaN: code 0, as onnxruntime's Cast gives
    scales = np.array([p[1] for p in parts], F)
    zeros = np.array([0 if np.isnan(p[2]) else p[2] for p in parts]).astype(np.uint8)
    with np.errstate(invalid="ignore"):  # the stored codes dequantize through the stored scale and zero
        values = ((codes.astype(F) - zeros[:, None].astype(F)) * scales[:, None]).reshape(x.shape)
    codes = codes.reshape(x.shape)
    if bits == 4:
        codes = codes[..., : head_dim // 2] | (codes[..., head_dim // 2 :] << 4)
    want = [codes, scales.reshape(1, 1, -1, 2), zeros.reshape(1, 1, -1, 2), values]
    with np.errstate(invalid="ignore", over="ignore"):
        body, kernel = run_both(kv_model(spec, tmp_path / "kv.onnx"), {"x": x})
        numpy_codes = spec.quantize(x)
        numpy_values = spec.dequantize(*numpy_codes)
    for name, a, b, c, w in zip(
        ["codes", "scale", "zero", "dequantized"], body, kernel, [*numpy_codes, numpy_values], want, strict=True
    ):
        assert_same(a, w, f"body {name}")
        assert_same(b, w, f"kernel {name}")
        assert_same(c, w, f"rotgraph.kvcache {name}")


def test_grid_bounds() -> None:
    for bits in range(2, 9):
        assert (grid.qmin(bits, True), grid.qmax(bits, True)) == grid_bounds(bits, True)
        assert (grid.qmin(bits, False), grid.qmax(bits, False)) == grid_bounds(bits, False)
    assert (grid.qmin(4, True), grid.qmax(4, True), grid.qmax(4, False)) == (-8, 7, 15)
