"""Property: on every small decoder configuration, the float rotation computes the original function.

Hypothesis draws the architecture (Llama, Qwen2, Mistral, Phi-3), the head layout (GQA groups, head_dim
equal to hidden / heads or not), widths with and without a known Hadamard matrix, depth, tied or untied
embeddings and the seeds. Each example is exported to ONNX and compared with the Hugging Face model.
Set ROTGRAPH_PROPERTY_EXAMPLES for a longer search; CI runs a derandomized one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ort_logits, torch_logits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rotgraph import io
from rotgraph.export import export
from rotgraph.hadamard import hadamard_factors
from rotgraph.pipeline import RotateOptions, rotate_model
from rotgraph.testing import make_tiny_model

pytestmark = pytest.mark.slow  # several exports per run

WIDTHS = [8, 10, 12, 16, 20, 24, 28]  # 10: no Hadamard of that order (random R2, no online R3)
INTERMEDIATE = [24, 40, 44, 56, 96, 112, 120]  # 44 = 11 * 4: no Hadamard (no online R4)


@st.composite
def decoder_configs(draw: st.DrawFn) -> tuple[str, dict]:
    model_type = draw(st.sampled_from(["llama", "qwen2", "mistral", "phi3"]))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    hidden = heads * draw(st.sampled_from([w for w in WIDTHS if w % 2 == 0]))
    config = {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": draw(st.sampled_from(INTERMEDIATE)),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "tie_word_embeddings": draw(st.booleans()),
    }
    if model_type != "phi3" and draw(st.booleans()):  # Phi-3 derives head_dim from hidden / heads
        config["head_dim"] = draw(st.sampled_from([w for w in WIDTHS if w % 2 == 0 and w != hidden // heads]))
    return model_type, config


@settings(
    max_examples=int(os.environ.get("ROTGRAPH_PROPERTY_EXAMPLES", "6")),
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow],
)
@given(decoder_configs(), st.integers(0, 2**16), st.integers(0, 2**16))
def test_float_rotation_is_exact_on_random_configs(arch: tuple[str, dict], weight_seed: int, seed: int) -> None:
    model_type, config = arch
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    online = hadamard_factors(head_dim) is not None and hadamard_factors(config["intermediate_size"]) is not None
    tokens = np.random.default_rng(seed).integers(0, 384, size=(2, 12))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = make_tiny_model(root / "hf", model_type, seed=weight_seed, **config)
        export(str(folder), root / "onnx" / "model.onnx")
        model = io.load_model(root / "onnx" / "model.onnx")
        rotate_model(model, RotateOptions(seed=seed, online=online))
        io.save_model(model, root / "rotated.onnx")
        reference = torch_logits(folder, tokens)
        np.testing.assert_allclose(ort_logits(root / "rotated.onnx", tokens), reference, atol=5e-5)
