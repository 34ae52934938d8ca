"""The documentation stays true: docs/cli.md is the parser's, README.md stays short, links resolve."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]


def cli_docs() -> ModuleType:
    """scripts/cli_docs.py, loaded from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_links(markdown: str) -> list[str]:
    """Targets of inline links and images and of reference definitions, outside code, that are not URLs
    or same-page anchors; without their #fragment."""
    text = re.sub(r"^(```|~~~).*?^\1", "", markdown, flags=re.S | re.M)  # fenced blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    found = []
    for target in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and anchors on the same page
        found.append(target.split("#", 1)[0])
    return found


def test_cli_reference_is_generated_from_the_parser() -> None:
    module = cli_docs()
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == module.current(), (
        "docs/cli.md differs from what rotgraph.cli.parser() gives: run `python scripts/cli_docs.py` and commit it"
    )


def test_cli_reference_lists_every_subcommand_and_option() -> None:
    from rotgraph.cli import parser

    page = (ROOT / "docs" / "cli.md").read_text()
    subparsers = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert f"## rotgraph {name}\n" in page, name
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page or f", {flag}" in page, f"{name} {flag}"


def test_check_mode_fails_on_a_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = cli_docs()
    page = tmp_path / "cli.md"
    assert module.main(["--output", str(page)]) == 0
    assert module.main(["--check", "--output", str(page)]) == 0
    page.write_text(page.read_text().replace("--seed", "--sead", 1))
    assert module.main(["--check", "--output", str(page)]) == 1
    assert "python scripts/cli_docs.py" in capsys.readouterr().err


def test_render_is_deterministic_and_independent_of_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    module = cli_docs()
    monkeypatch.setenv("COLUMNS", "40")
    narrow = module.current()
    monkeypatch.setenv("COLUMNS", "300")
    assert module.current() == narrow


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference material to docs/ and "
        "results to benchmarks/RESULTS.md"
    )


def test_readme_commands_parse() -> None:
    """Every `rotgraph ...` line of README.md's bash blocks is accepted by the current parser."""
    from rotgraph.cli import parser

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.startswith("rotgraph ")]
    assert len(commands) >= 5, "README.md's quick start lost its commands"
    for command in commands:
        argv = shlex.split(command, comments=True)[1:]
        try:
            parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README.md: `{command}` is not accepted by rotgraph.cli.parser()")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page: Path) -> None:
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_finder_sees_links_and_skips_code_and_urls() -> None:
    markdown = (
        'See [a](docs/a.md), ![img](docs/b.png "title") and [c](c.md#part).\n'
        "[ref]: docs/d.md\n"
        "`[not](code.md)` and [web](https://example.com) and [here](#anchor)\n"
        "```\n[fenced](fenced.md)\n```\n"
    )
    assert relative_links(markdown) == ["docs/a.md", "docs/b.png", "c.md", "docs/d.md"]
