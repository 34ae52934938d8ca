"""Evaluate an ONNX graph with torch operations, so that autograd flows through it.

SpinQuant learns rotations by back-propagating through the quantized network. Rather than keep a
second model definition in sync with the exporters, rotgraph runs the very graph it will rewrite:
`TorchGraph` walks the nodes in order and maps each standard op to its torch equivalent, runs
rotgraph's own `Hadamard` and `FakeQuant` ops natively (FakeQuant rounds with a straight-through
estimator so that gradients pass), evaluates other model-local functions from their bodies, and lets
the caller replace any initializer by a tensor computed from trainable parameters (`overrides`).
Fused attention (onnxruntime's and ONNX's) comes from `rotgraph.torch_attention`. Unknown ops raise
with the node's name, never silently.

Values are keyed by the `ir.Value` objects themselves (identity), never by their names: names may be
empty or repeated, and the caller takes the values it overrides from the discovered structure.

Length: one table of op translations plus the walker (a little over 400 lines); splitting the table
from the ops it names would put one concern in two files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from rotgraph import grid
from rotgraph.constants import MS_DOMAIN, ROTGRAPH_DOMAIN
from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec
from rotgraph.hadamard import hadamard_factors
from rotgraph.torch_attention import MS_OPS, ONNX_OPS

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
# a function override reads the values computed so far; it may also keep values of its own there
# (under keys of no graph) for the rest of the run, or of the checkpointed segment
Override = torch.Tensor | Callable[[dict[ir.Value, torch.Tensor]], torch.Tensor]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant(x: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """`ActSpec.reference` in torch with straight-through rounding: per row of the last axis (or of
    `spec.group` elements), symmetric or asymmetric, with spec's clipping ratio."""
    g = spec.group or x.shape[-1]
    xr = x.reshape(-1, g)
    if spec.symmetric:
        scale = torch.clamp(xr.abs().amax(-1, keepdim=True) * grid.symmetric_ratio(spec.bits, spec.clip), min=grid.EPS)
        y = torch.clamp(round_ste(xr / scale), spec.qmin, spec.qmax) * scale
    else:
        hi = torch.clamp(xr.amax(-1, keepdim=True), min=0) * grid.clip_value(spec.clip)
        lo = torch.clamp(xr.amin(-1, keepdim=True), max=0) * grid.clip_value(spec.clip)
        scale = torch.clamp((hi - lo) / spec.qmax, min=grid.EPS)
        zero = round_ste(-lo / scale)
        y = (torch.clamp(round_ste(xr / scale) + zero, 0, spec.qmax) - zero) * scale
    return y.reshape(x.shape)


def _tensor(value: ir.TensorProtocol | np.ndarray) -> torch.Tensor:
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
            return [_tensor(attr.value)]
        if name in ("value_float", "value_int", "value_floats", "value_ints"):
            dtype = torch.float32 if "float" in name else torch.int64
            return [torch.tensor(attr.value, dtype=dtype)]
    raise RotgraphError(f"{node.name}: unsupported Constant attribute {list(node.attributes)}")


def _constant_of_shape(node: ir.Node, x: list) -> list:
    value = node.attributes.get("value")
    fill = _tensor(value.value) if value is not None else torch.zeros(1, dtype=torch.float32)
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


