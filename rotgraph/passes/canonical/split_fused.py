"""Split fused projections (Phi-3's qkv_proj and gate_up_proj) into one MatMul per part."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from rotgraph.weights import lazy_from, new_initializer, row_wise

logger = logging.getLogger(__name__)

_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class _Part:
    start: int
    stop: int
    output: ir.Value  # the Slice / Split output the part replaces


@row_wise
def _columns(w: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(w[..., start:stop])


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in np.asarray(value.const_value.numpy()).reshape(-1)]


def _is_last_axis(axis: int, value: ir.Value) -> bool:
    if axis == -1:
        return True
    return value.shape is not None and axis == len(value.shape) - 1


def _initializer(value: ir.Value | None, rank: int) -> bool:
    return (
        value is not None
        and value.is_initializer()
        and value.const_value is not None
        and len(value.const_value.shape) == rank
    )


def _slice_part(node: ir.Node, width: int) -> _Part | None:
    starts, ends = _const_ints(node.inputs[1]), _const_ints(node.inputs[2])
    axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = _const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if starts is None or ends is None or axes is None or len(starts) != 1 or steps != [1]:
        return None
    if len(axes) != 1 or not _is_last_axis(axes[0], node.inputs[0]):  # type: ignore[arg-type]
        return None
    start, stop = (min(max(v + width if v < 0 else v, 0), width) for v in (starts[0], ends[0]))
    return _Part(start, stop, node.outputs[0]) if stop > start else None


def _split_parts(node: ir.Node, width: int) -> list[_Part] | None:
    axis = node.attributes.get_int("axis", 0)
    if not _is_last_axis(axis, node.inputs[0]):  # type: ignore[arg-type]
        return None
    sizes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if sizes is None:
        count = node.attributes.get_int("num_outputs", len(node.outputs))
        chunk = -(-width // count)
        sizes = [min(chunk, width - i * chunk) for i in range(count)]
    if sum(sizes) != width or len(sizes) != len(node.outputs):
        return None
    bounds = np.cumsum([0, *sizes])
    return [_Part(int(a), int(b), out) for a, b, out in zip(bounds[:-1], bounds[1:], node.outputs, strict=True)]


def _parts(value: ir.Value, width: int) -> list[_Part] | None:
    """The column ranges the consumers of `value` take, when every consumer is a last-axis Slice or
    one Split covers it; None otherwise."""
    consumers = [use.node for use in value.uses()]
    if value.is_graph_output() or not consumers:
        return None
    if len(consumers) == 1 and consumers[0].op_type == "Split" and consumers[0].domain in ("", "ai.onnx"):
        return _split_parts(consumers[0], width)
    if len(consumers) < 2 or any(c.op_type != "Slice" or c.domain not in ("", "ai.onnx") for c in consumers):
        return None
    parts = [_slice_part(c, width) for c in consumers]
    return None if any(p is None for p in parts) else parts  # type: ignore[return-value]


class SplitFusedProjectionsPass(ir.passes.InPlacePass):
    """MatMul(x, W) [+ b] whose output is only cut into column ranges  ->  one MatMul per range.

    Matches a MatMul with a 2-D initializer weight, optionally followed by an Add of a 1-D initializer
    bias, whose result is consumed only by Slice nodes on the last axis (constant bounds, step 1) or by
    one Split on the last axis. Each range gets its own weight W[:, a:b] (and bias b[a:b]) as a lazy
    initializer. Guarantees: the function is unchanged (the same products, summed in the same order);
    afterwards every projection is a separate MatMul, the form structure discovery and the rotation
    passes expect (Phi-3 style fused QKV and gate/up become Llama style).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.graph is not graph:
                continue
            x, weight = node.inputs
            if x is None or not _initializer(weight, 2):
                continue
            assert weight is not None and weight.const_value is not None
            width = weight.const_value.shape.numpy()[1]
            result, bias, add = node.outputs[0], None, None
            users = [use.node for use in result.uses()]
            if len(users) == 1 and users[0].op_type == "Add":
                other = users[0].inputs[1] if users[0].inputs[0] is result else users[0].inputs[0]
                if _initializer(other, 1) and other.const_value.shape[0] == width:  # type: ignore[union-attr]
                    bias, add, result = other, users[0], users[0].outputs[0]
            parts = _parts(result, width)
            if parts is None:
                continue
            self._split(graph, node, x, weight, bias, parts)
            cut = {id(u.node): u.node for u in result.uses()}
            for old in [*cut.values(), *([add] if add else []), node]:
                graph.remove(old, safe=True)
            for init in (weight, bias):
                if init is not None and init.name is not None and not init.uses() and init.name in graph.initializers:
                    graph.initializers.pop(init.name)
            count += 1
        logger.info("split %d fused projections into one MatMul per part", count)
        return ir.passes.PassResult(model, count > 0)

    @staticmethod
    def _split(
        graph: ir.Graph, matmul: ir.Node, x: ir.Value, weight: ir.Value, bias: ir.Value | None, parts: list[_Part]
    ) -> None:
        rows = weight.const_value.shape.numpy()[0]  # type: ignore[union-attr]
        for k, part in enumerate(parts):
            step = functools.partial(_columns, start=part.start, stop=part.stop)
            width = part.stop - part.start
            name = f"{weight.name}.part{k}"
            w = new_initializer(graph, name, lazy_from(weight, step, (rows, width), name))
            nodes = [ir.Node("", "MatMul", [x, w], name=f"{matmul.name}.part{k}")]
            if bias is not None:
                bname = f"{bias.name}.part{k}"
                b = new_initializer(graph, bname, lazy_from(bias, step, (width,), bname))
                nodes.append(ir.Node("", "Add", [nodes[0].outputs[0], b], name=f"{matmul.name}.part{k}.bias"))
            out = nodes[-1].outputs[0]
            out.name, out.shape, out.type = part.output.name, part.output.shape, part.output.type
            part.output.name = None
            graph.insert_before(matmul, nodes)
            part.output.replace_all_uses_with(out, replace_graph_outputs=True)
