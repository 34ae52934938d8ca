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
