"""Fused attention ops for `rotgraph.learning.torch_graph`: onnxruntime's com.microsoft
GroupQueryAttention, MultiHeadAttention and RotaryEmbedding, and ONNX's Attention (opset 23), in torch.

These let `rotgraph learn` back-propagate through graphs that keep attention fused (the onnxruntime-genai
builder's, onnxscript's and onnxruntime's fusions, torch's opset-23 export). They follow the operator
specs for what learning feeds: a prompt after an empty or full (unpadded) cache, with an attention mask
or bias where the graph has one. What they do not implement (right-padded rows after a cache, sliding
windows, smooth softmax, Q/K/V biases inside MultiHeadAttention) raises with the node's name.
`tests/test_torch_attention.py` compares each with onnxruntime on the exporters' graphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir
import torch

from rotgraph.errors import RotgraphError

Op = Callable[[ir.Node, list], list]


def _int(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)


def _float(node: ir.Node, name: str, default: float) -> float:
    return node.attributes.get_float(name, default)


def _operand(x: list, index: int) -> torch.Tensor | None:
    return x[index] if index < len(x) else None


def _refuse(node: ir.Node, what: str) -> RotgraphError:
    return RotgraphError(
        f"node {node.name!r} ({node.domain}::{node.op_type}): {what} is not supported by the torch evaluator"
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE on the last axis of `x` [..., seq, head_dim] with `cos`/`sin` [..., seq, rotary_dim / 2]
    broadcast to it; dimensions past the rotary ones pass through."""
    rotary = 2 * cos.shape[-1]
    part, rest = x[..., :rotary], x[..., rotary:]
    if interleaved:
        a, b = part[..., 0::2], part[..., 1::2]
        turned = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:
        a, b = part.chunk(2, dim=-1)
        turned = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((turned, rest), dim=-1)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads * d] -> [batch, heads, seq, d]."""
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, d] -> [batch, seq, heads * d]."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    allowed: torch.Tensor | None,
    bias: torch.Tensor | None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale [+ softcap] + bias, keys not `allowed` excluded) v, with k and v of fewer
    heads (grouped-query) repeated to q's. q [b, h, s, d], k/v [b, h_kv, t, d]; `allowed` and `bias`
    broadcast to [b, h, s, t]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if allowed is not None:  # the lowest float, not -inf: a query with no key allowed (padding) stays finite
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


def _causal(queries: int, keys: int, past: int | torch.Tensor) -> torch.Tensor:
    """[..., queries, keys] bool: query i (at position past + i) sees keys up to its own position.
    `past` may be a tensor [batch, 1, 1, 1] (per row)."""
    i = torch.arange(queries).reshape(queries, 1)
    j = torch.arange(keys).reshape(1, keys)
    return j <= i + past


def group_query_attention(node: ir.Node, x: list) -> list:
    """com.microsoft GroupQueryAttention: query (or packed QKV when key is absent), key, value, past_key,
    past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias."""
    if _operand(x, 11) is not None or _int(node, "smooth_softmax", 0) or _int(node, "local_window_size", -1) > 0:
        raise _refuse(node, "head_sink, smooth_softmax or a local window")
    heads, kv_heads = _int(node, "num_heads", 0), _int(node, "kv_num_heads", 0)
    query, key, value = x[0], _operand(x, 1), _operand(x, 2)
    if key is None or value is None:
        width = query.shape[-1] // (heads + 2 * kv_heads)
        query, key, value = query.split([heads * width, kv_heads * width, kv_heads * width], dim=-1)
    q, k, v = _heads(query, heads), _heads(key, kv_heads), _heads(value, kv_heads)
    batch, _, seq, head_dim = q.shape
    past_key, past_value = _operand(x, 3), _operand(x, 4)
    past = 0 if past_key is None else past_key.shape[2]
    lengths = x[5].reshape(batch).to(torch.int64) + 1  # tokens per row after this step
    if past and not bool((lengths == past + seq).all()):
        raise _refuse(node, "a cache of rows with different lengths (or a shared buffer)")
    # a first prompt (seq == total_sequence_length) starts at 0 in every row, right-padded or not;
    # after a cache, row b's query i sits at lengths[b] - seq + i
    first = int(x[6].reshape(-1)[0]) == seq
    start = torch.zeros(batch, dtype=torch.int64) if first else lengths - seq
    if _int(node, "do_rotary", 0):
        given = _operand(x, 9)
        pos = given if given is not None else start.reshape(batch, 1) + torch.arange(seq)
        cos, sin = x[7][pos].unsqueeze(1), x[8][pos].unsqueeze(1)  # [batch, 1, seq, rotary / 2]
        interleaved = bool(_int(node, "rotary_interleaved", 0))
        q, k = rope(q, cos, sin, interleaved), rope(k, cos, sin, interleaved)
    if past_key is not None and past_value is not None and past:
        k, v = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)
    total = k.shape[2]
    # right padding: row b holds lengths[b] real tokens, the keys after them are padding
    valid = torch.arange(total).reshape(1, 1, 1, total) < lengths.reshape(batch, 1, 1, 1)
    allowed = _causal(seq, total, start.reshape(batch, 1, 1, 1)) & valid
    scale = _float(node, "scale", 0.0) or 1 / math.sqrt(head_dim)
    out = _attend(q, k, v, scale, allowed, _operand(x, 10), _float(node, "softcap", 0.0))
    return [_merge(out), k, v]


def multi_head_attention(node: ir.Node, x: list) -> list:
    """com.microsoft MultiHeadAttention with separate 3-D query, key and value: key_padding_mask,
    attention_bias, past_key, past_value."""
    if _operand(x, 3) is not None:
        raise _refuse(node, "Q/K/V biases inside the op")
    heads = _int(node, "num_heads", 0)
    key, value = _operand(x, 1), _operand(x, 2)
    if key is None or value is None or key.dim() != 3:
        raise _refuse(node, "packed or 4-D key/value")
    q, k, v = _heads(x[0], heads), _heads(key, heads), _heads(value, heads)
    past_key, past_value = _operand(x, 6), _operand(x, 7)
    if past_key is not None and past_value is not None:
        k, v = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)
    seq, total = q.shape[2], k.shape[2]
    allowed = _causal(seq, total, total - seq) if _int(node, "unidirectional", 0) else None
    bias = _operand(x, 5)
    padding = _operand(x, 4)
    if padding is not None:
        if padding.dim() != 2:
            raise _refuse(node, f"a key_padding_mask of rank {padding.dim()}")
        filler = torch.where(
            padding.reshape(padding.shape[0], 1, 1, -1) == 0, _float(node, "mask_filter_value", -10000.0), 0.0
        )
        bias = filler if bias is None else bias + filler
    scale = _float(node, "scale", 0.0) or 1 / math.sqrt(q.shape[-1])
    return [_merge(_attend(q, k, v, scale, allowed, bias)), k, v]


def rotary_embedding(node: ir.Node, x: list) -> list:
    """com.microsoft RotaryEmbedding on [batch, seq, heads * head_dim] or [batch, heads, seq, head_dim];
    position_ids [batch, seq], or one offset."""
    data, positions, cos, sin = x[0], x[1], x[2], x[3]
    interleaved = bool(_int(node, "interleaved", 0))
    three_d = data.dim() == 3
    if three_d:
        heads = _int(node, "num_heads", 0) or data.shape[-1] // (2 * cos.shape[-1])
        data = _heads(data, heads)
    batch, _, seq, _ = data.shape
    if positions.numel() == 1:
        positions = positions.reshape(1, 1) + torch.arange(seq).reshape(1, seq)
    positions = positions.expand(batch, seq).to(torch.int64)
    out = rope(data, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1), interleaved)
    return [_merge(out) if three_d else out]


def onnx_rotary_embedding(node: ir.Node, x: list) -> list:
    """ONNX RotaryEmbedding (opset 23): X [batch, heads, seq, head_dim] or [batch, seq, hidden]
    (num_heads), cos_cache/sin_cache [max_position, rotary / 2] read at position_ids, or [batch, seq,
    rotary / 2] without them."""
    data, cos, sin, positions = x[0], x[1], x[2], _operand(x, 3)
    if positions is not None:
        cos, sin = cos[positions.to(torch.int64)], sin[positions.to(torch.int64)]
    three_d = data.dim() == 3
    if three_d:
        data = _heads(data, _int(node, "num_heads", 0) or data.shape[-1] // (2 * cos.shape[-1]))
    out = rope(data, cos.unsqueeze(1), sin.unsqueeze(1), bool(_int(node, "interleaved", 0)))
    return [_merge(out) if three_d else out]


def attention(node: ir.Node, x: list) -> list:
    """ONNX Attention (opset 23): Q, K, V as [batch, seq, heads * d] (q_num_heads / kv_num_heads) or
    [batch, heads, seq, d]; attn_mask (bool: keep, or float: added), past_key, past_value, is_causal."""
    if _int(node, "qk_matmul_output_mode", 0):
        raise _refuse(node, "qk_matmul_output_mode")
    query, key, value = x[0], x[1], x[2]
    three_d = query.dim() == 3
    if three_d:
        q = _heads(query, _int(node, "q_num_heads", 0))
        k, v = _heads(key, _int(node, "kv_num_heads", 0)), _heads(value, _int(node, "kv_num_heads", 0))
    else:
        q, k, v = query, key, value
    past_key, past_value = _operand(x, 4), _operand(x, 5)
    if past_key is not None and past_value is not None:
        k, v = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)
    seq, total = q.shape[2], k.shape[2]
    allowed = _causal(seq, total, total - seq) if _int(node, "is_causal", 0) else None
    mask, bias = _operand(x, 3), None
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    elif mask is not None:
        bias = mask
    scale = _float(node, "scale", 0.0) or 1 / math.sqrt(q.shape[-1])
    out = _attend(q, k, v, scale, allowed, bias, _float(node, "softcap", 0.0))
    return [_merge(out) if three_d else out, k, v]


MS_OPS: dict[str, Op] = {
    "GroupQueryAttention": group_query_attention,
    "MultiHeadAttention": multi_head_attention,
    "RotaryEmbedding": rotary_embedding,
}
ONNX_OPS: dict[str, Op] = {"Attention": attention, "RotaryEmbedding": onnx_rotary_embedding}