def _hadamard(n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x kron(A, B) / sqrt(n) on the last axis, in the factored form of `rotgraph.online`."""
    factors = hadamard_factors(n)
    if factors is None:
        raise RotgraphError(f"no Hadamard matrix of order {n} is known")
    b = torch.from_numpy(factors.b / np.sqrt(factors.p))
    a_t = torch.from_numpy(factors.a.T / np.sqrt(factors.m))

    def run(x: torch.Tensor) -> torch.Tensor:
        y = x.reshape(-1, factors.m, factors.p) @ b.to(x.dtype)
        if factors.m > 1:
            y = a_t.to(x.dtype) @ y
        return y.reshape(x.shape)

    return run


def _keep_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective checkpointing policy: save what the matrix products compute, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _segments(graph: ir.Graph, cuts: Sequence[ir.Value]) -> list[tuple[list[ir.Node], list[ir.Value]]]:
    """Graph nodes split after the producers of `cuts`, each with the values it computes that later
    nodes or the graph outputs read."""
    nodes = list(graph)
    position = {id(n): i for i, n in enumerate(nodes)}
    ends = set()
    for value in cuts:
        producer = value.producer()
        if producer is None or id(producer) not in position:
            raise RotgraphError(f"checkpoint value {value.name!r} is not computed by the graph")
        ends.add(position[id(producer)])
    outputs = set(map(id, graph.outputs))
    segments, start = [], 0
    for end in [*sorted(ends), len(nodes) - 1]:
        if end < start:
            continue
        part = nodes[start : end + 1]
        inside = {id(n) for n in part}
        exported = [
            v for n in part for v in n.outputs if id(v) in outputs or any(id(c) not in inside for c in v.consumers())
        ]
        segments.append((part, exported))
        start = end + 1
    return segments


class TorchGraph:
    """Run `model`'s main graph on torch tensors: `graph(feeds, overrides)` returns the graph outputs.

    `feeds` maps graph inputs (the `ir.Value`s, or their names) to tensors. `overrides` maps
    initializers to tensors used in their place (e.g. rotated weights computed from trainable
    rotations), or node outputs to their values or to functions of the values computed before that
    node (the node is then not run); functions read their arguments from a mapping keyed by `ir.Value`.
    Initializers are converted to torch once, in the stored dtype (`constants`, keyed by `ir.Value`).

    `checkpoint_after` lists values (e.g. each decoder block's residual output) that cut the graph into
    segments; when gradients are on, each segment runs under `torch.utils.checkpoint`, so only the
    values crossing a cut are kept for the backward pass and the rest is recomputed: activation memory
    of one segment instead of the whole network, for about one more forward pass of compute.
    `keep_products` keeps the matrix products' outputs too (selective checkpointing): only the cheap
    elementwise ops are recomputed, for the memory of those outputs.
    """

    def __init__(self, model: ir.Model, checkpoint_after: Sequence[ir.Value] = (), keep_products: bool = False) -> None:
        self.model = model
        self.keep_products = keep_products
        self._segments = _segments(model.graph, checkpoint_after) if checkpoint_after else []
        self.constants: dict[ir.Value, torch.Tensor] = {}
        for value in model.graph.initializers.values():
            if value.const_value is not None:
                self.constants[value] = _tensor(value.const_value)
        self._native: dict[tuple[str, str, str], Callable[[torch.Tensor], torch.Tensor]] = {}
        for (domain, op_type, overload), _ in model.functions.items():
            if domain != ROTGRAPH_DOMAIN:
                continue
            if op_type == "Hadamard":
                self._native[(domain, op_type, overload)] = _hadamard(int(overload.removeprefix("n")))
            elif op_type == "FakeQuant":
                spec = ActSpec.from_overload(overload)
                self._native[(domain, op_type, overload)] = functools.partial(fake_quant, spec=spec)

    def _feeds(self, feeds: Mapping[ir.Value | str, torch.Tensor]) -> dict[ir.Value, torch.Tensor]:
        """`feeds` keyed by graph input; a name must name exactly one graph input."""
        inputs = self.model.graph.inputs
        out: dict[ir.Value, torch.Tensor] = {}
        for key, tensor in feeds.items():
            if isinstance(key, str):
                named = [v for v in inputs if v.name == key]
                if len(named) != 1:
                    raise RotgraphError(f"feed {key!r} names {len(named)} graph inputs, expected one")
                key = named[0]
            elif key not in inputs:
                raise RotgraphError(f"feed {key.name!r} is not a graph input")
            out[key] = tensor
        return out

    def __call__(
        self, feeds: Mapping[ir.Value | str, torch.Tensor], overrides: Mapping[ir.Value, Override] | None = None
    ) -> list:
        env: dict[ir.Value, torch.Tensor] = dict(self.constants)
        given = dict(overrides or {})
        env.update({k: v for k, v in given.items() if isinstance(v, torch.Tensor)})
        env.update(self._feeds(feeds))
        graph = self.model.graph
        missing = [v.name for v in graph.inputs if v not in env]
        if missing:
            raise RotgraphError(f"missing graph inputs {missing}")
        outputs = list(graph.outputs)
        if not self._segments or not torch.is_grad_enabled():
            return self._run(graph, env, outputs, given)
        from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

        keep = functools.partial(create_selective_checkpoint_contexts, _keep_products)
        context = keep if self.keep_products else noop_context_fn
        for nodes, exported in self._segments:

            def segment(nodes: list[ir.Node] = nodes, exported: list[ir.Value] = exported) -> tuple[torch.Tensor, ...]:
                # values are assigned once, so `env` still holds this segment's inputs when the
                # backward pass recomputes it
                return tuple(self._run(nodes, dict(env), exported, given))

            env.update(zip(exported, checkpoint(segment, use_reentrant=False, context_fn=context), strict=True))
        return [env[v] for v in outputs]

    def _run(
        self,
        nodes: Sequence[ir.Node] | ir.Graph,
        env: dict[ir.Value, torch.Tensor],
        outputs: Sequence[ir.Value],
        given: Mapping[ir.Value, Override] | None = None,
    ) -> list:
        """Evaluate `nodes` in order. A node whose outputs are all `given` is not run; outputs given as
        functions are computed from the values so far when the node's turn comes."""
        for node in nodes:
            if given and all(v in given for v in node.outputs):
                for v in node.outputs:
                    fixed = given[v]
                    if not isinstance(fixed, torch.Tensor):
                        env[v] = fixed(env)
                continue
            inputs = [None if v is None else env[v] for v in node.inputs]
            results = self._node(node, inputs)
            for value, result in zip(node.outputs, results, strict=False):
                env[value] = result
        return [env[v] for v in outputs]

    def _node(self, node: ir.Node, inputs: list) -> list:
        key = (node.domain, node.op_type, node.overload)
        if key in self._native:
            return [self._native[key](inputs[0])]
        if key in self.model.functions:
            function = self.model.functions[key]
            env = dict(zip(function.inputs, inputs, strict=True))
            return self._run(function, env, function.outputs)
        if node.domain in ("", "ai.onnx") and node.op_type in STANDARD_OPS:
            return STANDARD_OPS[node.op_type](node, inputs)
        if node.domain in ("", "ai.onnx") and node.op_type in ONNX_OPS:
            return ONNX_OPS[node.op_type](node, inputs)
        if node.domain == MS_DOMAIN and node.op_type in MS_OPS:
            return MS_OPS[node.op_type](node, inputs)
        raise RotgraphError(
            f"node {node.name!r}: op {node.domain or 'ai.onnx'}::{node.op_type} is not supported by the torch "
            "evaluator (rotgraph.torch_graph.STANDARD_OPS)"
        )
