"""Batches of token rows of different lengths: padding, the positions of padded rows, and the check that
rows suit a graph that reads only each row's length (onnxruntime-genai builder graphs)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from rotgraph.errors import RotgraphError


def positions(mask: np.ndarray) -> np.ndarray:
    """Position of every column of `mask` [batch, total]: real tokens counted from 0, padding at 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def left_padded(rows: Iterable[np.ndarray], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [batch, longest] for rows of different lengths, padded on the left with `pad`."""
    return _padded(rows, pad, left=True)


def right_padded(rows: Iterable[np.ndarray], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) [batch, longest] for rows of different lengths, padded on the right with `pad`."""
    return _padded(rows, pad, left=False)


def _padded(rows: Iterable[np.ndarray], pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    rows = [np.asarray(r, dtype=np.int64) for r in rows]
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if left else slice(0, len(r))
        tokens[i, where] = r
        mask[i, where] = 1
    return tokens, mask


def check_right_padded(mask: np.ndarray, past_len: int) -> None:
    """The new columns of `mask` as a graph that reads only each row's count of tokens takes them: each row's
    real tokens first, then padding; all real after a cache."""
    new = mask[:, past_len:]
    why = (
        "the model's attention mask becomes GroupQueryAttention's seqlens_k (as onnxruntime-genai's builder makes "
        "it), which gives each row's length only: "
    )
    if past_len and not new.all():
        raise RotgraphError(why + "in a step after a KV cache every new token must be real (no padding)")
    if (np.diff(new, axis=1) > 0).any() or not new[:, :1].all():
        raise RotgraphError(why + "pad rows on the right (real tokens first); rows padded on the left are refused")
