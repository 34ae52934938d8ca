"""rotgraph's `FakeQuant` op: dynamic quantize-dequantize over groups of the last axis.

One overload per configuration (`b8s_g0_c100`: 8 bits, symmetric, group = whole last axis, clip 1.00),
each carried in the model as an ONNX function in standard ops (Reshape, ReduceMax/Min, Div, Round,
Clip, Mul), so every runtime computes it. Per-token activation quantization is a group of the whole
hidden axis; KV-cache quantization per token and head is a group of head_dim (or smaller groups).
The grid and the arithmetic (symmetric: scale = clip * max|x| / qmax; asymmetric: scale = clip * (max -
min) / qmax over the group's range widened to contain 0, zero = round(-clip * min / scale)) are those of
`rotgraph.grid`, which the body's constants come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rotgraph import grid
from rotgraph.constants import ROTGRAPH_DOMAIN
from rotgraph.errors import RotgraphError
from rotgraph.online import FunctionBuilder, insert_after_value


@dataclass(frozen=True)
class ActSpec:
    bits: int
    symmetric: bool = True
    group: int = 0  # 0: the whole last axis
    clip: float = 1.0

    @property
    def overload(self) -> str:
        return f"b{self.bits}{'s' if self.symmetric else 'a'}_g{self.group}_c{round(self.clip * 100)}"

    def attributes(self) -> list[ir.Attr]:
        """The node attributes the compiled kernel reads (the function body has them as constants)."""
        return [
            ir.AttrInt64("bits", self.bits),
            ir.AttrInt64("symmetric", int(self.symmetric)),
            ir.AttrInt64("group", self.group),
            ir.AttrFloat32("clip", self.clip),
        ]

    @classmethod
    def from_overload(cls, overload: str) -> ActSpec:
        """The spec whose `overload` name this is (the FakeQuant function of a saved model)."""
        m = re.fullmatch(r"b(\d+)([sa])_g(\d+)_c(\d+)", overload)
        if m is None:
            raise RotgraphError(f"not a FakeQuant overload: {overload!r}")
        return cls(int(m[1]), m[2] == "s", int(m[3]), int(m[4]) / 100)

    @property
    def qmax(self) -> int:
        return grid.qmax(self.bits, self.symmetric)

    @property
    def qmin(self) -> int:
        return grid.qmin(self.bits, self.symmetric)

    def reference(self, x: np.ndarray, dtype: type[np.floating] = np.float64) -> np.ndarray:
        """The same computation in numpy (`rotgraph.grid`), in float64 by default (for tests and for
        learning); in float32 it is the function body's arithmetic, bit for bit."""
        g = self.group or x.shape[-1]
        y = grid.fake_quant(x.reshape(-1, g).astype(dtype), self.bits, self.symmetric, self.clip)
        return y.reshape(x.shape)


def _function(spec: ActSpec, dtype: ir.DataType) -> ir.Function:
    """The body in float32 arithmetic whatever `dtype` is (float16 or bfloat16 values are cast to float32 and
    back: grid.EPS is no float16 number, and a bfloat16 quotient misses 8-bit codes), float64 in float64."""
    wide = ir.DataType.DOUBLE if dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT
    f = wide.numpy()
    x_in = ir.Value(name="X")
    b = FunctionBuilder()
    op, const = b.op, b.const
    x = x_in if dtype == wide else op("Cast", x_in, to=wide)

    if spec.group:  # groups of the last axis; the whole axis needs no reshape and fits any width
        shape = op("Shape", x)
        xr = op("Reshape", x, const("groups", np.array([-1, spec.group], dtype=np.int64)))
    else:
        xr = x
    axes = const("axes", np.array([-1], dtype=np.int64))
    eps = const("eps", np.array(grid.EPS, dtype=f))
    lo_q, hi_q = const("qmin", np.array(spec.qmin, dtype=f)), const("qmax", np.array(spec.qmax, dtype=f))
    # clip as the float32 node attribute holds it, so the compiled kernel computes the same ratio
    ratio = const("ratio", np.array(grid.symmetric_ratio(spec.bits, spec.clip), dtype=f))
    # sum(0 * x): 0, or NaN for a group with a NaN or an infinity, which then gives NaN throughout (grid)
    nonfinite = op("ReduceSum", op("Mul", xr, const("nothing", np.array(0.0, dtype=f))), axes, keepdims=1)
    if spec.symmetric:
        amax = op("ReduceMax", op("Abs", xr), axes, keepdims=1)
        scale = op("Max", op("Add", op("Mul", amax, ratio), nonfinite), eps)
        y = op("Mul", op("Clip", op("Round", op("Div", xr, scale)), lo_q, hi_q), scale)
    else:
        zero_f = const("zero", np.array(0.0, dtype=f))
        clip = const("clip", np.array(grid.clip_value(spec.clip), dtype=f))
        hi = op("Mul", op("Max", op("ReduceMax", xr, axes, keepdims=1), zero_f), clip)
        lo = op("Mul", op("Min", op("ReduceMin", xr, axes, keepdims=1), zero_f), clip)
        scale = op("Max", op("Add", op("Div", op("Sub", hi, lo), hi_q), nonfinite), eps)
        zp = op("Round", op("Div", op("Neg", lo), scale))
        q = op("Clip", op("Add", op("Round", op("Div", xr, scale)), zp), zero_f, hi_q)
        y = op("Mul", op("Sub", q, zp), scale)
    if dtype != wide:
        y = op("Cast", y, to=dtype)
    out = op("Reshape", y, shape) if spec.group else op("Identity", y)
    out.name = "Y"
    return b.function("FakeQuant", spec.overload, [x_in], [out])


def insert_fake_quant(model: ir.Model, value: ir.Value, spec: ActSpec) -> ir.Node:
    """Insert y = FakeQuant(value) and make every former consumer of `value` read y."""
    key = (ROTGRAPH_DOMAIN, "FakeQuant", spec.overload)
    if key not in model.functions:
        model.functions[key] = _function(spec, value.dtype or ir.DataType.FLOAT)
    node = ir.Node(ROTGRAPH_DOMAIN, "FakeQuant", [value], spec.attributes(), overload=spec.overload, num_outputs=1)
    insert_after_value(model, value, node, suffix="fakequant")
    return node
