"""The quantization configuration: one typed, nested value that says what `rotgraph quantize` does.

`QuantConfig` has a section per concern (rotation, weights, activations, KV cache, calibration text,
output). A field whose value is `"auto"` is filled in by `rotgraph.recipes.resolve` with the best recipe
measured for the scheme and format, or, where that recipe needs calibration text and the model has no
tokenizer beside it, with what needs none (one warning line says so). Named recipes are presets of the
configuration (`rotgraph.recipes.RECIPES`). The resolved value is what every output records (`recorded`:
in the model's metadata and as a file beside it), and reading that file back with `--config` reproduces
the output bit for bit. The command line's options are generated from the fields (`rotgraph.cli`); every
field is also reachable as `--set section.field=value`.

`to_options` flattens a resolved configuration into the `QuantOptions` plan the pipeline's stages read.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rotgraph.errors import RotgraphError
from rotgraph.options import ORT_FORMATS, QuantOptions, Scheme

AUTO = "auto"
CONFIG_SUFFIX = ".rotgraph.json"  # the resolved configuration beside each output: OUT.onnx -> OUT.rotgraph.json


def _field(default: Any, help: str, flag: str | None = None) -> Any:
    """A configuration field: its default, the help text the CLI and docs/cli.md show, and the command-line
    flag it has (the others are set with `--set section.field=value`)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class Rotation:
    kind: str = _field("quarot", "none | quarot | learned (the R1/R2 of a `rotgraph learn` file)", flag="--rotation")
    rotations: str | None = _field(None, "learned: the file `rotgraph learn` wrote", flag="--rotations")
    seed: int = _field(0, "QuaRot's random Hadamard signs", flag="--seed")
    online: bool = _field(True, "the online Hadamards R3 (kv schemes) and R4 (before down_proj)")
    out_hadamard: bool | str = _field(AUTO, "an online Hadamard before o_proj; auto: with 4-bit activations")


@dataclass(frozen=True)
class Weights:
    method: str = _field(
        AUTO, "rtn | gptq; auto: GPTQ for 4-bit weights (needs calibration text), RTN for 8-bit", flag="--weights"
    )
    group: int | str = _field(
        AUTO,
        "group size along the input axis, 0 per channel; auto: 64 for 4-bit weights (32 in qdq at 4-bit "
        "activations), 0 with static activations, else 32",
        flag="--group",
    )
    symmetric: bool = _field(True, "symmetric grid (false: unsigned codes + zero points)")
    full_range: bool | str = _field(AUTO, "symmetric: all 2^b codes per group where it helps; auto: 4-bit weights")
    head_bits: int = _field(8, "embedding and lm_head: 4 or 8 (RTN) or 16 (float)")
    head_group: int | None = _field(None, "their group size; None: the same as `group`")
    shared_head: bool | str = _field(
        AUTO,
        "embedding and lm_head read one quantized table; auto: for 4-bit weights (in qdq not at 4-bit activations)",
    )
    damp: float = _field(0.01, "GPTQ damping, fraction of the mean Hessian diagonal")
    act_order: bool = _field(True, "GPTQ: columns in order of decreasing Hessian diagonal")
    sequential: bool = _field(
        False,
        "GPTQ block by block, each block's Hessians from the blocks before it as quantized (GPTQ's sequential "
        "mode; one block's Hessians in memory at a time)",
    )


@dataclass(frozen=True)
class Activations:
    mode: str = _field(
        AUTO,
        "dynamic (per token at run time) | static (calibrated Q/DQ, qdq); auto: static for w8a8 in qdq (integer "
        "kernels on edge compilers), else dynamic",
        flag="--activations",
    )
    clip: float | str | None = _field(
        AUTO, "dynamic: a clip ratio, or `search` per input; None: 0.9 at 4 bits, 1 at 8; auto: search at 4 bits"
    )
    asymmetric: bool | str = _field(AUTO, "dynamic: per-token min/max grid with a zero point; auto: at 4 bits")
    center: bool | str = _field(AUTO, "dynamic: each projection input's mean moved into a bias; auto: at 4 bits")
    smooth: float | None = _field(None, "SmoothQuant migration strength alpha; None: off")
    static_symmetric: bool = _field(False, "static: signed codes (default: unsigned + zero point)")
    static_ranges: str = _field("minmax", "static: minmax | percentile | entropy")
    wide_ratio: float | str | None = _field(
        AUTO, "static: 16-bit Q/DQ on inputs whose max |x| exceeds this many times the median token's; auto: 16"
    )


