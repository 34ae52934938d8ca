"""The quantization configuration (`rotgraph.config`): typed and validated, recipes as presets, `auto`
fields resolved to the best measured recipe, and a recorded configuration that reproduces its output."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from rotgraph import config, recipes
from rotgraph.cli import main, parser
from rotgraph.config import QuantConfig, to_options
from rotgraph.errors import RotgraphError
from rotgraph.recipes import resolve
from rotgraph.validation import FLOORS, agreement, far_below

SCHEMES = ["w4a16", "w4a8", "w4a4", "w4a4kv4", "w4a8kv4", "w8a8", "w8a8kv8", "w16a4kv4"]
FORMATS = ["qdq", "ort", "genai"]


def test_round_trip_and_refusals(tmp_path: Path) -> None:
    c = QuantConfig().with_values({"weights.group": 64, "activations.clip": "search", "scheme": "w4a4kv4"})
    assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert c.weights.group == 64 and c.activations.clip == "search"
    with pytest.raises(RotgraphError, match=r"unknown configuration field 'weights.grup'"):
        QuantConfig.from_dict({"weights": {"grup": 3}})
    with pytest.raises(RotgraphError, match=r"weights\.head_bits = 'eight': expected an integer"):
        QuantConfig.from_dict({"weights": {"head_bits": "eight"}})
    with pytest.raises(RotgraphError, match=r"output\.format 'onnx'"):
        QuantConfig().with_values({"output.format": "onnx"})
    with pytest.raises(RotgraphError, match="scheme 'w3a8'"):
        QuantConfig(scheme="w3a8")
    assert config.parse_assignments(["weights.damp=0.02", "calibration.text=none", "rotation.online=false"]) == {
        "weights.damp": 0.02,
        "calibration.text": None,
        "rotation.online": False,
    }
    with pytest.raises(RotgraphError, match="no such configuration field"):
        config.parse_assignments(["weights.nope=1"])
    toml = tmp_path / "c.toml"
    toml.write_text('recipe = "int4"\nscheme = "w4a16"\n[weights]\ndamp = 0.05\n')
    loaded = recipes.load(toml)
    assert (loaded.scheme, loaded.weights.damp, loaded.weights.group, loaded.weights.method) == (
        "w4a16",
        0.05,
        64,
        "gptq",
    )
    (tmp_path / "bad.toml").write_text("[weights\n")
    with pytest.raises(RotgraphError, match="not valid TOML"):
        recipes.load(tmp_path / "bad.toml")


@pytest.mark.parametrize(("scheme", "fmt", "has_text"), itertools.product(SCHEMES, FORMATS, [True, False]))
def test_every_scheme_and_format_resolves_to_a_valid_plan(scheme: str, fmt: str, has_text: bool) -> None:
    """Every `auto` field gets a value the pipeline accepts; without calibration text nothing that needs
    it is chosen, and each choice left out is named."""
    c = QuantConfig().with_values({"scheme": scheme, "output.format": fmt})
    resolved, notes = resolve(c, has_text)
    assert resolved.autos() == []
    options = to_options(resolved)  # QuantOptions validates the combination
    if not has_text:  # only onnxruntime's cache, the one onnxruntime-genai holds, has no text-free variant
        assert set(options.calibration_uses) <= ({"the onnxruntime KV cache"} if options.gqa_cache else set())
        assert bool(notes) == (resolve(c, True)[0] != resolved)


def test_the_best_recipes_are_the_measured_ones() -> None:
    """The defaults, stated independently of `resolve` (benchmarks/RESULTS.md, "Defaults")."""

    def best(scheme: str, fmt: str) -> dict[str, object]:
        resolved, _ = resolve(QuantConfig().with_values({"scheme": scheme, "output.format": fmt}), True)
        return config.flatten(resolved)

    a4 = best("w4a4kv4", "qdq")
    assert (a4["weights.method"], a4["weights.group"], a4["activations.mode"], a4["activations.clip"]) == (
        "gptq",
        32,
        "dynamic",
        "search",
    )
    assert a4["activations.asymmetric"] and a4["activations.center"] and a4["kv_cache.center_keys"]
    assert a4["rotation.out_hadamard"] and not a4["weights.shared_head"]
    genai = best("w4a4kv4", "genai")  # the cache inside GroupQueryAttention: no centered keys there
    assert (
        genai["kv_cache.store"] == "onnxruntime" and not genai["kv_cache.center_keys"] and genai["weights.group"] == 64
    )
    for fmt in FORMATS:  # the int4 recipe
        w4a8 = best("w4a8", fmt)
        assert (
            w4a8["weights.method"],
            w4a8["weights.group"],
            w4a8["weights.full_range"],
            w4a8["weights.shared_head"],
        ) == (
            "gptq",
            64,
            True,
            True,
        )
        assert w4a8["activations.mode"] == "dynamic" and not w4a8["activations.center"]
    static = best("w8a8", "qdq")
    assert (static["activations.mode"], static["activations.wide_ratio"], static["output.opset"]) == (
        "static",
        16.0,
        23,
    )
    assert (static["weights.method"], static["weights.group"]) == ("rtn", 0)


def test_a_recipe_is_its_values_and_flags_and_sets_override_it(tmp_path: Path) -> None:
    from rotgraph.commands import quant_config

    def config_of(*argv: str) -> QuantConfig:
        return quant_config(parser().parse_args(["quantize", "m.onnx", "-o", "out", *argv]))

    for name, recipe in recipes.RECIPES.items():
        c = config_of("--recipe", name)
        assert all(config.flatten(c)[key] == value for key, value in recipe.values.items())
        assert config_of("--recipe", name, "--set", "weights.head_bits=4").weights.head_bits == 4
        assert config_of("--recipe", name, "--group", "128").weights.group == 128
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"weights": {"group": 16, "damp": 0.1}}))
    c = config_of("--recipe", "int4", "--config", str(file), "--set", "weights.damp=0.2")
    assert (c.weights.method, c.weights.group, c.weights.damp) == ("gptq", 16, 0.2)  # recipe < file < --set
    with pytest.raises(RotgraphError, match="recipe 'no-such-recipe'"):
        config_of("--recipe", "no-such-recipe")


def test_quantize_help_is_short() -> None:
    sub = next(a for a in parser()._actions if a.dest == "command")
    quantize = sub.choices["quantize"]  # type: ignore[union-attr]
    # --ray is how the command runs, not what it computes (rotgraph.execution): not counted
    options = [a for a in quantize._actions if a.option_strings and a.dest not in ("help", "ray")]
    assert len(options) <= 15, [a.option_strings for a in options]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_recorded_configuration_reproduces_its_output(tiny, tmp_path: Path, fmt: str) -> None:
    """`quantize IN -o A` then `quantize IN -o B --config A's record`: the same bytes (GPTQ, the clip search
    and centering at w4a4kv4 in qdq; the int4 recipe in ort and genai)."""
    _, source = tiny("llama", "dynamo", with_past=True)
    scheme = "w4a4kv4" if fmt == "qdq" else "w4a8"
    first = tmp_path / "a" / ("model" if fmt == "genai" else "model.onnx")
    argv = ["quantize", str(source), "--scheme", scheme, "--format", fmt, "--set", "calibration.windows=2"]
    argv += ["--group", "16"]  # the tiny model's widths (48, 96) take no groups of 64 (the auto group for int4)
    assert main([*argv, "-o", str(first)]) == 0
    model_a = first / "model.onnx" if fmt == "genai" else first
    record = model_a.with_name("model.rotgraph.json")
    recorded = json.loads(record.read_text())
    assert recorded["rotgraph_version"] and recorded["config"]["calibration"]["windows"] == 2
    metadata = {p.key: p.value for p in onnx.load(model_a, load_external_data=False).metadata_props}
    assert json.loads(metadata["rotgraph.recipe"]) == recorded
    assert "auto" not in json.dumps(recorded)
    second = tmp_path / "b" / first.name
    assert main(["quantize", str(source), "-o", str(second), "--config", str(record)]) == 0
    model_b = second / "model.onnx" if fmt == "genai" else second
    for a, b in ((model_a, model_b), (Path(f"{model_a}.data"), Path(f"{model_b}.data"))):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_floors_refuse_what_is_far_below_and_spare_what_says_nothing() -> None:
    rng = np.random.default_rng(0)
    vocab = 400
    reference = rng.normal(0, 4, (1, 64, vocab))
    targets = reference.argmax(-1)  # text the float model predicts (perplexity ~1)
    good = agreement(reference, reference + rng.normal(0, 0.1, reference.shape), targets)
    bad = agreement(reference, rng.normal(0, 4, reference.shape), targets)
    # perplexity against a direct computation
    logp = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
    direct = np.exp(-np.take_along_axis(logp, targets[..., None], -1).mean())
    assert good.float_ppl == pytest.approx(direct, rel=1e-9)
    assert far_below(good, FLOORS[4], vocab) == []
    missed = far_below(bad, FLOORS[4], vocab)
    assert any(m.startswith("top-1") for m in missed) and any(m.startswith("KL") for m in missed)
    unpredictable = agreement(reference, rng.normal(0, 4, reference.shape), rng.integers(0, vocab, (1, 64)))
    assert unpredictable.float_ppl is not None and unpredictable.float_ppl > vocab**0.5
    assert far_below(unpredictable, FLOORS[4], vocab) == []  # a model that does not predict the text


def test_without_calibration_text_the_best_recipe_says_what_it_leaves_out_in_one_line(
    model_dir, tmp_path, caplog
) -> None:
    (model_dir / "tokenizer.json").unlink()
    out = tmp_path / "q" / "model.onnx"
    with caplog.at_level(logging.WARNING, logger="rotgraph"):
        assert (
            main(["quantize", str(model_dir / "model.onnx"), "-o", str(out), "--scheme", "w4a4kv4", "--group", "16"])
            == 0
        )
    lines = [r.getMessage() for r in caplog.records if "calibration text" in r.getMessage()]
    assert len(lines) == 1 and "GPTQ" in lines[0] and "activation clip search" in lines[0], lines
    resolved = json.loads(out.with_name("model.rotgraph.json").read_text())["config"]
    assert resolved["weights"]["method"] == "rtn" and resolved["activations"]["clip"] is None
    assert resolved["activations"]["asymmetric"] is True  # needs no text: kept


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("recipe", [[], ["--recipe", "int4"], ["--recipe", "int4-compact"]])
def test_the_shared_head_is_chosen_only_for_a_tied_lm_head(tiny, tmp_path: Path, tied: bool, recipe) -> None:
    """w4a8 in the ort format with no option, and the int4 recipes: one shared table when the model ties its
    lm_head to the embedding; an untied model (Llama-3.1-8B's form) quantizes them apart instead of failing."""
    _, source = tiny("llama", "dynamo", tie_word_embeddings=tied)
    out = tmp_path / "model.onnx"
    argv = ["quantize", str(source), "-o", str(out), "--scheme", "w4a8", "--format", "ort", "--group", "16", *recipe]
    assert main([*argv, "--set", "calibration.windows=2"]) == 0
    recorded = json.loads(out.with_name("model.rotgraph.json").read_text())
    assert recorded["config"]["weights"]["shared_head"] is tied
