"""rotgraph's stored KV cache: `KVQuantize` and `KVDequantize`, asymmetric integer codes per token and head.

`KVQuantize[b{bits}_d{head_dim}_g{group}_c{clip}](X) -> (codes, scale, zero)` quantizes X [batch,
kv_heads, seq, head_dim] in groups of the last axis with the same arithmetic as the asymmetric
`FakeQuant` (scale = clip * (max - min) / qmax over the group's range widened to contain 0, zero =
round(-clip * min / scale)). The codes are uint8 [batch, kv_heads, seq, head_dim] at 8 bits and
[.., head_dim / 2] at 4 bits, two codes per byte (element i in the low nibble, element i + head_dim/2 in
the high nibble); scale is float32 and zero uint8, both [batch, kv_heads, seq, head_dim / group].
`KVDequantize(codes, scale, zero) -> X` is the inverse: (code - zero) * scale, the values FakeQuant
would have produced. Both are carried as ONNX functions in standard ops, so any runtime runs them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rotgraph import grid
from rotgraph.constants import ROTGRAPH_DOMAIN
from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec
from rotgraph.online import FunctionBuilder


@dataclass(frozen=True)
class CacheSpec:
    bits: int  # 4 or 8
    head_dim: int
    group: int  # 0: the whole head_dim
    clip: float

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RotgraphError(f"a stored KV cache has 4 or 8 bits, not {self.bits}")
        if self.bits == 4 and self.head_dim % 2:
            raise RotgraphError(f"a 4-bit KV cache packs pairs of channels: head_dim {self.head_dim} is odd")
        if self.group and self.head_dim % self.group:
            raise RotgraphError(f"KV group {self.group} does not divide head_dim {self.head_dim}")

    @classmethod
    def from_act(cls, spec: ActSpec, head_dim: int) -> CacheSpec:
        if spec.symmetric:
            raise RotgraphError("a stored KV cache is quantized asymmetrically")
        return cls(spec.bits, head_dim, spec.group, spec.clip)

    @property
    def act(self) -> ActSpec:
        """The FakeQuant spec with the same arithmetic."""
        return ActSpec(self.bits, False, self.group, self.clip)

    @property
    def group_size(self) -> int:
        return self.group or self.head_dim

    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def code_width(self) -> int:
        """Bytes per token and head of the codes."""
        return self.head_dim // 2 if self.bits == 4 else self.head_dim

    @property
    def overload(self) -> str:
        return f"b{self.bits}_d{self.head_dim}_g{self.group}_c{round(self.clip * 100)}"

    @classmethod
    def from_overload(cls, overload: str) -> CacheSpec:
        m = re.fullmatch(r"b(\d+)_d(\d+)_g(\d+)_c(\d+)", overload)
        if m is None:
            raise RotgraphError(f"not a KV cache overload: {overload!r}")
        return cls(int(m[1]), int(m[2]), int(m[3]), int(m[4]) / 100)

    def attributes(self) -> list[ir.Attr]:
        """The node attributes the compiled kernels read (the function bodies have them as constants)."""
        return [
            ir.AttrInt64("bits", self.bits),
            ir.AttrInt64("head_dim", self.head_dim),
            ir.AttrInt64("group", self.group),
            ir.AttrFloat32("clip", self.clip),
        ]

    def bytes_per_token(self, kv_heads: int) -> int:
        """Stored bytes per token, per layer, for keys or values: codes + float32 scales + uint8 zeros."""
        return kv_heads * (self.code_width + 5 * self.groups)

    def quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """numpy reference of KVQuantize (`rotgraph.grid` in float32 arithmetic, as the function computes it)."""
        xg = x.astype(np.float32).reshape(*x.shape[:-1], self.groups, self.group_size)
        scale, zero = grid.dynamic_params(xg, self.bits, False, self.clip)
        with np.errstate(invalid="ignore"):  # NaN (a NaN group) casts to 0, as onnxruntime's Cast does
            codes = np.nan_to_num(grid.dynamic_codes(xg, scale, zero, self.bits, False)).astype(np.uint8)
            zero = np.nan_to_num(zero).astype(np.uint8)
        codes = codes.reshape(x.shape)
        if self.bits == 4:
            half = self.head_dim // 2
            codes = codes[..., :half] | (codes[..., half:] << 4)
        return codes, scale[..., 0], zero[..., 0]

    def dequantize(self, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        """numpy reference of KVDequantize."""
        if self.bits == 4:
            codes = np.concatenate([codes & 15, codes >> 4], axis=-1)
        q = codes.astype(np.float32).reshape(*codes.shape[:-1], self.groups, self.group_size)
        y = (q - zero[..., None].astype(np.float32)) * scale[..., None]
        return y.reshape(codes.shape)


def _quantize_function(spec: CacheSpec, dtype: ir.DataType) -> ir.Function:
    b = FunctionBuilder()
    f = np.float32
    x_in = ir.Value(name="X")
    x = x_in if dtype == ir.DataType.FLOAT else b.op("Cast", x_in, to=ir.DataType.FLOAT)  # float32 arithmetic
    grouped = b.op("Reshape", x, b.const("grouped", np.array([0, 0, 0, spec.groups, spec.group_size], np.int64)))
    axes = b.const("axes", np.array([-1], np.int64))
    zero_f, clip = b.const("zero_f", np.array(0, f)), b.const("clip", np.array(grid.clip_value(spec.clip), f))
    qmax = b.const("qmax", np.array(grid.qmax(spec.bits, False), f))
    hi = b.op("Mul", b.op("Max", b.op("ReduceMax", grouped, axes, keepdims=0), zero_f), clip)
    lo = b.op("Mul", b.op("Min", b.op("ReduceMin", grouped, axes, keepdims=0), zero_f), clip)
    # sum(0 * x): 0, or NaN for a group with a NaN or an infinity, which then gives NaN throughout (grid)
    nonfinite = b.op("ReduceSum", b.op("Mul", grouped, b.const("nothing", np.array(0, f))), axes, keepdims=0)
    scale = b.op("Add", b.op("Div", b.op("Sub", hi, lo), qmax), nonfinite)
    scale = b.op("Max", scale, b.const("eps", np.array(grid.EPS, f)))
    zp = b.op("Round", b.op("Div", b.op("Neg", lo), scale))
    q = b.op("Add", b.op("Round", b.op("Div", grouped, b.op("Unsqueeze", scale, axes))), b.op("Unsqueeze", zp, axes))
    q = b.op("Cast", b.op("Clip", q, zero_f, qmax), to=ir.DataType.UINT8)
    codes = b.op("Reshape", q, b.const("merged", np.array([0, 0, 0, spec.head_dim], np.int64)))
    if spec.bits == 4:
        half = spec.head_dim // 2
        starts, mids = b.const("starts", np.array([0], np.int64)), b.const("mids", np.array([half], np.int64))
        ends = b.const("ends", np.array([spec.head_dim], np.int64))
        low = b.op("Slice", codes, starts, mids, axes)
        high = b.text_op(
            "BitShift", b.op("Slice", codes, mids, ends, axes), b.const("four", np.array(4, np.uint8)), direction="LEFT"
        )
        codes = b.op("BitwiseOr", low, high)
    codes.name, scale.name = "codes", "scale"
    zero = b.op("Cast", zp, to=ir.DataType.UINT8)
    zero.name = "zero"
    return b.function("KVQuantize", spec.overload, [x_in], [codes, scale, zero])


def _dequantize_function(spec: CacheSpec, dtype: ir.DataType) -> ir.Function:
    b = FunctionBuilder()
    codes, scale, zero = ir.Value(name="codes"), ir.Value(name="scale"), ir.Value(name="zero")
    q = codes
    if spec.bits == 4:
        four = b.const("four", np.array(4, np.uint8))
        low = b.op("BitwiseAnd", codes, b.const("mask", np.array(15, np.uint8)))
        q = b.op("Concat", low, b.text_op("BitShift", codes, four, direction="RIGHT"), axis=-1)
    axes = b.const("axes", np.array([-1], np.int64))
    grouped = b.op(
        "Reshape",
        b.op("Cast", q, to=ir.DataType.FLOAT),
        b.const("grouped", np.array([0, 0, 0, spec.groups, spec.group_size], np.int64)),
    )
    centered = b.op("Sub", grouped, b.op("Unsqueeze", b.op("Cast", zero, to=ir.DataType.FLOAT), axes))
    y = b.op("Mul", centered, b.op("Unsqueeze", scale, axes))
    if dtype != ir.DataType.FLOAT:
        y = b.op("Cast", y, to=dtype)
    y = b.op("Reshape", y, b.const("merged", np.array([0, 0, 0, spec.head_dim], np.int64)))
    y.name = "Y"
    return b.function("KVDequantize", spec.overload, [codes, scale, zero], [y])


def add_functions(model: ir.Model, spec: CacheSpec, dtype: ir.DataType = ir.DataType.FLOAT) -> None:
    """Make sure `model` carries the KVQuantize and KVDequantize functions of `spec` for keys and values of
    `dtype`: float32 arithmetic and float32 scales whatever it is (float16 values are cast on the way in and
    the dequantized cache on the way out)."""
    model.opset_imports.setdefault(ROTGRAPH_DOMAIN, 1)
    for name, build in (("KVQuantize", _quantize_function), ("KVDequantize", _dequantize_function)):
        key = (ROTGRAPH_DOMAIN, name, spec.overload)
        if key not in model.functions:
            model.functions[key] = build(spec, dtype)


def quantize_node(spec: CacheSpec, value: ir.Value) -> ir.Node:
    return ir.Node(ROTGRAPH_DOMAIN, "KVQuantize", [value], spec.attributes(), overload=spec.overload, num_outputs=3)


def dequantize_node(spec: CacheSpec, codes: ir.Value, scale: ir.Value, zero: ir.Value) -> ir.Node:
    return ir.Node(
        ROTGRAPH_DOMAIN, "KVDequantize", [codes, scale, zero], spec.attributes(), overload=spec.overload, num_outputs=1
    )