@dataclass(frozen=True)
class KVCache:
    clip: float | str | None = _field(AUTO, "the cache quantizer's clip ratio; auto: 0.95 at 4 bits, 1 at 8")
    store: str = _field(
        AUTO,
        "ort/genai: onnxruntime (codes inside GroupQueryAttention) | rotgraph (per-token codes); auto: "
        "onnxruntime for genai and kv8",
    )
    center_keys: bool | str = _field(
        AUTO, "rotgraph's cache: the keys' mean subtracted before the quantizer; auto: at 4-bit activations"
    )


@dataclass(frozen=True)
class Calibration:
    windows: int = _field(32, "windows of calibration text (the clip search and the means read the first 8)")
    seq_len: int = _field(512, "tokens per window")
    text: str | None = _field(None, "a UTF-8 file; None: the calibration split of the Wikipedia excerpt", flag="--text")


@dataclass(frozen=True)
class Output:
    format: str = _field(
        "qdq",
        "qdq (standard Q/DQ ONNX) | ort (onnxruntime's ops) | genai (an onnxruntime-genai folder)",
        flag="--format",
    )
    opset: int | str | None = _field(
        AUTO, "qdq: standard ONNX at this opset (17-23); None: rotgraph's functions; auto: 23 with static activations"
    )
    fused_attention: bool = _field(True, "ort/genai: onnxruntime's GroupQueryAttention where the cache allows")
    deployment_fusion: bool = _field(True, "ort/genai: RoPE into attention, packed QKV and gate/up, fused norms")
    context_length: int | None = _field(None, "ort/genai: positions RoPE covers; None: the model's (else 4096)")


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = _field("w4a8", "w<4|8|16>a<4|8|16>[kv<4|8>], e.g. w4a16, w4a8, w4a4kv4, w8a8", "--scheme")
    rotation: Rotation = field(default_factory=Rotation)
    weights: Weights = field(default_factory=Weights)
    activations: Activations = field(default_factory=Activations)
    kv_cache: KVCache = field(default_factory=KVCache)
    calibration: Calibration = field(default_factory=Calibration)
    output: Output = field(default_factory=Output)

    def __post_init__(self) -> None:
        Scheme.parse(self.scheme)
        for key, value, allowed in _CHOICES:
            if value(self) not in allowed:
                raise RotgraphError(f"{key} {value(self)!r}: expected one of {', '.join(map(str, allowed))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: QuantConfig | None = None) -> QuantConfig:
        """`base` (the defaults) with the fields `data` names replaced; unknown keys and values of the
        wrong type are refused with their dotted name."""
        return _replace(base or cls(), data, "")

    def with_values(self, values: Mapping[str, Any]) -> QuantConfig:
        """A copy with dotted keys (`weights.group`) set to `values`."""
        nested: dict[str, Any] = {}
        for key, value in values.items():
            *sections, name = key.split(".")
            target = nested
            for s in sections:
                target = target.setdefault(s, {})
            target[name] = value
        return QuantConfig.from_dict(nested, self)

    def autos(self) -> list[str]:
        """The dotted names of fields still `auto`."""
        return [key for key, value in flatten(self).items() if value == AUTO]


_CHOICES: tuple[tuple[str, typing.Callable[[QuantConfig], object], tuple[object, ...]], ...] = (
    ("rotation.kind", lambda c: c.rotation.kind, ("none", "quarot", "learned", "spinquant")),  # spinquant: old name
    ("weights.method", lambda c: c.weights.method, (AUTO, "rtn", "gptq")),
    ("weights.head_bits", lambda c: c.weights.head_bits, (4, 8, 16)),
    ("activations.mode", lambda c: c.activations.mode, (AUTO, "dynamic", "static")),
    ("activations.static_ranges", lambda c: c.activations.static_ranges, ("minmax", "percentile", "entropy")),
    ("kv_cache.store", lambda c: c.kv_cache.store, (AUTO, "onnxruntime", "rotgraph")),
    ("output.format", lambda c: c.output.format, ("qdq", *ORT_FORMATS)),
)


def flatten(config: QuantConfig) -> dict[str, Any]:
    """{dotted name: value} for every field."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)})
        else:
            out[f.name] = value
    return out


def field_types() -> dict[str, Any]:
    """{dotted name: the field's type} for every field."""
    out: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(QuantConfig).items():
        if dataclasses.is_dataclass(hint):
            out.update({f"{name}.{n}": t for n, t in typing.get_type_hints(hint).items()})
        else:
            out[name] = hint
    return out


def _metadata() -> dict[str, Mapping[str, Any]]:
    out: dict[str, Mapping[str, Any]] = {}
    for f in dataclasses.fields(QuantConfig):
        if f.default_factory is not dataclasses.MISSING:
            out.update({f"{f.name}.{g.name}": g.metadata for g in dataclasses.fields(f.default_factory())})
        else:
            out[f.name] = f.metadata
    return out


def flags() -> dict[str, tuple[str, typing.Callable[[str], Any], str]]:
    """{dotted name: (flag, value parser, help)} of the fields that have a command-line flag."""
    types = field_types()
    out = {}
    for key, meta in _metadata().items():
        if meta.get("flag"):
            options = typing.get_args(types[key]) or (types[key],)
            kinds = {t for t in options if t is not type(None)}
            parse: typing.Callable[[str], Any] = str if kinds == {str} else int if kinds == {int} else parse_value
            out[key] = (meta["flag"], parse, meta["help"])
    return out


def describe_fields() -> dict[str, tuple[str, Any, str]]:
    """{dotted name: (type, default, help)} of every field (`rotgraph recipes --fields`, docs/cli.md)."""
    types, defaults = field_types(), flatten(QuantConfig())
    return {key: (_type_name(types[key]), defaults[key], meta["help"]) for key, meta in _metadata().items()}


def _accepts(hint: Any, value: Any) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if t is str and isinstance(value, str):
            return True
    return False


def _coerce(hint: Any, value: Any) -> Any:
    """Numbers as the field's type: an int for a float field becomes a float (so JSON's 1 and 1.0 agree)."""
    options = typing.get_args(hint) or (hint,)
    if float in options and int not in options and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _replace(obj: Any, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise RotgraphError(f"configuration {prefix.rstrip('.') or 'value'}: expected a table of fields")
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise RotgraphError(f"unknown configuration field {name!r} (fields here: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            changes[key] = _replace(getattr(obj, key), value, f"{name}.")
        elif not _accepts(hint, value):
            raise RotgraphError(f"configuration field {name} = {value!r}: expected {_type_name(hint)}")
        else:
            changes[key] = _coerce(hint, value)
    return dataclasses.replace(obj, **changes)


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) or (hint,)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "none"}
    return " or ".join(names.get(t, str(t)) for t in options)


def parse_value(text: str) -> Any:
    """A `--set` value: true/false, none/null, a number, or a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`["weights.group=64", ...]` -> {"weights.group": 64, ...}; a key must name a field."""
    types = field_types()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise RotgraphError(f"--set {item!r}: expected section.field=value, e.g. weights.group=64")
        if key.strip() not in types:
            raise RotgraphError(f"--set {key!r}: no such configuration field (`rotgraph recipes --fields` lists them)")
        out[key.strip()] = parse_value(text)
    return out


# The configuration field each field of the flat plan (`QuantOptions`) comes from (`to_options`): messages
# about the plan name the setting a user types (`setting`).
OPTION_FIELDS: dict[str, str] = {
    "scheme": "scheme",
    "rotation": "rotation.kind",
    "rotations": "rotation.rotations",
    "online": "rotation.online",
    "out_hadamard": "rotation.out_hadamard",
    "seed": "rotation.seed",
    "weights": "weights.method",
    "group": "weights.group",
    "symmetric_weights": "weights.symmetric",
    "full_range": "weights.full_range",
    "head_bits": "weights.head_bits",
    "head_group": "weights.head_group",
    "shared_head": "weights.shared_head",
    "damp": "weights.damp",
    "act_order": "weights.act_order",
    "gptq_sequential": "weights.sequential",
    "activations": "activations.mode",
    "act_clip": "activations.clip",
    "act_clip_search": "activations.clip",
    "act_asymmetric": "activations.asymmetric",
    "center_activations": "activations.center",
    "smooth": "activations.smooth",
    "act_symmetric": "activations.static_symmetric",
    "calibration": "activations.static_ranges",
    "wide_ratio": "activations.wide_ratio",
    "kv_clip": "kv_cache.clip",
    "kv_cache": "kv_cache.store",
    "center_keys": "kv_cache.center_keys",
    "calibration_windows": "calibration.windows",
    "calibration_seq_len": "calibration.seq_len",
    "text": "calibration.text",
    "fmt": "output.format",
    "opset": "output.opset",
    "fused_attention": "output.fused_attention",
    "deployment_fusion": "output.deployment_fusion",
    "context_length": "output.context_length",
}
_PLAN_VALUES = {("rotation", "spinquant"): "learned", ("act_clip_search", True): "search"}  # plan -> config


def setting(option: str, value: Any = dataclasses.MISSING) -> str:
    """How a user sets the plan field `option` (a `QuantOptions` field) on the command line: its flag where
    the configuration field has one (`--group 0`), else `--set section.field=value`. Without `value`: a
    flag on (true) for a true/false field, else the field's name as a placeholder (`--set output.opset=OPSET`)."""
    key = OPTION_FIELDS[option]
    if value is dataclasses.MISSING:
        value = True if typing.get_type_hints(QuantOptions)[option] is bool else key.split(".")[-1].upper()
    value = _PLAN_VALUES.get((option, value), value)
    text = str(value).lower() if isinstance(value, bool) or value is None else value
    flag = _metadata()[key].get("flag")
    return f"{flag} {text}" if flag else f"--set {key}={text}"


def to_options(config: QuantConfig) -> QuantOptions:
    """The flat plan of a resolved configuration (refuses one with `auto` fields left); `QuantOptions`
    validates the combination."""
    if left := config.autos():
        raise RotgraphError(f"configuration not resolved: {', '.join(left)} still auto")
    r, w, a, kv, c, o = (
        config.rotation,
        config.weights,
        config.activations,
        config.kv_cache,
        config.calibration,
        config.output,
    )
    if a.clip is not None and a.clip != "search" and not isinstance(a.clip, float):
        raise RotgraphError(f"activations.clip {a.clip!r}: expected a ratio such as 0.8, or `search`")
    return QuantOptions(
        scheme=config.scheme,
        rotation="spinquant" if r.kind in ("learned", "spinquant") else r.kind,
        rotations=r.rotations,
        online=r.online,
        out_hadamard=bool(r.out_hadamard),
        smooth=a.smooth,
        weights=str(w.method),
        group=int(w.group),
        symmetric_weights=w.symmetric,
        full_range=bool(w.full_range),
        act_clip=None if a.clip == "search" else typing.cast(float | None, a.clip),
        act_clip_search=a.clip == "search",
        kv_clip=typing.cast(float | None, kv.clip),
        seed=r.seed,
        fmt=o.format,
        head_bits=w.head_bits,
        head_group=w.head_group,
        shared_head=bool(w.shared_head),
        fused_attention=o.fused_attention,
        damp=w.damp,
        act_order=w.act_order,
        gptq_sequential=w.sequential,
        calibration_windows=c.windows,
        calibration_seq_len=c.seq_len,
        text=c.text,
        context_length=o.context_length,
        deployment_fusion=o.deployment_fusion,
        activations=str(a.mode),
        act_asymmetric=bool(a.asymmetric),
        center_keys=bool(kv.center_keys),
        center_activations=bool(a.center),
        act_symmetric=a.static_symmetric,
        calibration=a.static_ranges,
        wide_ratio=typing.cast(float | None, a.wide_ratio),
        opset=typing.cast(int | None, o.opset),
        kv_cache=str(kv.store),
    )


def recorded(config: QuantConfig) -> dict[str, Any]:
    """What an output records of the resolved configuration that made it (metadata and file)."""
    from rotgraph import __version__

    return {"rotgraph_version": __version__, "config": config.to_dict()}
