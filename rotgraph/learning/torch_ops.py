"""The standard ONNX ops of `rotgraph.learning.torch_graph`, in torch: one table (`STANDARD_OPS`) of
translations, each `op(node, inputs) -> outputs` on torch tensors. Fused attention ops are in
`rotgraph.learning.torch_attention`; an op in neither table is refused by the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from rotgraph.errors import RotgraphError

_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}

Op = Callable[[ir.Node, list], list]


def to_torch(value: ir.TensorProtocol | np.ndarray) -> torch.Tensor:
    """An initializer's or attribute's value as a torch tensor of its own (a copy), in the stored dtype."""
    array = value if isinstance(value, np.ndarray) else value.numpy()
    return torch.from_numpy(np.array(array, copy=True))


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def run(node: ir.Node, x: list) -> list:
        keep = bool(_attr(node, "keepdims", 1))
        axes = _ints(x[1]) if len(x) > 1 else list(_attr(node, "axes", []) or [])
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return [x[0]]
            axes = list(range(x[0].dim()))
        return [fn(x[0], dim=axes, keepdim=keep)]

    return run


def _reshape(node: ir.Node, x: list) -> list:
    shape = _ints(x[1])
    if not _attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


def _slice(node: ir.Node, x: list) -> list:
    data = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * data.dim()
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        if st <= 0:
            raise RotgraphError(f"{node.name}: Slice with step {st} is not supported by the torch evaluator")
        n = data.shape[a]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[a] = slice(s, e, st)
    return [data[tuple(index)]]


def _gather(node: ir.Node, x: list) -> list:
    data, idx = x[0], x[1].long()
    axis = int(_attr(node, "axis", 0)) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return [out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :]))]


def _gather_nd(node: ir.Node, x: list) -> list:
    data, idx = x[0], x[1].long()
    batch = int(_attr(node, "batch_dims", 0))
    if batch:
        raise RotgraphError(f"{node.name}: GatherND with batch_dims {batch} is not supported by the torch evaluator")
    return [data[tuple(idx[..., i] for i in range(idx.shape[-1]))]]


def _unsqueeze(node: ir.Node, x: list) -> list:
    axes = _ints(x[1]) if len(x) > 1 else list(_attr(node, "axes", []))
    rank = x[0].dim() + len(axes)
    out = x[0]
    for a in sorted(a % rank for a in axes):
        out = out.unsqueeze(a)
    return [out]


def _squeeze(node: ir.Node, x: list) -> list:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else [i for i, s in enumerate(x[0].shape) if s == 1]
    return [x[0].squeeze(tuple(a % x[0].dim() for a in axes))]


def _shape(node: ir.Node, x: list) -> list:
    dims = list(x[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _rms_norm(node: ir.Node, x: list) -> list:
    data, scale = x[0], x[1]
    axis = int(_attr(node, "axis", -1)) % data.dim()
    eps = float(_attr(node, "epsilon", 1e-5))
    dims = tuple(range(axis, data.dim()))
    return [data * torch.rsqrt(data.pow(2).mean(dim=dims, keepdim=True) + eps) * scale]


def _constant(node: ir.Node, x: list) -> list:
    for name, attr in node.attributes.items():
        if name == "value":
            return [to_torch(attr.value)]
        if name in ("value_float", "value_int", "value_floats", "value_ints"):
            dtype = torch.float32 if "float" in name else torch.int64
            return [torch.tensor(attr.value, dtype=dtype)]
    raise RotgraphError(f"{node.name}: unsupported Constant attribute {list(node.attributes)}")


def _constant_of_shape(node: ir.Node, x: list) -> list:
    value = node.attributes.get("value")
    fill = to_torch(value.value) if value is not None else torch.zeros(1, dtype=torch.float32)
    return [torch.full(_ints(x[0]), fill.reshape(-1)[0].item(), dtype=fill.dtype)]


def _trilu(node: ir.Node, x: list) -> list:
    k = _ints(x[1])[0] if len(x) > 1 and x[1] is not None else 0
    return [torch.triu(x[0], k) if _attr(node, "upper", 1) else torch.tril(x[0], k)]


def _cast(node: ir.Node, x: list) -> list:
    return [x[0].to(_DTYPES[ir.DataType(_attr(node, "to"))])]


def _split(node: ir.Node, x: list) -> list:
    axis = int(_attr(node, "axis", 0))
    if len(x) > 1 and x[1] is not None:
        return list(torch.split(x[0], _ints(x[1]), dim=axis))
    parts = len(node.outputs)
    return list(torch.tensor_split(x[0], parts, dim=axis))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    return lambda node, x: [fn(x[0])]


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return lambda node, x: [fn(x[0], x[1])]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    def run(node: ir.Node, x: list) -> list:
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return [out]

    return run


STANDARD_OPS: dict[str, Op] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": lambda node, x: [
        torch.div(x[0], x[1], rounding_mode="trunc") if not x[0].is_floating_point() else x[0] / x[1]
    ],
    "Pow": _binary(lambda a, b: torch.pow(a, b.to(a.dtype) if a.is_floating_point() else b)),
    "MatMul": _binary(torch.matmul),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _unary(torch.isinf),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin),
    "Identity": _unary(lambda t: t),
    "Softmax": lambda node, x: [torch.softmax(x[0], dim=int(_attr(node, "axis", -1)))],
    "Where": lambda node, x: [torch.where(x[0], x[1], x[2])],
    "Transpose": lambda node, x: [x[0].permute(*(_attr(node, "perm") or reversed(range(x[0].dim()))))],
    "Concat": lambda node, x: [torch.cat([t for t in x if t is not None], dim=int(_attr(node, "axis")))],
    "Expand": lambda node, x: [x[0].expand(torch.broadcast_shapes(x[0].shape, tuple(_ints(x[1]))))],
    "Range": lambda node, x: [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)],
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "Reshape": _reshape,
    "Flatten": lambda node, x: [x[0].reshape(int(np.prod(x[0].shape[: _attr(node, "axis", 1)])), -1)],
    "Slice": _slice,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": _shape,
    "RMSNormalization": _rms_norm,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Trilu": _trilu,
    "Cast": _cast,
    "Split": _split,
}
