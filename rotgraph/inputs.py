"""What each input of a decoder graph is, found by structure, and the feeds rotgraph gives it.

Every command that runs a model (eval, the validation of rotate and quantize, calibration and inspect
probes, generate) feeds it through `InputRoles.feeds`. The roles come from data flow in the graph as it
is (no canonical form needed, so quantized and fused graphs are read too), never from a name:

- **token ids**: the integer input that indexes the embedding: a Gather (or com.microsoft
  GatherBlockQuantized) of a constant table. Should two inputs index constant tables (a RoPE table
  gathered by positions), the one that is not a position input is taken, then the largest table.
- **KV cache**: an input that the graph appends to on the sequence axis and returns:
  Concat(past, new) -> graph output, as `rotgraph.structure.KVCache` defines it (sequence Slices of a
  sliding window and rotgraph's stored codes, scales and zero points alike), or the past key/value
  operand of a fused attention (com.microsoft GroupQueryAttention, MultiHeadAttention, ONNX Attention)
  whose matching present output is a graph output. The present output it pairs with is recorded, so a
  decoding loop feeds each step's presents back by structure.
- **position ids**: an integer input whose data (not only its shape) reaches RoPE: a Cos or Sin node,
  or the positions operand of RotaryEmbedding or GroupQueryAttention; not one that reaches
  GroupQueryAttention's seqlens_k, which is the mask even where RoPE positions are computed from it
  (`rotgraph.passes.canonical.split_rotary`).
- **attention mask**: an integer input of rank 2 whose data reaches an attention's mask: what enters
  a Softmax other than through the score MatMul (Q K^T), i.e. the additive or Where mask, or a fused
  attention's mask operands (seqlens_k, total_sequence_length, attention_bias, key_padding_mask).

Data flow ignores Shape and Size, so an input read only for its length (the past length a causal mask
is built from) takes no role by that edge. The one fallback on names: an integer input that reaches
none of these places (a mask or positions input that the graph reads only through its shape, or not
at all) is taken as the mask or the positions when named `attention_mask` or `position_ids` (the Hugging
Face convention), and this is logged. Any other input is refused (`UnknownInputError`) before any work.

Feeds for a batch of rows: the mask is 1 on real tokens, 0 on padding. Which side rows are padded on
depends on how the graph reads its mask (`InputRoles.padding`, `InputRoles.pad`):

- **left** (a mask that reaches the scores as an additive or Where mask, or as a fused op's
  attention_bias): positions count real tokens from the first one (cumsum(mask) - 1, padding at 0), the
  convention of Hugging Face `generate`.
- **right** (a mask that becomes GroupQueryAttention's seqlens_k, as onnxruntime-genai's builder makes
  it): the kernel reads only each row's count of real tokens, ReduceSum(mask) - 1, and takes a row's
  tokens to come first, in the new tokens as in the cache it writes (each row's cached tokens packed at
  the front of the present cache). So in a prompt each row's real tokens come first, then padding; in a
  step after a cache every new token is real; the past columns count, their order does not (the graph
  gets the mask as each row's count of ones followed by zeros: the layout of the cache it holds). Rows
  padded on the left are refused: the kernel would take their padding as tokens (measured with
  onnxruntime 1.32: wrong logits, even in an unpadded row of the batch). Positions of the new tokens, for
  such a graph with a positions input: each row's past count onwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from rotgraph.constants import MS_DOMAIN as _MS
from rotgraph.errors import RotgraphError
from rotgraph.padding import check_right_padded, left_padded, positions, right_padded

logger = logging.getLogger(__name__)

ROLES = "token ids, attention mask, position ids, KV cache (past -> present)"

_SHAPE_READERS = frozenset({"Shape", "Size"})
# Fused attention ops: (past key, past value) operand indices -> (present key, present value) outputs.
_FUSED_CACHE = {("GroupQueryAttention", _MS): (3, 4), ("MultiHeadAttention", _MS): (6, 7), ("Attention", ""): (4, 5)}
# Their mask operands, and the positions operand of the ops that apply RoPE.
_FUSED_MASK = {
    ("GroupQueryAttention", _MS): (5, 6, 10),
    ("MultiHeadAttention", _MS): (4, 5),
    ("Attention", _MS): (3, 5),
    ("Attention", ""): (3,),
}
_POSITIONS = {("RotaryEmbedding", _MS): 1, ("RotaryEmbedding", ""): 3, ("GroupQueryAttention", _MS): 9}
_EMBEDDING = {("Gather", ""), ("GatherBlockQuantized", _MS)}
_INTEGER = frozenset({ir.DataType.INT64, ir.DataType.INT32})
_NUMPY: dict[ir.DataType, type[np.generic]] = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,  # GroupQueryAttention's int8 cache codes
}


class UnknownInputError(RotgraphError):
    """A graph input that rotgraph cannot feed."""


@dataclass(frozen=True)
class CacheInput:
    """One KV cache input: `[batch, heads, past, width]` of `dtype`, returned grown as `present`."""

    name: str
    present: str
    heads: int
    width: int
    dtype: type[np.generic]

    def empty(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.heads, 0, self.width), dtype=self.dtype)


@dataclass(frozen=True)
class InputRoles:
    """The inputs of a decoder graph by role (see the module docstring); names are the graph's."""

    input_ids: str
    attention_mask: str | None = None
    position_ids: str | None = None
    caches: tuple[CacheInput, ...] = ()
    padding: Literal["left", "right"] = "left"  # right: the mask becomes GroupQueryAttention's seqlens_k
    int32: frozenset[str] = frozenset()  # integer inputs declared int32 (the others are int64)

    def pad(self, rows: Iterable[np.ndarray], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, mask) [batch, longest] of rows of different lengths, padded on the side this graph
        takes (see the module docstring)."""
        return left_padded(rows, pad) if self.padding == "left" else right_padded(rows, pad)

    def feeds(
        self,
        tokens: np.ndarray,
        mask: np.ndarray | None = None,
        past: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Feeds for `tokens` [batch, seq] after `past` (the cache feeds of the previous step, by input
        name; None: empty caches). `mask` [batch, past + seq]: 1 for real tokens, 0 for padding; None is
        all ones. A graph without a mask input takes only unpadded rows."""
        tokens = np.asarray(tokens, dtype=np.int64)
        batch, seq = tokens.shape
        cache = dict(past) if past is not None else {c.name: c.empty(batch) for c in self.caches}
        if set(cache) != {c.name for c in self.caches}:
            raise RotgraphError(f"cache feeds {sorted(cache)} do not match the cache inputs {self.cache_names}")
        past_len = next((v.shape[2] for v in cache.values()), 0)
        if mask is None:
            mask = np.ones((batch, past_len + seq), dtype=np.int64)
        mask = np.asarray(mask, dtype=np.int64)
        if mask.shape != (batch, past_len + seq):
            raise RotgraphError(f"attention mask of shape {mask.shape}, expected {(batch, past_len + seq)}")
        if self.attention_mask is None and not mask.all():
            raise RotgraphError("the model has no attention mask input: it cannot take padded rows")
        if self.padding == "right":
            check_right_padded(mask, past_len)
            counts = mask.sum(axis=1, keepdims=True)
            steps = counts[:, :1] - mask[:, past_len:].sum(axis=1, keepdims=True) + np.arange(seq)
            mask = (np.arange(mask.shape[1]) < counts).astype(np.int64)  # each row's tokens first
        else:
            steps = positions(mask)[:, past_len:]
        feeds = {self.input_ids: tokens} | cache
        if self.attention_mask is not None:
            feeds[self.attention_mask] = mask
        if self.position_ids is not None:
            feeds[self.position_ids] = steps.astype(np.int64)
        return {k: v.astype(np.int32) if k in self.int32 else v for k, v in feeds.items()}

    def next_past(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cache feeds of the next step from a step's outputs (by output name)."""
        return {c.name: outputs[c.present] for c in self.caches}

    @property
    def cache_names(self) -> list[str]:
        return [c.name for c in self.caches]


def read_roles(path: Path | bytes) -> InputRoles:
    """`input_roles` of a model file (its weights are not read) or of a serialized model."""
    import onnx

    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path), load_external_data=False)
    return input_roles(ir.from_proto(proto))


