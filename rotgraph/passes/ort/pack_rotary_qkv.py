"""Pack Q, K and V into one projection where RoPE and R3 (RotaryHadamard) stand between Q/K and the attention."""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.constants import ROTGRAPH_DOMAIN
from rotgraph.hadamard import hadamard_factors
from rotgraph.passes.ort.pack_qkv import pack_projections, projection, same_kind, unpacked_attentions
from rotgraph.passes.ort.rotary_hadamard import OP, rotary_hadamard

logger = logging.getLogger(__name__)


def _rotary(value: ir.Value | None) -> ir.Node | None:
    """The unpacked RotaryHadamard that computes `value` for one reader only."""
    node = value.producer() if value is not None else None
    if node is None or node.domain != ROTGRAPH_DOMAIN or node.op_type != OP or len(list(value.uses())) != 1:  # type: ignore[union-attr]
        return None
    return None if node.attributes.get_int("rotated_heads", 0) else node


def _batch_seq_shapes(value: ir.Value | None) -> list[ir.Node]:
    """The Shape nodes that read only the batch and sequence axes of `value` (RotaryEmbeddingPass reads
    the sequence length of the first layer's Q projection for the positions)."""
    if value is None:
        return []
    readers = [u.node for u in value.uses() if u.node.op_type == "Shape" and u.node.domain in ("", "ai.onnx")]
    return [r for r in readers if 0 < r.attributes.get_int("end", 0) <= 2]


class PackRotaryQKVPass(ir.passes.InPlacePass):
    """GroupQueryAttention(RotaryHadamard(q(x)), RotaryHadamard(k(x)), v(x)) -> GroupQueryAttention(
    RotaryHadamard(qkv(x), rotated_heads = heads + kv_heads)) in packed-QKV form.

    The form `RotaryHadamardPass` leaves in the kv graphs (R3 after RoPE, outside the attention) reads three
    projections of one input; as `PackQKVPass` does without R3, their weights are concatenated (Q, K, V
    order, byte for byte) into one projection, and one RotaryHadamard rotates and transforms the Q and K
    heads of the packed output and passes the V heads through, which GroupQueryAttention reads as packed
    QKV (no key and value inputs). Both RotaryHadamard nodes must read the same positions and caches and
    have the same head_dim and Hadamard; the projections must be of one kind (see `same_kind`). Runs after
    the KV cache's calibration, which reads the separate keys and values. Guarantees: the same function to
    float rounding (each output channel and each head computed as before). Shape nodes that read only the
    batch and sequence axes of a projection read the packed output instead. Layers that do not match are
    left as they are (logged).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packed = 0
        for node in unpacked_attentions(graph):
            q, k = _rotary(node.inputs[0]), _rotary(node.inputs[1])
            if q is None or k is None or list(q.inputs[1:]) != list(k.inputs[1:]):
                logger.info("%s: Q and K are not RotaryHadamard of the same positions and caches", node.name)
                continue
            attributes = [{a.name: a for a in r.attributes.values()} for r in (q, k)]
            head_dim = q.attributes.get_int("head_dim", 0)
            factors = hadamard_factors(head_dim)
            if attributes[0] != attributes[1] or factors is None:
                logger.info("%s: Q and K have different RotaryHadamard attributes", node.name)
                continue
            sources = [q.inputs[0], k.inputs[0], node.inputs[2]]
            shapes = [_batch_seq_shapes(v) for v in sources]
            found = [projection(v, readers=1 + len(readers)) for v, readers in zip(sources, shapes, strict=True)]
            projections = [p for p in found if p is not None]
            if len(projections) != 3 or not same_kind(projections):
                logger.info("%s: Q, K and V are not three projections of one kind: left unpacked", node.name)
                continue
            heads, kv_heads = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
            qkv = pack_projections(graph, projections, f"qkv_rotary_{packed}")
            # typed for rotgraph's kernels (onnx cannot infer through com.microsoft ops)
            qkv.dtype = projections[0].node.outputs[0].dtype or ir.DataType.FLOAT
            for reader in (r for readers in shapes for r in readers):
                reader.replace_input_with(0, qkv)  # batch and seq: the same in the packed output
            fused = rotary_hadamard(model, [qkv, *q.inputs[1:]], factors, (heads + kv_heads, heads + 2 * kv_heads))
            fused.name = f"qkv_rotary_{packed}_hadamard"
            graph.insert_before(node, fused)
            node.replace_input_with(0, fused.outputs[0])
            node.replace_input_with(1, None)  # type: ignore[arg-type]
            node.replace_input_with(2, None)  # type: ignore[arg-type]
            packed += 1
        if packed:
            RemoveUnusedNodesPass()(model)
            graph.sort()
            logger.info("Q, K and V packed into one projection and one RotaryHadamard in %d layers", packed)
        return ir.passes.PassResult(model, packed > 0)
