"""RotaryEmbedding -> Reshape -> Hadamard -> Reshape (RoPE, then R3 per head) -> one rotgraph RotaryHadamard."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from rotgraph.constants import MS_DOMAIN, ROTGRAPH_DOMAIN
from rotgraph.hadamard import HadamardFactors, hadamard_factors
from rotgraph.online import FUNCTION_OPSET, FunctionBuilder, hadamard_attributes
from rotgraph.structure.match import is_hadamard

logger = logging.getLogger(__name__)

OP = "RotaryHadamard"


def _only_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _reshape_to(node: ir.Node | None, dims: list[int]) -> bool:
    """`node` is a Reshape to the constant target `dims`."""
    if node is None or node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    target = node.inputs[1].const_value if node.inputs[1] is not None else None
    return target is not None and target.numpy().tolist() == dims


def _function(overload: str, factors: HadamardFactors, dtype: np.dtype, packed: tuple[int, int] | None) -> ir.Function:
    """The op in onnxruntime's and standard ops: com.microsoft RotaryEmbedding on the 3-D input, then
    the Hadamard transform of every head as rotgraph's Hadamard body computes it (rows of m x p blocks,
    @ B / sqrt(p), A^T / sqrt(m) @), and the input's shape back. `packed` (rotated heads, all heads):
    only the first heads of the last axis are transformed (Split, then Concat with the rest)."""
    x, positions, cos, sin = (ir.Value(name=n) for n in ("X", "position_ids", "cos_cache", "sin_cache"))
    b = FunctionBuilder()
    head = x
    if packed is not None:
        rotated, heads = packed
        sizes = b.const("sizes", np.array([rotated * factors.n, (heads - rotated) * factors.n], np.int64))
        split = ir.Node("", "Split", [x, sizes], [ir.AttrInt64("axis", -1)], num_outputs=2)
        b.nodes.append(split)
        head, tail = split.outputs
    rotary = ir.Node(MS_DOMAIN, "RotaryEmbedding", [head, positions, cos, sin], [ir.AttrInt64("interleaved", 0)])
    b.nodes.append(rotary)
    shape = b.op("Shape", rotary.outputs[0])
    blocks = b.op("Reshape", rotary.outputs[0], b.const("blocks", np.array([-1, factors.m, factors.p], np.int64)))
    y = b.op("MatMul", blocks, b.const("B", (factors.b / np.sqrt(factors.p)).astype(dtype)))
    if factors.m > 1:
        y = b.op("MatMul", b.const("A_T", (factors.a.T / np.sqrt(factors.m)).astype(dtype)), y)
    out = b.op("Reshape", y, shape)
    if packed is not None:
        out = b.op("Concat", out, tail, axis=-1)
    out.name = "Y"
    graph = ir.Graph(
        [x, positions, cos, sin],
        [out],
        nodes=b.nodes,
        opset_imports={"": FUNCTION_OPSET, MS_DOMAIN: 1},
        name=OP,
    )
    return ir.Function(ROTGRAPH_DOMAIN, OP, overload, graph=graph, attributes=[])


def rotary_hadamard(
    model: ir.Model, inputs: list[ir.Value | None], factors: HadamardFactors, packed: tuple[int, int] | None = None
) -> ir.Node:
    """A RotaryHadamard node (not inserted) on `inputs` (X, position_ids, cos_cache, sin_cache) with its
    function in `model`. `packed` (rotated heads, all heads of X): transform only the first heads of each
    token (Q and K of packed QKV) and pass the others (V) through."""
    x = inputs[0]
    dtype = (x.dtype if x is not None else None) or ir.DataType.FLOAT
    overload = f"n{factors.n}" if packed is None else f"n{factors.n}_heads{packed[0]}of{packed[1]}"
    key = (ROTGRAPH_DOMAIN, OP, overload)
    if key not in model.functions:
        model.functions[key] = _function(overload, factors, dtype.numpy(), packed)
    attributes = [ir.AttrInt64("head_dim", factors.n), *hadamard_attributes(factors)]
    if packed is not None:
        attributes.append(ir.AttrInt64("rotated_heads", packed[0]))
    node = ir.Node(ROTGRAPH_DOMAIN, OP, inputs, attributes, overload=overload, num_outputs=1)
    node.outputs[0].dtype = dtype
    model.opset_imports.setdefault(ROTGRAPH_DOMAIN, 1)
    return node


class RotaryHadamardPass(ir.passes.InPlacePass):
    """Reshape(Hadamard(Reshape(RotaryEmbedding(x, positions, cos, sin), [0, 0, H, d])), [0, 0, H * d])
    -> rotgraph RotaryHadamard(x, positions, cos, sin) with head_dim = d.

    The form `RotaryEmbeddingPass` writes for Q and K before GroupQueryAttention when R3 follows RoPE (a
    quantized KV cache) becomes one op: rotgraph's kernel (rotgraph/kernels) rotates each head's halves
    and transforms it in one pass over [batch, seq, H * d], three nodes fewer per projection. The op's
    ONNX function body is RotaryEmbedding and the ops of the Hadamard's own body (the unfused graph's
    values bit for bit, tested), so a model runs the same without the kernel library.
    Only RotaryEmbedding with `interleaved=0` and no other attribute, whose intermediate values have no
    other reader, is fused. Guarantees: the same function; the kernel computes RoPE in float32 as
    x1 * cos - x2 * sin, x2 * cos + x1 * sin (onnxruntime's kernel may fuse a multiply-add, so the two
    agree to float rounding, not bit for bit) and then the Hadamard kernel's transform.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for node in list(model.graph):
            chain = self._match(node)
            if chain is not None:
                self._fuse(model, *chain)
                count += 1
        if count:
            logger.info("RoPE + R3 Hadamard as one %s in %d places", OP, count)
        return ir.passes.PassResult(model, bool(count))

    @staticmethod
    def _match(rotary: ir.Node) -> tuple[ir.Node, ir.Node, ir.Node, ir.Node, HadamardFactors] | None:
        if rotary.domain != MS_DOMAIN or rotary.op_type != "RotaryEmbedding" or len(rotary.inputs) != 4:
            return None
        other = {a.name for a in rotary.attributes.values()} - {"interleaved"}
        if other or rotary.attributes.get_int("interleaved", 0) != 0:
            return None
        split = _only_reader(rotary.outputs[0])
        hadamard = _only_reader(split.outputs[0]) if split is not None else None
        back = _only_reader(hadamard.outputs[0]) if hadamard is not None and is_hadamard(hadamard) else None
        if split is None or hadamard is None or back is None or not hadamard.overload.startswith("n"):
            return None
        head_dim = int(hadamard.overload[1:]) if hadamard.overload[1:].isdigit() else 0
        factors = hadamard_factors(head_dim)
        if factors is None or hadamard_attributes(factors) != [
            a for a in hadamard.attributes.values() if a.name == "a"
        ]:
            return None  # not the fixed R3 transform of order head_dim that the body restates
        target = split.inputs[1].const_value if split.inputs[1] is not None else None
        dims = target.numpy().tolist() if target is not None else []
        if len(dims) != 4 or dims[:2] != [0, 0] or dims[3] != head_dim or not _reshape_to(split, dims):
            return None
        if not _reshape_to(back, [0, 0, dims[2] * head_dim]):
            return None
        return rotary, split, hadamard, back, factors

    @staticmethod
    def _fuse(
        model: ir.Model, rotary: ir.Node, split: ir.Node, hadamard: ir.Node, back: ir.Node, factors: HadamardFactors
    ) -> None:
        fused = rotary_hadamard(model, list(rotary.inputs), factors)
        fused.name = f"{rotary.name}_hadamard" if rotary.name else None
        out, name = fused.outputs[0], back.outputs[0].name
        back.outputs[0].name = None
        out.name, out.shape = name, back.outputs[0].shape
        graph = model.graph
        graph.insert_before(rotary, fused)
        back.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove([back, hadamard, split, rotary], safe=True)
