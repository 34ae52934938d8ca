"""Keys centered on their calibrated mean before the KV-cache quantizer (`SubtractKeyMeanPass`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import edited_export, kl_without_and_with, ort_logits
from transformers import AutoModelForCausalLM

from rotgraph import io
from rotgraph.cli import main
from rotgraph.errors import RotgraphError, StructureError
from rotgraph.passes.calibration.key_mean import SubtractKeyMeanPass
from rotgraph.pipeline import canonicalize
from rotgraph.quantize import QuantOptions
from rotgraph.structure import discover, is_constant_shift
from rotgraph.weights import read_float64

SEQ = 20  # calibration windows: not the length of any other axis of the tiny models' keys


def hf_key_means(folder: Path, windows: np.ndarray) -> list[np.ndarray]:
    """Per layer, the mean over windows and positions of the Hugging Face model's keys after RoPE
    (its cache), [kv_heads, head_dim]."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(input_ids=torch.from_numpy(windows), use_cache=True).past_key_values
    return [layer.keys.double().mean(dim=(0, 2)).numpy() for layer in cache.layers]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_key_means_are_the_models_and_leave_the_float_graph_exact(tiny, tokens, tmp_path, model_type: str) -> None:
    folder, path = tiny(model_type)
    windows = np.random.default_rng(3).integers(0, 384, size=(3, SEQ))
    model = io.load_model(path)
    canonicalize(model)
    before = discover(model)
    SubtractKeyMeanPass(windows).call(model)
    want = hf_key_means(folder, windows)
    for block, mean in zip(discover(model).blocks, want, strict=True):
        keys = block.attention.k_rope
        assert keys is not None
        shifts = [n for n in keys.consumers() if is_constant_shift(n)]
        assert len(shifts) == 1  # every reader of the keys now reads them shifted
        assert all(n is shifts[0] for n in keys.consumers())
        found = read_float64(shifts[0].inputs[1])  # type: ignore[arg-type]
        np.testing.assert_allclose(found.squeeze(), mean.squeeze(), atol=1e-5 * np.abs(mean).max())
    assert len(discover(model).blocks) == len(before.blocks)
    with pytest.raises(StructureError, match="already subtracted"):
        SubtractKeyMeanPass(windows).call(model)
    shifted = tmp_path / "shifted.onnx"
    io.save_model(model, shifted)
    reference = ort_logits(path, tokens)
    np.testing.assert_allclose(ort_logits(shifted, tokens), reference, atol=1e-4 * np.abs(reference).max())


def test_centered_keys_quantize_better_when_keys_share_a_large_component(tmp_path) -> None:
    """Keys with a large bias (kept by RoPE's slow channels) spend a per-token grid's range on what all
    keys share; centered, the same 4-bit cache is closer to float. Float logits stay the model's."""

    def biased_keys(model) -> None:  # type: ignore[no-untyped-def]
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.add_(10.0)

    path = edited_export(tmp_path, "qwen2", 5, biased_keys)
    plain, centered = kl_without_and_with(path, tmp_path, "w16a16kv4", "kv_cache.center_keys=true")
    assert centered < 0.8 * plain, (plain, centered)  # 0.69 when written


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_a_cached_graph_stores_centered_keys_and_decodes_as_without_cache(tiny, tokens, tmp_path, fmt: str) -> None:
    from test_kvcache import decode

    _, past = tiny("llama", with_past=True)
    _, plain = tiny("llama")
    argv = [
        "--scheme",
        "w4a8kv4",
        "--group",
        "16",
        "--activations",
        "dynamic",
        "--set",
        "kv_cache.center_keys=true",
        "--format",
        fmt,
    ]
    argv += ["--set", "calibration.windows=2", "--recipe", "plain"]
    cached, fake = tmp_path / "cached" / "model.onnx", tmp_path / "fake" / "model.onnx"
    assert main(["quantize", str(past), "-o", str(cached), *argv]) == 0
    assert main(["quantize", str(plain), "-o", str(fake), *argv]) == 0
    reference = ort_logits(fake, tokens)
    np.testing.assert_allclose(ort_logits(cached, tokens), reference, atol=1e-3)
    stepped, _ = decode(cached, tokens, prefill=9)
    np.testing.assert_allclose(stepped, reference[:, 8:], atol=1e-3)
    graph = io.load_model(cached).graph  # the shifts survive the format's passes, one per block
    shifts = [n for n in graph if is_constant_shift(n) and n.inputs[1].name.endswith(".key_mean")]  # type: ignore[union-attr]
    assert len(shifts) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scheme": "w4a8"}, "needs a kv scheme"),
        ({"scheme": "w4a8kv4", "fmt": "genai"}, "not GroupQueryAttention's"),
        ({"scheme": "w4a8kv8", "fmt": "ort"}, "not GroupQueryAttention's"),
    ],
)
def test_center_keys_is_refused_where_it_cannot_apply(options: dict, message: str) -> None:
    with pytest.raises(RotgraphError, match=message):
        QuantOptions(center_keys=True, **options)
