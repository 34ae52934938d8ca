"""Tokenizing with a `tokenizer.json` (Hugging Face tokenizers), no BOS added."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from rotgraph.errors import RotgraphError


@functools.cache
def _tokenizer(path: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise RotgraphError(f"{path}: not a tokenizer.json ({e})") from None


# A text longer than this is encoded a piece at a time: one encoding of the 1.5 MB calibration split held
# 350 MB (the tokenizer keeps tokens, offsets and alignments per character), more than the weights of a
# small model.
PIECE_CHARS = 1 << 16
# Characters each side of a cut that must tokenize the same whole and as two pieces.
CUT_CONTEXT = 256


def encode(path: Path, text: str) -> list[int]:
    """The ids of `text`, the same as one encoding of it: a long text is cut between paragraphs where its
    neighbourhood tokenizes the same whole and in two pieces (so no token spans the cut), and encoded a
    piece at a time; where no such cut is found (a tokenizer that marks the start of every input, as
    SentencePiece's does) the rest is encoded at once."""
    tokenizer = _tokenizer(path)

    def ids(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False).ids)

    found: list[int] = []
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _cut(ids, text, start + PIECE_CHARS)
        if cut is None:
            break
        found += ids(text[start:cut])
        start = cut
    return found + ids(text[start:])


def _cut(ids: Callable[[str], list[int]], text: str, near: int, tries: int = 8) -> int | None:
    """A position at or after `near` before a paragraph break ("\n\n") whose neighbourhood (CUT_CONTEXT
    characters each side) tokenizes the same whole and in two pieces."""
    at = near
    for _ in range(tries):
        at = text.find("\n\n", at)
        if at < 0:
            return None
        left, right = text[max(0, at - CUT_CONTEXT) : at], text[at : at + CUT_CONTEXT]
        if ids(left + right) == ids(left) + ids(right):
            return at
        at += 2
    return None


def decode(path: Path, ids: list[int]) -> str:
    return str(_tokenizer(path).decode(ids))
