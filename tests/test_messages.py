"""What rotgraph tells a user to type exists: every `--option` its messages, help texts and docstrings
name is an option of the command it belongs to, and every `--set section.field=...` names a field."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from rotgraph import config
from rotgraph.cli import parser
from rotgraph.errors import RotgraphError
from rotgraph.options import QuantOptions
from rotgraph.synthetic.cli import parser as synthetic_parser

PACKAGE = Path(__file__).resolve().parent.parent / "rotgraph"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SET_KEY = re.compile(r"--set\s+([a-z_]+(?:\.[a-z_]+)?)=")
PLACEHOLDER_KEYS = {"section.field"}  # `--set section.field=value` says what the option takes
# The command a module's strings speak of where a string names none (`quantize --group`); modules
# not listed serve several commands and may name any command's options.
MODULE_COMMAND = {
    "learn.py": "learn",
    "learning/": "learn",
    "options.py": "quantize",
    "config.py": "quantize",
    "recipes.py": "quantize",
    "stages.py": "quantize",
    "quantize.py": "quantize",
    "validation.py": "quantize",
    "calibrate.py": "quantize",
    "quant.py": "quantize",
    "passes/": "quantize",
    "synthetic/": "synthetic",  # python -m rotgraph.synthetic, its own command line
}


def command_options() -> dict[str, set[str]]:
    """{command: its option strings}; "rotgraph" is the top-level parser's."""
    top = parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = {name: set(sub._option_string_actions) for name, sub in subparsers.choices.items()}
    out["rotgraph"] = set(top._option_string_actions)
    out["synthetic"] = set(synthetic_parser()._option_string_actions)
    return out


OPTIONS = command_options()
NAMED_COMMAND = re.compile(rf"\b({'|'.join(OPTIONS)})\s+$")  # quantize --x, export --with-past
SPAN_COMMAND = re.compile(
    rf"^(?:rotgraph\s+)?({'|'.join(OPTIONS)})\s"
)  # `rotgraph quantize --rotation x --rotations y`
PIP = re.compile(r"\bpip\s+(?:install|download)\b[^`]*$")


def module_strings(path: Path) -> list[str]:
    """Every string constant of a module (f-strings' literal parts included), but lone option strings:
    `add_argument("--x")`, `flag="--x"` and argument vectors name options, they do not mention them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return [t for t in texts if not FLAG.fullmatch(t)]


def help_texts() -> list[tuple[str, str]]:
    """(command, text) for each subcommand's help, description and options' help."""
    top = parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out = [("rotgraph", a.help or "") for a in top._actions if a.help]
    out += [(c.dest, c.help or "") for c in subparsers._choices_actions]
    for name, sub in subparsers.choices.items():
        out += [(name, sub.description or "")] + [(name, a.help) for a in sub._actions if a.help]
    return out


def unknown_spellings(command: str | None, text: str) -> list[str]:
    """The `--option`s and `--set` keys in `text` that its command (None: any command) does not have."""
    fields = config.field_types()
    bad = []
    for m in FLAG.finditer(text):
        before = text[: m.start()]
        if PIP.search(before):
            continue  # pip's own options
        named = NAMED_COMMAND.search(before)
        if before.count("`") % 2:  # inside a code span: the command it starts with
            named = SPAN_COMMAND.match(before[before.rfind("`") + 1 :]) or named
        owner = named[1] if named else command
        known = OPTIONS[owner] if owner else set().union(*OPTIONS.values())
        if m[0] not in known:
            bad.append(f"{owner or 'any command'}: {m[0]}")
    bad += [f"--set {key}: no such field" for key in SET_KEY.findall(text) if key not in {*fields, *PLACEHOLDER_KEYS}]
    return bad


def all_unknown_spellings() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        command = next((c for prefix, c in MODULE_COMMAND.items() if relative.startswith(prefix)), None)
        if relative == "cli.py":
            command = None  # its help texts are checked per command below
        for text in module_strings(path):
            bad += [
                f"rotgraph/{relative}: {b} in {' '.join(text.split())[:120]!r}"
                for b in unknown_spellings(command, text)
            ]
    for command, text in help_texts():
        bad += [f"{command} --help: {b} in {' '.join(text.split())[:120]!r}" for b in unknown_spellings(command, text)]
    return bad


def test_every_option_a_message_names_exists() -> None:
    bad = all_unknown_spellings()
    assert not bad, "\n".join(bad)


def test_the_check_finds_a_stale_spelling() -> None:
    assert unknown_spellings("quantize", "pass --act-clip search") == ["quantize: --act-clip"]
    assert unknown_spellings("learn", "learn with `quantize --act-clip`") == ["quantize: --act-clip"]
    assert unknown_spellings("learn", "as --act-clip does") == []
    assert unknown_spellings("learn", "`rotgraph quantize --rotation learned --act-clip 1`") == ["quantize: --act-clip"]
    assert unknown_spellings(None, "--set weights.grup=3") == ["--set weights.grup: no such field"]
    assert unknown_spellings("export", "`pip install --no-deps x`; `rotgraph export --with-past`") == []


def test_every_plan_field_has_a_setting() -> None:
    """`config.setting` names each QuantOptions field the way a user sets it: its flag, else `--set`."""
    for name in QuantOptions.__dataclass_fields__:
        assert config.OPTION_FIELDS[name] in config.field_types(), name
        text = config.setting(name, "X")
        assert text.startswith("--set ") or text.split()[0] in OPTIONS["quantize"], text
        assert not unknown_spellings("quantize", text), text
    assert config.setting("group", 0) == "--group 0"
    assert config.setting("act_clip_search") == "--set activations.clip=search"
    assert config.setting("center_keys", True) == "--set kv_cache.center_keys=true"
    assert config.setting("opset") == "--set output.opset=OPSET"


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"act_clip_search": True, "scheme": "w4a16"}, "--set activations.clip=search"),
        ({"act_clip_search": True, "act_clip": 0.9}, "--set activations.clip"),
        ({"act_asymmetric": True, "scheme": "w4a4", "activations": "static"}, "--set activations.asymmetric=true"),
        ({"center_activations": True, "scheme": "w4a16"}, "--set activations.center=true"),
        ({"center_keys": True, "scheme": "w4a8"}, "--set kv_cache.center_keys=true"),
        ({"wide_ratio": 0.5, "activations": "static"}, "--set activations.wide_ratio=0.5"),
        ({"shared_head": True, "head_bits": 16}, "--set weights.head_bits=8"),
        ({"scheme": "w4a8kv4", "fmt": "genai", "kv_cache": "rotgraph"}, "--set kv_cache.store=onnxruntime"),
        ({"scheme": "w4a8kv4", "fmt": "ort", "fused_attention": False, "kv_cache": "onnxruntime"}, "fused_attention"),
        ({"fmt": "ort", "opset": 21}, "--set output.opset"),
        ({"scheme": "w8a8", "opset": 19}, "--group 0"),
        ({"rotation": "spinquant"}, "--rotation learned needs --rotations FILE"),
        ({"out_hadamard": True, "online": False}, "--set rotation.online=true"),
    ],
)
def test_a_refused_plan_names_the_setting(options: dict, setting: str) -> None:
    """QuantOptions refuses a combination in the terms a user sets it with."""
    with pytest.raises(RotgraphError, match=re.escape(setting)):
        QuantOptions(**options)