def input_roles(model: ir.Model) -> InputRoles:
    """The role of every input of `model` (see the module docstring); `UnknownInputError` names an
    input that has none."""
    graph = model.graph
    caches = _caches(graph)
    cache_ids = {id(v) for v, _ in caches}
    ints = [v for v in graph.inputs if v.dtype in _INTEGER and id(v) not in cache_ids]
    seqlens = [v for n in graph if _key(n) == ("GroupQueryAttention", _MS) for v in _operands(n, [5])]
    lengths = reached_by_data(seqlens, ints)  # a mask, even where RoPE positions are derived from it too
    position_inputs = [v for v in reached_by_data(_position_sinks(graph), ints) if v not in lengths]
    dynamic = _dynamic(graph)
    ids = _token_ids(ints, position_inputs, dynamic)
    if ids is None:
        raise UnknownInputError(
            "no graph input indexes an embedding table (a Gather of a constant table by an integer input): "
            f"cannot tell the token ids among {[v.name for v in graph.inputs]}"
        )
    rank2 = [v for v in ints if v is not ids and v not in position_inputs and v.shape is not None and len(v.shape) == 2]
    mask_inputs = list(reached_by_data(_mask_sinks(graph), rank2, stop=_score_matmul(dynamic)))
    position_inputs = [v for v in position_inputs if v is not ids and v not in mask_inputs]
    rest = [v for v in ints if v is not ids and v not in mask_inputs and v not in position_inputs]
    for value in rest:
        by_name = {"attention_mask": mask_inputs, "position_ids": position_inputs}.get(value.name or "")
        if by_name is not None and not by_name:
            logger.info("input %r reaches no mask or RoPE by data flow: taken by its name", value.name)
            by_name.append(value)
    for role, found in (("attention mask", mask_inputs), ("position ids", position_inputs)):
        if len(found) > 1:
            raise UnknownInputError(
                f"inputs {[v.name for v in found]} all look like the {role}: cannot tell them apart"
            )
    known = {id(ids), *cache_ids, *map(id, mask_inputs), *map(id, position_inputs)}
    for value in graph.inputs:
        if id(value) not in known:
            raise UnknownInputError(
                f"model input {value.name!r} ({value.dtype}, shape {value.shape}) has no role rotgraph knows "
                f"({ROLES}): its data reaches neither the embedding, the KV cache, RoPE nor an attention mask"
            )
    return InputRoles(
        ids.name or "",
        mask_inputs[0].name if mask_inputs else None,
        position_inputs[0].name if position_inputs else None,
        tuple(_cache_input(graph, past, present) for past, present in caches),
        padding="right" if any(v in lengths for v in mask_inputs) else "left",
        int32=frozenset(v.name or "" for v in ints if v.dtype == ir.DataType.INT32),
    )


