"""Architectures beyond the tiny Llama/Qwen2 fixtures: realistic non-power-of-two sizes, Mistral,
Phi-3's fused QKV and gate/up projections, head_dim != hidden / heads, untied embeddings.

Each is a random-weight model built from a transformers config, exported to ONNX; the reference is the
Hugging Face model itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import mean_kl, ort_logits, torch_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.errors import StructureError
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model
from rotgraph.quantize import QuantOptions, quantize_model
from rotgraph.structure import is_hadamard

pytestmark = pytest.mark.slow  # realistic widths (up to 18944): seconds per test

ATOL = 5e-5  # logits are O(1e-1..1); float32 rounding of rewritten 896-wide weights stays ~1e-6

# name: (model_type, config overrides, expected (hidden, head_dim, intermediate))
ARCHITECTURES = {
    # Qwen2-0.5B widths: hidden 896 = 28*32 (14 heads of 64, 2 KV heads), intermediate 4864 = 76*64, biases
    "qwen2-0.5b-widths": (
        "qwen2",
        {"hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864},
        (896, 64, 4864),
    ),
    # TinyLlama's intermediate 5632 = 44*128; head_dim 32 with 4 heads on a 64-wide residual stream
    "mistral-wide-heads": (
        "mistral",
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "intermediate_size": 5632,
        },
        (64, 32, 5632),
    ),
    # Phi-3: fused qkv_proj and gate_up_proj; Qwen2-7B's intermediate 18944 = 148*128
    "phi3-fused": (
        "phi3",
        {"hidden_size": 96, "num_attention_heads": 3, "num_key_value_heads": 1, "intermediate_size": 18944},
        (96, 32, 18944),
    ),
    # untied lm_head, head_dim 24 with 4 heads on a 64-wide stream (the attention is 96 wide)
    "llama-untied-wide-heads": (
        "llama",
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "intermediate_size": 192,
            "tie_word_embeddings": False,
        },
        (64, 24, 192),
    ),
}


def build(tiny, name: str, with_past: bool = False):  # type: ignore[no-untyped-def]
    model_type, overrides, _ = ARCHITECTURES[name]
    return tiny(model_type, "dynamo", with_past, **overrides)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_float_rotation_is_exact(tiny, tokens, tmp_path, name: str) -> None:
    folder, path = build(tiny, name)
    model = io.load_model(path)
    desc = rotate_model(model, RotateOptions(seed=3))
    assert sum(is_hadamard(n) for n in model.graph) == 3 * len(desc.blocks)  # R3 on Q and K, R4
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


@pytest.mark.parametrize("name", ["mistral-wide-heads", "phi3-fused"])  # sliding-window cache; sliced QKV
def test_float_rotation_is_exact_with_a_kv_cache(tiny, tokens, tmp_path, name: str) -> None:
    folder, path = build(tiny, name, with_past=True)
    model = io.load_model(path)
    desc = rotate_model(model, RotateOptions(seed=4))
    assert all(b.attention.key_cache is not None for b in desc.blocks)
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_quantized_pipeline_stays_close_and_rotation_pays_at_4_bits(tiny, tokens, tmp_path, name: str) -> None:
    """w8a8 is a small perturbation of the float model; at w4a4kv4 the rotated model is closer to float
    than the unrotated one (the fixtures plant outlier channels in the residual stream)."""
    _, path = build(tiny, name)
    reference = ort_logits(path, tokens)
    kl = {}
    for scheme, rotation in (("w8a8", "quarot"), ("w4a4kv4", "quarot"), ("w4a4kv4", "none")):
        model = io.load_model(path)
        quantize_model(model, QuantOptions(scheme=scheme, rotation=rotation, group=32))
        out = tmp_path / f"{scheme}-{rotation}.onnx"
        io.save_model(model, out)
        logits = ort_logits(out, tokens)
        kl[scheme, rotation] = mean_kl(reference, logits)
        if scheme == "w8a8":
            assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    assert kl["w4a4kv4", "quarot"] < kl["w4a4kv4", "none"], kl


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_describe_reports_what_was_found(tiny, capsys, name: str) -> None:
    model_type, overrides, (hidden, head_dim, intermediate) = ARCHITECTURES[name]
    _, path = build(tiny, name)
    assert main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"hidden {hidden}," in out
    assert f"head_dim {head_dim}," in out
    assert f"intermediate {intermediate}" in out
    assert f"{overrides['num_attention_heads']} query heads, {overrides['num_key_value_heads']} KV heads" in out
    assert ("Q/K/V biases: yes" in out) == (model_type == "qwen2")
    assert ("own weight" in out) == (overrides.get("tie_word_embeddings") is False)


def test_fused_projections_become_separate_matmuls(tiny) -> None:
    _, path = build(tiny, "phi3-fused")
    model = io.load_model(path)
    fused = sum(n.op_type == "MatMul" and n.inputs[1].is_initializer() for n in model.graph)
    desc = canonicalize(model)
    split = sum(n.op_type == "MatMul" and n.inputs[1].is_initializer() for n in model.graph)
    assert split == fused + 3 * len(desc.blocks)  # qkv -> 3, gate_up -> 2
    assert not any(
        n.op_type in ("Split", "Slice") and n.inputs[0].producer().op_type == "MatMul"
        for n in model.graph
        if n.inputs[0] is not None and n.inputs[0].producer() is not None
    )
    block = desc.blocks[0]
    assert block.attention.q.shape == (96, 96) and block.attention.k.shape == (96, 32)
    assert block.mlp.gate.shape == (96, 18944) and block.mlp.up.shape == (96, 18944)


def test_a_sliding_window_cache_is_not_stored_quantized(tiny) -> None:
    _, path = build(tiny, "mistral-wide-heads", with_past=True)
    model = io.load_model(path)
    with pytest.raises(StructureError, match="sliding window"):
        quantize_model(model, QuantOptions(scheme="w4a8kv4", rotation="quarot", group=32))
