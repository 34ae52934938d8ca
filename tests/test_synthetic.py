"""rotgraph.synthetic: the written graph computes what Hugging Face's model computes with the same weights
(prefill and a decode step on the cache), rotgraph reads and rotates it as an exporter's graph, float16
is written, and writing streams the weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ort_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.pipeline import canonicalize
from rotgraph.synthetic import (
    PRESETS,
    RopeScaling,
    SyntheticConfig,
    hf_state_dict,
    parameter_count,
    preset,
    weight_bytes,
    weight_specs,
    write_model,
)
from rotgraph.synthetic import main as synthetic_main

# Logits reach 50 (the tied lm_head reads the outlier channels); float32 rounding between torch and
# onnxruntime differs by ~1e-6 relative to them.
ATOL, RTOL = 1e-4, 1e-5
ROTATED = 2e-5  # after rotation: max |difference| / max |logit| (see test_rotate_keeps_the_logits)
# Llama: untied, GQA, Llama 3.1's RoPE scaling (the tiny original context puts frequencies in all three
# of its bands); Qwen2: Q/K/V biases, tied lm_head, no GQA repeat (kv_heads = heads).
LLAMA = SyntheticConfig(
    hidden=64,
    intermediate=96,
    layers=3,
    heads=4,
    kv_heads=2,
    head_dim=16,
    vocab=128,
    rope_theta=10000.0,
    rope_scaling=RopeScaling(4.0, 1.0, 4.0, 64),
    max_positions=256,
    seed=3,
)
QWEN = SyntheticConfig(
    hidden=64,
    intermediate=96,
    layers=2,
    heads=4,
    kv_heads=4,
    head_dim=24,
    vocab=128,
    rope_theta=1e6,
    rms_eps=1e-6,
    tied=True,
    qkv_bias=True,
    max_positions=256,
    seed=4,
)
CONFIGS = {"llama": LLAMA, "qwen2": QWEN}


def hf_model(config: SyntheticConfig):  # type: ignore[no-untyped-def]
    """Hugging Face's model of `config` (built from its config, no hub) holding the synthetic weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = config.hf_config()
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    state = {name: torch.from_numpy(array.astype(np.float32)) for name, array in hf_state_dict(config).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def hf_logits(config: SyntheticConfig, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = hf_model(config)(input_ids=torch.from_numpy(tokens.astype(np.int64)), use_cache=False)
    return out.logits.numpy()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {name: write_model(config, root / name) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 128, size=(2, 12))


def decode(path: Path, tokens: np.ndarray, split: int) -> np.ndarray:
    """The logits of tokens[:, split:] computed on the cache of tokens[:, :split] (two session runs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()][1:]
    type_of = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    empty = {
        i.name: np.zeros((tokens.shape[0], i.shape[1], 0, i.shape[3]), type_of[i.type])
        for i in session.get_inputs()[1:]
    }
    first = session.run(None, {"input_ids": tokens[:, :split]} | empty)
    assert first[1].shape[2] == split
    second = session.run(None, {"input_ids": tokens[:, split:]} | dict(zip(names, first[1:], strict=True)))
    assert second[1].shape[2] == tokens.shape[1]
    return np.asarray(second[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_hugging_face_with_the_same_weights(written, ids, name: str) -> None:
    config = CONFIGS[name]
    reference = hf_logits(config, ids)
    assert np.abs(reference).max() > 1.0  # not a degenerate model
    np.testing.assert_allclose(ort_logits(written[name], ids), reference, atol=ATOL, rtol=RTOL)
    # one cached token, then five more on the cache
    np.testing.assert_allclose(decode(written[name], ids, 7), reference[:, 7:], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(decode(written[name], ids, 11), reference[:, 11:], atol=ATOL, rtol=RTOL)


def test_the_graph_has_the_exporters_interface(written) -> None:
    model = io.load_model(written["llama"])
    inputs = {v.name: (v.dtype, [str(d) for d in v.shape]) for v in model.graph.inputs}
    outputs = {v.name: (v.dtype, [str(d) for d in v.shape]) for v in model.graph.outputs}
    assert next(iter(inputs)) == "input_ids" and inputs["input_ids"] == (ir.DataType.INT64, ["batch", "seq"])
    assert inputs["past_key_values.2.value"] == (ir.DataType.FLOAT, ["batch", "2", "past", "16"])
    assert next(iter(outputs)) == "logits" and outputs["logits"] == (ir.DataType.FLOAT, ["batch", "seq", "128"])
    assert outputs["present.0.key"] == (ir.DataType.FLOAT, ["batch", "2", "past + seq", "16"])
    assert len(inputs) == len(outputs) == 1 + 2 * LLAMA.layers
    assert model.opset_imports[""] == 20
    assert json.loads(model.metadata_props["rotgraph.config"])["num_key_value_heads"] == 2
    externals = {
        v.const_value.path for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)
    }
    assert [Path(p).name for p in externals] == ["model.onnx.data"]


def test_weights_are_trained_like(written) -> None:
    """Random norm weights, and outlier channels in the residual stream that the embedding and the writers
    share: what makes a rotation matter."""
    weights = hf_state_dict(LLAMA)
    norm = weights["model.layers.0.input_layernorm.weight"]
    assert norm.std() > 0.2 and norm.min() > 0
    embedding = np.abs(weights["model.embed_tokens.weight"]).max(0)
    down = np.abs(weights["model.layers.1.mlp.down_proj.weight"]).max(1)  # [hidden, intermediate]
    top = set(np.argsort(embedding)[-LLAMA.outliers :])
    assert top == set(np.argsort(down)[-LLAMA.outliers :])
    assert np.median(embedding[list(top)]) > 8 * np.median(embedding)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_discovery_reads_it_as_an_exporters_graph(written, name: str) -> None:
    config = CONFIGS[name]
    desc = canonicalize(io.load_model(written[name]))
    assert len(desc.blocks) == config.layers
    assert (desc.hidden_size, desc.vocab_size, desc.lm_head_tied) == (config.hidden, config.vocab, config.tied)
    for block in desc.blocks:
        attn = block.attention
        assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (config.heads, config.kv_heads, config.head_dim)
        assert attn.q_rope is not None and attn.k_rope is not None
        assert attn.key_cache is not None and attn.value_cache is not None
        assert (attn.v.bias is not None) == config.qkv_bias
        assert block.mlp.gate.shape == (config.hidden, config.intermediate)
    assert len(desc.norms()) == 2 * config.layers + 1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rotate_keeps_the_logits(written, ids, tmp_path, name: str) -> None:
    out = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(written[name]), "-o", str(out)]) == 0
    reference = hf_logits(CONFIGS[name], ids)
    # R1 spreads the outlier channels' magnitude over all channels: float32 rounding then reaches ~1e-5 of
    # the largest logit (8e-6 measured on qwen2); 2e-5 is 10 times tighter than rotate's own validation
    bound = ROTATED * np.abs(reference).max()
    assert np.abs(ort_logits(out, ids) - reference).max() < bound
    assert np.abs(decode(out, ids, 9) - reference[:, 9:]).max() < bound


def test_float16_is_written_and_rotates(ids, tmp_path) -> None:
    config = SyntheticConfig(**{**LLAMA.__dict__, "dtype": "float16"})
    path = write_model(config, tmp_path / "fp16")
    model = io.load_model(path)
    assert {v.const_value.dtype for v in model.graph.initializers.values() if len(v.shape) == 2} == {
        ir.DataType.FLOAT16
    }
    reference = hf_logits(config, ids)  # the float16 weights, computed in float32
    bound = 5e-2 * max(1.0, float(np.abs(reference).max()))
    logits = ort_logits(path, ids)
    assert logits.dtype == np.float16 and np.isfinite(logits).all()
    assert np.abs(logits.astype(np.float32) - reference).max() < bound
    assert np.abs(decode(path, ids, 9).astype(np.float32) - reference[:, 9:]).max() < bound
    out = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(path), "-o", str(out)]) == 0
    assert np.abs(ort_logits(out, ids).astype(np.float32) - reference).max() < bound


def test_quantize_kv4_to_the_genai_format(tmp_path) -> None:
    """The cache interface is the exporter's: a kv4 scheme calibrates and stores the cache inside
    GroupQueryAttention for onnxruntime-genai (on the tokenizer.json written beside the model)."""
    config = SyntheticConfig(**{**LLAMA.__dict__, "vocab": 512, "layers": 2})
    path = write_model(config, tmp_path / "in")
    assert (path.parent / "tokenizer.json").is_file()
    out = tmp_path / "genai"
    # weights.shared_head: its `auto` (true for 4-bit weights) refuses an untied lm_head, from any exporter
    argv = ["quantize", str(path), "-o", str(out), "--scheme", "w4a4kv4", "--format", "genai", "--group", "16"]
    assert main([*argv, "--set", "calibration.windows=2", "--set", "weights.shared_head=false"]) == 0
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (genai["num_hidden_layers"], genai["num_key_value_heads"], genai["head_size"]) == (2, 2, 16)


def test_presets_have_the_published_parameter_counts() -> None:
    counts = {name: parameter_count(config) for name, config in PRESETS.items()}
    assert counts == {"llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512, "llama-3-70b": 70_553_706_496}
    assert weight_bytes(preset("llama-3.1-8b", dtype="float16")) == 2 * counts["llama-3.1-8b"]
    big = {spec.name: spec.shape for spec in weight_specs(PRESETS["llama-3-70b"])}
    assert big["model.layers.79.mlp.down_proj.weight"] == (28672, 8192)
    qwen = {spec.name: spec.shape for spec in weight_specs(PRESETS["qwen2.5-7b"])}
    assert qwen["model.layers.27.self_attn.k_proj.bias"] == (512,)


# Runs a command in a child and reports the child's peak RSS (kernel accounting for waited-for children),
# so neither this process nor earlier children count.
_PEAK = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=sys.stderr)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss(args: list[str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, sys.executable, *args], capture_output=True, text=True, check=True
    )
    rc, peak = map(int, done.stdout.split())
    assert rc == 0, done.stderr[-2000:]
    return peak


def test_writing_streams_the_weights(tmp_path) -> None:
    """About 400 MB of float32 weights written with a peak RSS far below that above the interpreter's."""
    widths = ["--hidden", "1024", "--intermediate", "4096", "--layers", "6", "--heads", "8", "--kv-heads", "8"]
    widths += ["--head-dim", "128", "--vocab", "8192"]
    out = tmp_path / "big"
    baseline = _peak_rss(["-c", "import rotgraph.synthetic, tqdm"])
    peak = _peak_rss(["-m", "rotgraph.synthetic", *widths, "-o", str(out), "-q"])
    config = SyntheticConfig(hidden=1024, intermediate=4096, layers=6, heads=8, kv_heads=8, head_dim=128, vocab=8192)
    total = weight_bytes(config)
    assert total > 400e6 and (out / "model.onnx.data").stat().st_size == total
    assert peak - baseline < 0.5 * total, (peak, baseline, total)


def test_command_line_needs_a_preset_or_every_width(tmp_path, capsys) -> None:
    assert synthetic_main(["--hidden", "64", "-o", str(tmp_path)]) == 2
    assert "--intermediate" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()