def _sources(starts: Iterable[ir.Value], stop: Callable[[ir.Node], bool] | None = None) -> set[int]:
    """ids of every value whose data (not only its shape) flows into `starts`; the walk does not pass
    the nodes for which `stop(node)` is true."""
    seen: set[int] = set()
    stack = [v for v in starts if v is not None]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        producer = current.producer()
        if producer is None or producer.op_type in _SHAPE_READERS or (stop is not None and stop(producer)):
            continue
        stack.extend(i for i in producer.inputs if i is not None and id(i) not in seen)
    return seen


def reached_by_data(
    sinks: list[ir.Value], candidates: list[ir.Value], stop: Callable[[ir.Node], bool] | None = None
) -> list[ir.Value]:
    """The `candidates` whose data (not only their shapes) flows into any of `sinks`."""
    found = _sources(sinks, stop)
    return [v for v in candidates if id(v) in found]


def _key(node: ir.Node) -> tuple[str, str]:
    return node.op_type, "" if node.domain == "ai.onnx" else node.domain


def _operands(node: ir.Node, indices: Iterable[int]) -> list[ir.Value]:
    return [node.inputs[i] for i in indices if i < len(node.inputs) and node.inputs[i] is not None]  # type: ignore[misc]


def _position_sinks(graph: ir.Graph) -> list[ir.Value]:
    sinks: list[ir.Value] = []
    for node in graph:
        if node.op_type in ("Cos", "Sin") and node.domain in ("", "ai.onnx"):
            sinks += _operands(node, [0])
        elif _key(node) in _POSITIONS:
            sinks += _operands(node, [_POSITIONS[_key(node)]])
    return sinks


def _mask_sinks(graph: ir.Graph) -> list[ir.Value]:
    sinks: list[ir.Value] = []
    for node in graph:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            sinks += _operands(node, [0])
        elif _key(node) in _FUSED_MASK:
            sinks += _operands(node, _FUSED_MASK[_key(node)])
    return sinks


def _dynamic(graph: ir.Graph) -> set[int]:
    """ids of the values computed from graph inputs (by data or shape); the others are constants."""
    dynamic = {id(v) for v in graph.inputs if not v.is_initializer()}
    for node in graph:  # topological order
        if any(i is not None and id(i) in dynamic for i in node.inputs):
            dynamic.update(id(o) for o in node.outputs)
    return dynamic


def _score_matmul(dynamic: set[int]) -> Callable[[ir.Node], bool]:
    """A MatMul of two activations (Q K^T or probabilities x V): the mask walk does not pass it."""

    def check(node: ir.Node) -> bool:
        operands = node.inputs[:2]
        return node.op_type in ("MatMul", "FusedMatMul") and all(i is not None and id(i) in dynamic for i in operands)

    return check


