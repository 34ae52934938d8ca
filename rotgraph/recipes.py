"""Named recipes and the resolution of `auto` fields: which configuration is best for a scheme and format.

`RECIPES` are presets of `rotgraph.config.QuantConfig` (`--recipe NAME`, `rotgraph recipes`); `best`, the
default, leaves every `auto` field to `resolve`, which fills it with the best measured choice for the scheme
and format (benchmarks/RESULTS.md, "Defaults") or, where that needs calibration text the model lacks, with
what needs none. `load` reads a configuration file, which may start from a recipe.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotgraph.config import AUTO, QuantConfig
from rotgraph.errors import RotgraphError
from rotgraph.options import INT4_OPSET, MAX_OPSET, ORT_FORMATS, Scheme, default_out_hadamard, gqa_cache, kv_store


def load(path: Path, base: QuantConfig | None = None) -> QuantConfig:
    """A configuration file over `base` (None: the defaults): JSON (`.json`, e.g. an output's recorded
    `*.rotgraph.json`, whose `config` table is read) or TOML; a `recipe` key starts from that preset."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RotgraphError(f"configuration {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise RotgraphError(f"configuration {path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise RotgraphError(f"configuration {path}: expected a table of fields")
    if "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    recipe = data.pop("recipe", None)
    if isinstance(recipe, str):
        base = preset(recipe)
    return QuantConfig.from_dict(data, base)


@dataclass(frozen=True)
class Recipe:
    description: str
    measured: str  # its figure in benchmarks/RESULTS.md
    values: Mapping[str, Any]  # dotted field -> value, over the defaults


# Named presets of the configuration (`--recipe NAME`, `rotgraph recipes`). The default, `best`, leaves the
# `auto` fields to `resolve`; the others pin what they are about and leave the rest to it.
RECIPES: dict[str, Recipe] = {
    "best": Recipe(
        "the best measured recipe for the scheme and format (every `auto` field resolved): QuaRot, GPTQ, and at "
        "4-bit activations the clip search, asymmetric grids and centered inputs and keys",
        "w4a4kv4 qdq 1.51x float perplexity; w4a8 genai 20.60 vs the builder's int4 24.69; w8a8 static qdq 1.010x",
        {},
    ),
    "plain": Recipe(
        "QuaRot + RTN weights in groups of 32, QuaRot's symmetric per-token grids with fixed clips; needs no "
        "calibration text (except static activations)",
        "w4a4kv4 qdq 3.78x float perplexity (16 windows); w4a8 ort 1.72x: RTN with rotation is worse than without here",
        {
            "weights.method": "rtn",
            "weights.group": 32,
            "weights.full_range": False,
            "weights.shared_head": False,
            "activations.clip": None,
            "activations.asymmetric": False,
            "activations.center": False,
            "activations.wide_ratio": None,
            "kv_cache.center_keys": False,
        },
    ),
    "int4": Recipe(
        "w4a8 for onnxruntime(-genai): QuaRot + GPTQ on full-range groups of 64, one shared 8-bit "
        "embedding/lm_head table (a model with an lm_head of its own: two 8-bit tables)",
        "genai: perplexity 20.60, KL 0.117 vs the builder's int4 24.69 / 0.413; decode 1.05-1.16x the builder's",
        {
            "scheme": "w4a8",
            "weights.method": "gptq",
            "weights.group": 64,
            "weights.full_range": True,
            "weights.head_bits": 8,
        },
    ),
    "int4-fast": Recipe(
        "int4 without the online Hadamard before down_proj (R4): faster decoding, slightly worse",
        "genai: perplexity 20.79, decode 1.10-1.18x the builder's int4",
        {
            "scheme": "w4a8",
            "rotation.online": False,
            "weights.method": "gptq",
            "weights.group": 64,
            "weights.full_range": True,
            "weights.head_bits": 8,
        },
    ),
    "int4-compact": Recipe(
        "int4 at the builder's size: groups of 32, a shared 4-bit embedding/lm_head table",
        "ort: perplexity 21.88, KL 0.167 at 1.02x the builder's int4 size",
        {
            "scheme": "w4a8",
            "weights.method": "gptq",
            "weights.group": 32,
            "weights.full_range": True,
            "weights.head_bits": 4,
        },
    ),
}


def preset(name: str | None) -> QuantConfig:
    """The configuration of recipe `name` (None: `best`, the defaults)."""
    if name is None:
        return QuantConfig()
    if name not in RECIPES:
        raise RotgraphError(f"recipe {name!r}: expected one of {', '.join(RECIPES)} (`rotgraph recipes` lists them)")
    return QuantConfig().with_values(RECIPES[name].values)


def resolve(config: QuantConfig, has_text: bool, tied: bool = True) -> tuple[QuantConfig, list[str]]:
    """Fill every `auto` field with the best measured choice for the scheme and format (benchmarks/RESULTS.md,
    "Defaults"). `has_text`: whether calibration text can be tokenized (a tokenizer beside the model);
    where the best choice needs it and it is missing, the choice that needs none is made. `tied`: whether
    the model's lm_head is its embedding table (only then can they share one quantized table). Returns
    the resolved configuration and what was left out for want of text."""
    s = Scheme.parse(config.scheme)
    fmt = config.output.format
    notes: list[str] = []
    ort = fmt in ORT_FORMATS
    a, r, w, kv, o = config.activations, config.rotation, config.weights, config.kv_cache, config.output

    def want(value: Any, best: Any, plain: Any, needs_text: bool, what: str) -> Any:
        """`value` unless auto; else `best`, or `plain` (with a note) where `best` needs missing text."""
        if value != AUTO:
            return value
        if needs_text and not has_text and best != plain:
            notes.append(what)
            return plain
        return best

    # Activations: static Q/DQ where an edge compiler runs integer kernels (8-bit weights and activations,
    # qdq); elsewhere dynamic per-token scales, which measure better (RESULTS, "Static QDQ", "Quantization").
    static_best = fmt == "qdq" and s.weight_bits == 8 and s.act_bits == 8
    mode = want(a.mode, "static" if static_best else "dynamic", "dynamic", True, "static activation scales")
    dynamic4 = mode == "dynamic" and s.act_bits == 4
    opset = o.opset if o.opset != AUTO else (MAX_OPSET if fmt == "qdq" and mode == "static" else None)
    four_weights = s.weight_bits == 4
    method = want(w.method, "gptq" if four_weights else "rtn", "rtn", True, "GPTQ")
    # int4 weights (RESULTS, "Weight recipes"): full-range groups of 64 and one shared 8-bit table, except in
    # qdq at 4-bit activations, where the 1.51x figure was measured with groups of 32 and an untied head.
    int4 = four_weights and (ort or s.act_bits > 4)
    group = w.group if w.group != AUTO else (64 if int4 else 0 if mode == "static" else 32)
    full_range = w.full_range if w.full_range != AUTO else int4
    shared_head = w.shared_head if w.shared_head != AUTO else (int4 and w.head_bits < 16 and tied)
    search_ok = not (ort and s.act_bits == 8 and s.weight_bits < 16)  # MatMulNBits quantizes a8 itself
    clip = want(a.clip, "search" if dynamic4 and search_ok else None, None, True, "the activation clip search")
    asymmetric = a.asymmetric if a.asymmetric != AUTO else (dynamic4 and search_ok)
    center = want(a.center, dynamic4, False, True, "centering the projection inputs")
    wide_opset = not isinstance(opset, int) or opset >= INT4_OPSET  # with INT4, INT16 Q/DQ
    wide = a.wide_ratio if a.wide_ratio != AUTO else (16.0 if mode == "static" and wide_opset else None)
    store = kv.store if kv.store != AUTO else kv_store(s, fmt, o.fused_attention)
    rotgraph_cache = s.kv_bits is not None and not gqa_cache(s, fmt, o.fused_attention, store)
    center_keys = want(kv.center_keys, rotgraph_cache and s.act_bits == 4, False, True, "centering the keys")
    out_hadamard = r.out_hadamard if r.out_hadamard != AUTO else default_out_hadamard(r.kind, r.online, s)
    resolved = dataclasses.replace(
        config,
        rotation=dataclasses.replace(r, out_hadamard=out_hadamard),
        weights=dataclasses.replace(w, method=method, group=group, full_range=full_range, shared_head=shared_head),
        activations=dataclasses.replace(a, mode=mode, clip=clip, asymmetric=asymmetric, center=center, wide_ratio=wide),
        kv_cache=dataclasses.replace(
            kv, clip=None if kv.clip == AUTO else kv.clip, store=store, center_keys=center_keys
        ),
        output=dataclasses.replace(o, opset=opset),
    )
    return resolved, notes
