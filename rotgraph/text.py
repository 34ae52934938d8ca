"""Real English text for calibration and evaluation.

Source: the Wikipedia excerpt that ships in the gensim wheel on PyPI
(`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`,
text CC BY-SA, from Wikipedia). rotgraph reads that file from an installed gensim if there is one, else
downloads the wheel (`pip download --no-deps gensim==4.4.0`, 28 MB) into a temporary folder once; gensim
itself is never imported. MediaWiki markup is stripped with mwparserfromhell; redirects, templates,
references, tables, headings and list items are dropped and prose paragraphs kept. The cleaned articles
are cached as JSON under `$XDG_CACHE_HOME/rotgraph` (default `~/.cache/rotgraph`).

Split, fixed: articles in file order; even positions (0, 2, 4, ...) are the calibration split, odd
positions the evaluation split.
"""

from __future__ import annotations

import bz2
import contextlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Literal

from rotgraph.errors import RotgraphError

logger = logging.getLogger(__name__)

GENSIM_VERSION = "4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_NAME = "wikipedia-gensim-v1.json"
Split = Literal["calibration", "evaluation"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rotgraph"


def _raw_dump() -> bytes:
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))).parent / MEMBER
        if path.is_file():
            return path.read_bytes()
    logger.info("downloading the gensim %s wheel (28 MB) for its Wikipedia excerpt", GENSIM_VERSION)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, f"gensim=={GENSIM_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("gensim-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RotgraphError(
                "cannot get the Wikipedia text: `pip download gensim` failed "
                f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); pass --text FILE instead"
            )
        with zipfile.ZipFile(wheels[0]) as z:
            return z.read(MEMBER)


_DROP_LINE = re.compile(r"^\s*([=*#:;|!{}]|thumb\||File:|Image:|Category:)")


def clean_wikitext(wikitext: str) -> str:
    """Prose paragraphs of one article, markup stripped."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).lower() in ("ref", "table", "gallery", "math", "references"):
            with contextlib.suppress(ValueError):
                code.remove(tag)
    for template in code.filter_templates(recursive=False):
        with contextlib.suppress(ValueError):
            code.remove(template)
    text = code.strip_code(normalize=True, collapse=True)
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip() and not _DROP_LINE.match(ln)]
        joined = " ".join(lines)
        joined = re.sub(r"\(\s*[,;]?\s*\)", "", joined)
        joined = re.sub(r"\s+", " ", joined).strip()
        if len(joined) >= 200 and joined.count(" ") >= 30:
            paragraphs.append(joined)
    return "\n\n".join(paragraphs)


def _parse(dump: bytes) -> list[dict[str, str]]:
    articles = []
    root = ET.fromstring(bz2.decompress(dump))
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{ns}page"):
        if page.find(f"{ns}redirect") is not None or (page.findtext(f"{ns}ns") or "0") != "0":
            continue
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        if raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = clean_wikitext(raw)
        if text:
            articles.append({"title": page.findtext(f"{ns}title") or "", "text": text})
    return articles


def wikipedia_articles() -> list[dict[str, str]]:
    """Cleaned articles (title, text), from the cache or built once."""
    path = cache_dir() / CACHE_NAME
    if path.is_file():
        return list(json.loads(path.read_text(encoding="utf-8")))
    articles = _parse(_raw_dump())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(articles), encoding="utf-8")
    os.replace(tmp, path)
    return articles


def load_text(split: Split = "evaluation", path: str | os.PathLike[str] | None = None) -> str:
    """The given UTF-8 file, or one split of the Wikipedia excerpt."""
    if path is not None:
        p = Path(path)
        try:
            return p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RotgraphError(f"{p}: no such text file") from None
        except UnicodeDecodeError as e:
            raise RotgraphError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    articles = wikipedia_articles()
    offset = 0 if split == "calibration" else 1
    return "\n\n".join(a["text"] for a in articles[offset::2])
