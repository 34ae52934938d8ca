"""Evaluate an ONNX graph with torch operations, so that autograd flows through it.

SpinQuant learns rotations by back-propagating through the quantized network. Rather than keep a
second model definition in sync with the exporters, rotgraph runs the very graph it will rewrite:
`TorchGraph` walks the nodes in order and maps each standard op to its torch equivalent
(`rotgraph.learning.torch_ops`), runs rotgraph's own `Hadamard` and `FakeQuant` ops natively (FakeQuant
is `rotgraph.learning.quantizers.fake_quant`, which rounds with a straight-through estimator so that
gradients pass), evaluates other model-local functions from their bodies, and lets the caller replace
any initializer by a tensor computed from trainable parameters (`overrides`). Fused attention
(onnxruntime's and ONNX's) comes from `rotgraph.learning.torch_attention`. Unknown ops raise with the
node's name, never silently.

Values are keyed by the `ir.Value` objects themselves (identity), never by their names: names may be
empty or repeated, and the caller takes the values it overrides from the discovered structure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from rotgraph.constants import MS_DOMAIN, ROTGRAPH_DOMAIN
from rotgraph.errors import RotgraphError
from rotgraph.fakequant import ActSpec
from rotgraph.hadamard import hadamard_factors
from rotgraph.learning.quantizers import fake_quant
from rotgraph.learning.torch_attention import MS_OPS, ONNX_OPS
from rotgraph.learning.torch_ops import STANDARD_OPS, to_torch

# a function override reads the values computed so far; it may also keep values of its own there
# (under keys of no graph) for the rest of the run, or of the checkpointed segment
Override = torch.Tensor | Callable[[dict[ir.Value, torch.Tensor]], torch.Tensor]


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
                self.constants[value] = to_torch(value.const_value)
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
            "evaluator (rotgraph.learning.torch_ops.STANDARD_OPS)"
        )
