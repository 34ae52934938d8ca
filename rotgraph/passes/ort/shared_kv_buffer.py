"""Let onnxruntime-genai keep the KV cache in one static buffer that GroupQueryAttention updates in place."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rotgraph.inputs import input_roles
from rotgraph.online import FunctionBuilder
from rotgraph.passes.ort.group_query_attention import MS_DOMAIN

logger = logging.getLogger(__name__)

MASK_INPUT = "attention_mask"  # the name given to a mask input the graph did not have


class SharedKVBufferPass(ir.passes.InPlacePass):
    """GroupQueryAttention's sequence lengths from the attention mask, so the past and present caches can
    be one buffer of a fixed length (onnxruntime-genai's `past_present_share_buffer`).

    With a shared buffer the past inputs have the buffer's length, not the number of cached tokens, so a
    length read from their shapes is wrong. Here every com.microsoft GroupQueryAttention takes
    seqlens_k = ReduceSum(mask) - 1 and total_sequence_length = the mask's width, as onnxruntime-genai's
    model builder writes it, from the graph's rank-2 attention mask input (found by data flow; an
    `attention_mask` [batch, total] int64 input is added when the graph has none). An attention_bias
    operand (a padding mask `GroupQueryAttentionPass` moved there, whose width would be the buffer's)
    is dropped. Guarantees: the same function for unpadded rows, with or without a shared buffer;
    rotgraph's feeds then treat the graph as a builder graph (`InputRoles.padding == "right"`) and refuse
    left-padded rows. Raises nothing on a graph without GroupQueryAttention (returns unchanged).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
        if not nodes:
            return ir.passes.PassResult(model, False)
        found = input_roles(model).attention_mask
        mask = next((v for v in graph.inputs if v.name == found), None) if found else None
        if mask is None:
            mask = ir.Value(
                name=MASK_INPUT,
                shape=ir.Shape(["batch_size", "total_sequence_length"]),
                type=ir.TensorType(ir.DataType.INT64),
            )
            graph.inputs.append(mask)
        b = FunctionBuilder()
        ones = b.const("shared_kv_one", np.array(1, np.int64))
        summed = b.op(
            "ReduceSum", b.op("Cast", mask, to=ir.DataType.INT64), b.const("shared_kv_axes", np.array([1])), keepdims=0
        )
        seqlens = b.op("Cast", b.op("Sub", summed, ones), to=ir.DataType.INT32)
        width = b.op("Shape", mask, start=1, end=2)
        total = b.op(
            "Cast", b.op("Reshape", width, b.const("shared_kv_scalar", np.array([], np.int64))), to=ir.DataType.INT32
        )
        seqlens.name, total.name = "shared_kv_seqlens_k", "shared_kv_total_sequence_length"
        graph.insert_before(nodes[0], b.nodes)
        dropped = 0
        for node in nodes:
            for index, new in ((5, seqlens), (6, total)):
                former = node.inputs[index]
                if former is not None and former is not new:  # its other readers too (positions of RoPE outside)
                    former.replace_all_uses_with(new)
                node.replace_input_with(index, new)
            if len(node.inputs) > 10 and node.inputs[10] is not None:
                node.replace_input_with(10, None)  # type: ignore[arg-type]
                dropped += 1
        graph.sort()
        RemoveUnusedNodesPass()(model)
        logger.info(
            "GroupQueryAttention lengths from the attention mask in %d layers (%d padding biases dropped)",
            len(nodes),
            dropped,
        )
        return ir.passes.PassResult(model, True)