def _token_ids(ints: list[ir.Value], position_inputs: list[ir.Value], dynamic: set[int]) -> ir.Value | None:
    tables: dict[int, int] = {}
    for value in ints:
        for use in value.uses():
            node = use.node
            table = node.inputs[0]
            if _key(node) in _EMBEDDING and use.idx == 1 and table is not None and id(table) not in dynamic:
                size = table.shape.numpy() if table.shape is not None and table.shape.is_static() else ()
                tables[id(value)] = max(tables.get(id(value), 0), int(np.prod(size)) if size else 0)
    candidates = [v for v in ints if id(v) in tables]
    if len(candidates) > 1:
        candidates = [v for v in candidates if v not in position_inputs] or candidates
    return max(candidates, key=lambda v: tables[id(v)], default=None)


def _caches(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """(past input, present output) of every KV cache, in graph input order."""
    outputs = set(map(id, graph.outputs))
    found = []
    for past in graph.inputs:
        present = _present_of(past, outputs)
        if present is not None:
            found.append((past, present))
    return found


def _present_of(past: ir.Value, outputs: set[int]) -> ir.Value | None:
    for use in past.uses():
        node = use.node
        if _is_sequence_slice(node):  # a sliding window reads the last part of the past
            inner = [_present_of_concat(u.node, outputs) for u in node.outputs[0].uses() if u.idx == 0]
            hits = [v for v in inner if v is not None]
            if hits:
                return hits[0]
        elif use.idx == 0:
            present = _present_of_concat(node, outputs)
            if present is not None:
                return present
        if _key(node) in _FUSED_CACHE and use.idx in _FUSED_CACHE[_key(node)]:
            out = node.outputs[1 + _FUSED_CACHE[_key(node)].index(use.idx)]
            if id(out) in outputs:
                return out
    return None


def _present_of_concat(node: ir.Node, outputs: set[int]) -> ir.Value | None:
    if node.op_type != "Concat" or len(node.inputs) != 2 or node.attributes.get_int("axis", 0) not in (2, -2):
        return None
    result = node.outputs[0]
    if id(result) in outputs:
        return result
    cut = [u.node.outputs[0] for u in result.uses() if _is_sequence_slice(u.node) and id(u.node.outputs[0]) in outputs]
    return cut[0] if len(cut) == 1 else None


def _is_sequence_slice(node: ir.Node) -> bool:
    if node.op_type != "Slice" or len(node.inputs) < 4 or node.inputs[3] is None:
        return False
    axes = node.inputs[3].const_value
    return axes is not None and axes.numpy().tolist() in ([2], [-2])


def _cache_input(graph: ir.Graph, past: ir.Value, present: ir.Value) -> CacheInput:
    """Heads and width from the input's shape, else from the fused attention that reads it."""
    where = f"KV cache input {past.name!r}"
    if past.dtype not in _NUMPY or (past.shape is not None and len(past.shape) != 4):
        raise UnknownInputError(
            f"{where}: expected a float, int8 or uint8 tensor of rank 4, found {past.dtype} {past.shape}"
        )
    dims = list(past.shape) if past.shape is not None else [None] * 4
    heads, width = dims[1], dims[3]
    fused = [u.node for u in past.uses() if _key(u.node) in _FUSED_CACHE]
    if fused and not isinstance(heads, int):
        heads = fused[0].attributes.get_int("kv_num_heads", fused[0].attributes.get_int("num_heads", 0)) or None
    if fused and not isinstance(width, int) and isinstance(heads, int):
        width = _fused_head_size(fused[0], heads)
    if not isinstance(heads, int) or not isinstance(width, int):
        raise UnknownInputError(f"{where}: cannot tell its heads and head width from the shape {past.shape}")
    return CacheInput(past.name or "", present.name or "", heads, width, _NUMPY[past.dtype])


def _fused_head_size(node: ir.Node, kv_heads: int) -> int | None:
    """Head size of a fused attention: from K's width, or a packed QKV's, or RoPE's cos cache."""
    heads = node.attributes.get_int("num_heads", 0)
    query, key = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    for value, count in ((key, kv_heads), (query if key is None else None, heads + 2 * kv_heads)):
        last = value.shape[-1] if value is not None and value.shape is not None and len(value.shape) else None
        if isinstance(last, int) and count:
            return last // count
    cos = node.inputs[7] if _key(node) == ("GroupQueryAttention", _MS) and len(node.inputs) > 7 else None
    half = cos.shape[-1] if cos is not None and cos.shape is not None and len(cos.shape) == 2 else None
    return 2 * half if isinstance(half, int) else None
