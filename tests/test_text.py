from __future__ import annotations

import pytest

from rotgraph.errors import RotgraphError
from rotgraph.text import clean_wikitext, load_text

WIKI = """{{Infobox person|name=Ada}}
'''Ada Lovelace''' was an English [[mathematician]] and writer, chiefly known for her work on
[[Charles Babbage]]'s proposed mechanical general-purpose computer, the [[Analytical Engine]].<ref>Some
source, 1990.</ref> She was the first to recognise that the machine had applications beyond pure
calculation, and to have published the first algorithm intended to be carried out by such a machine.

== Early life ==
* a list item that is not prose
{| class="wikitable"
| a table cell
|}
[[Category:Mathematicians]]
"""


def test_clean_wikitext_keeps_prose_only() -> None:
    text = clean_wikitext(WIKI)
    assert text.startswith("Ada Lovelace was an English mathematician and writer")
    assert "Analytical Engine" in text
    for junk in ("Infobox", "Some source", "Early life", "list item", "table cell", "Category", "[[", "'''"):
        assert junk not in text


def test_user_text_file(tmp_path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("héllo wörld", encoding="utf-8")
    assert load_text(path=p) == "héllo wörld"
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(RotgraphError, match="not UTF-8"):
        load_text(path=p)
    with pytest.raises(RotgraphError, match="no such text file"):
        load_text(path=tmp_path / "missing.txt")


def test_wikipedia_splits_are_disjoint_and_large() -> None:
    # Needs the gensim wheel from PyPI on first use (then cached), like the package itself.
    calibration, evaluation = load_text("calibration"), load_text("evaluation")
    assert len(calibration) > 1_000_000 and len(evaluation) > 1_000_000
    first_eval_paragraph = evaluation.split("\n\n")[0]
    assert first_eval_paragraph not in calibration
    assert "Anarchism is a political philosophy" in calibration


def _metaspace_tokenizer(path, text: str) -> None:
    """A BPE over SentencePiece's Metaspace pre-tokenizer, which prepends "▁" to every input."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]))
    tok.save(str(path))


@pytest.mark.parametrize("kind", ["byte-level BPE", "SentencePiece-style"])
def test_long_texts_encode_a_piece_at_a_time_to_the_same_ids(tmp_path, monkeypatch, kind: str) -> None:
    """`tokenize.encode` cuts a long text into pieces only where no token spans the cut: the ids equal one
    encoding of the whole text, for a byte-level BPE (cut into many pieces) and for a tokenizer that marks
    the start of every input (SentencePiece's Metaspace: no cut is safe, so it encodes the text whole)."""
    from rotgraph import tokenize
    from rotgraph.testing import train_tokenizer

    text = load_text("calibration")[:100_000]
    path = tmp_path / "tokenizer.json"
    if kind == "byte-level BPE":
        train_tokenizer(512).save(str(path))
    else:
        _metaspace_tokenizer(path, text)
    monkeypatch.setattr(tokenize, "PIECE_CHARS", 4096)
    cuts: list[int | None] = []
    real_cut = tokenize._cut
    monkeypatch.setattr(tokenize, "_cut", lambda *a, **k: cuts.append(real_cut(*a, **k)) or cuts[-1])
    whole = list(tokenize._tokenizer(path).encode(text, add_special_tokens=False).ids)
    assert tokenize.encode(path, text) == whole
    if kind == "byte-level BPE":
        assert len(cuts) > 10 and None not in cuts
    else:
        assert cuts == [None]
