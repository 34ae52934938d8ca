"""Tokenizing with a `tokenizer.json` (Hugging Face tokenizers), no BOS added."""

from __future__ import annotations

import functools
from pathlib import Path

from rotgraph.errors import RotgraphError


@functools.cache
def _tokenizer(path: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise RotgraphError(f"{path}: not a tokenizer.json ({e})") from None


def encode(path: Path, text: str) -> list[int]:
    return list(_tokenizer(path).encode(text, add_special_tokens=False).ids)


def decode(path: Path, ids: list[int]) -> str:
    return str(_tokenizer(path).decode(ids))
