"""Where R1 and R2 fold into the weights: stated once, read by the rotation passes and by learning.

R1, an orthogonal Q (hidden x hidden), turns the residual stream x into x Q:
- readers, the Linears whose input is the (normalized) residual stream: Q, K, V, gate and up of every
  block and lm_head. W -> Q^T W; their biases are unchanged.
- writers, the Linears whose output is added to the residual stream: O and down of every block.
  W -> W Q and b -> b Q. The embedding table starts the stream and is folded like a writer: E -> E Q.

R2, an orthogonal H (head_dim x head_dim) per layer, rotates the value space of every head: V's output
columns per KV head (W_v -> W_v H, b_v -> b_v H) and O's input rows per query head (W_o -> H^T W_o).
Attention mixes positions, never coordinates within a head, so query head i's output P_i V_g(i) H meets
H^T in O; with grouped-query attention the query heads of a group read their KV head g(i) and share its
rotation, which holds because every head of a layer uses the same H. In a packed QKV MatMul (V a column
range of it, `Linear.columns`) only V's columns and V's part of the bias rotate.

The functions here work on numpy arrays (the passes, in float64) and on torch tensors (learning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from rotgraph.structure.model import Linear, ModelDescription
from rotgraph.weights import column_wise, row_wise

if TYPE_CHECKING:
    import torch

Array = TypeVar("Array", np.ndarray, "torch.Tensor")


def r1_readers(desc: ModelDescription) -> list[Linear]:
    """The Linears reading the residual stream (W -> Q^T W): per block Q, K, V, gate, up; then lm_head."""
    return [lin for group in desc.norm_readers() for lin in group]


def r1_writers(desc: ModelDescription) -> list[Linear]:
    """The Linears writing the residual stream (W -> W Q, b -> b Q): per block O, down. The embedding
    table (`desc.embedding_table`, E -> E Q) is the stream's first writer and no Linear."""
    return [lin for b in desc.blocks for lin in (b.attention.o, b.mlp.down)]


@dataclass(frozen=True)
class R2Pair:
    """One layer's R2 sites: V's columns per KV head and O's rows per query head, with the head layout."""

    layer: int
    v: Linear  # [hidden, num_kv_heads * head_dim]: W_v -> W_v H per KV head, and its bias
    o: Linear  # [num_heads * head_dim, hidden]: W_o -> H^T W_o per query head
    head_dim: int
    num_heads: int
    num_kv_heads: int

    @property
    def group(self) -> int:
        """Query heads per KV head: query head i reads KV head i // group and shares its rotation."""
        return self.num_heads // self.num_kv_heads


def r2_pairs(desc: ModelDescription) -> list[R2Pair]:
    """Every layer's V and O, in layer order."""
    return [
        R2Pair(b.index, a.v, a.o, a.head_dim, a.num_heads, a.num_kv_heads) for b in desc.blocks for a in (b.attention,)
    ]


@row_wise
def rotate_head_columns(w: Array, h: Array) -> Array:
    """[..., heads * d] -> each head's d columns times h (V's weight and bias under R2)."""
    d = h.shape[0]
    return (w.reshape(*w.shape[:-1], -1, d) @ h).reshape(w.shape)


@row_wise
def rotate_head_columns_in(w: Array, h: Array, columns: tuple[int, int] | None) -> Array:
    """`rotate_head_columns` on the column range `columns` of w (V inside a packed QKV), or all of w."""
    if columns is None:
        return rotate_head_columns(w, h)
    start, stop = columns
    out = w.copy() if isinstance(w, np.ndarray) else w.clone()
    out[..., start:stop] = rotate_head_columns(w[..., start:stop], h)
    return out


@column_wise
def rotate_head_rows(w: Array, h: Array) -> Array:
    """[heads * d, out] -> h^T times each head's d rows (O's weight under R2)."""
    d = h.shape[0]
    return (h.T @ w.reshape(-1, d, w.shape[1])).reshape(w.shape)
