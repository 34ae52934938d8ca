"""Decoder graphs with a KV cache: export, rotation, the stored quantized cache, and generation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ort_logits, torch_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.evaluate import PAST_PREFIX, PRESENT_PREFIX, empty_cache
from rotgraph.fakequant import ActSpec
from rotgraph.generate import generate
from rotgraph.kvcache import CacheSpec, add_functions, dequantize_node, quantize_node
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model
from rotgraph.quantize import QuantOptions, quantize_model
from rotgraph.structure import discover
from rotgraph.structure.summary import summary


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def decode(path: Path, tokens: np.ndarray, prefill: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of positions prefill-1.. from a prefill of `prefill` tokens and then one token per step,
    and the last step's cache outputs."""
    s = session(path)
    names = [o.name for o in s.get_outputs()]
    feeds = {"input_ids": tokens[:, :prefill]} | empty_cache(s, tokens.shape[0])
    logits = []
    for t in range(prefill, tokens.shape[1] + 1):
        outs = dict(zip(names, s.run(None, feeds), strict=True))
        logits.append(outs["logits"][:, -1])
        cache = {k: v for k, v in outs.items() if k.startswith(PRESENT_PREFIX)}
        feeds = {"input_ids": tokens[:, t : t + 1]} | {
            PAST_PREFIX + k[len(PRESENT_PREFIX) :]: v for k, v in cache.items()
        }
    return np.stack(logits, axis=1), cache


def transform(path: Path, out: Path, apply) -> Path:  # type: ignore[no-untyped-def]
    model = io.load_model(path)
    apply(model)
    io.save_model(model, out)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_export_with_past_matches_the_model_and_decodes_step_by_step(tiny, tokens, model_type: str) -> None:
    folder, path = tiny(model_type, with_past=True)
    reference = torch_logits(folder, tokens)
    np.testing.assert_allclose(ort_logits(path, tokens), reference, atol=1e-4)
    stepped, cache = decode(path, tokens, prefill=10)
    np.testing.assert_allclose(stepped, reference[:, 9:], atol=1e-4)
    layers = canonicalize(io.load_model(path)).blocks
    assert len(cache) == 2 * len(layers) and cache["present.0.key"].shape == (2, 1, tokens.shape[1], 16)


def test_rotation_keeps_decoding_exact_and_rotates_keys_before_the_cache(tiny, tokens, tmp_path) -> None:
    _, path = tiny("llama", with_past=True)
    rotated = transform(path, tmp_path / "rot.onnx", lambda m: rotate_model(m, RotateOptions(seed=3)))
    original_logits, original_cache = decode(path, tokens, prefill=7)
    rotated_logits, rotated_cache = decode(rotated, tokens, prefill=7)
    np.testing.assert_allclose(rotated_logits, original_logits, atol=1e-4)
    h = np.ones((1, 1))
    for _ in range(4):  # R3 on head_dim 16: the orthonormal Sylvester matrix of order 16
        h = np.kron(h, [[1, 1], [1, -1]])
    h /= 4.0
    for layer in range(2):
        key = f"present.{layer}.key"
        np.testing.assert_allclose(rotated_cache[key], original_cache[key] @ h, atol=1e-4)
        assert np.abs(rotated_cache[key] - original_cache[key]).max() > 1e-2


def test_kv_functions_match_numpy_and_fake_quant(tmp_path) -> None:
    spec = CacheSpec(bits=4, head_dim=16, group=8, clip=0.95)
    x = ir.Value(name="x", shape=ir.Shape(["b", 2, "t", 16]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g")
    model = ir.Model(graph, ir_version=10)
    add_functions(model, spec)
    q = quantize_node(spec, x)
    d = dequantize_node(spec, *q.outputs)
    graph.extend([q, d])
    for value, name in zip([*q.outputs, d.outputs[0]], ["codes", "scale", "zero", "y"], strict=True):
        value.name = name
        graph.outputs.append(value)
    io.save_model(model, tmp_path / "kv.onnx")
    data = (3 * np.random.default_rng(0).standard_normal((3, 2, 5, 16))).astype(np.float32)
    codes, scale, zero, y = session(tmp_path / "kv.onnx").run(None, {"x": data})
    want_codes, want_scale, want_zero = spec.quantize(data)
    assert codes.dtype == np.uint8 and codes.shape == (3, 2, 5, 8)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
    np.testing.assert_array_equal(zero, want_zero)
    np.testing.assert_allclose(y, spec.dequantize(codes, scale, zero), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, ActSpec(4, False, 8, 0.95).reference(data), rtol=1e-5, atol=1e-5)
    unpacked = np.concatenate([codes & 15, codes >> 4], axis=-1)  # the layout the docstring promises
    np.testing.assert_array_equal(unpacked.reshape(3, 2, 5, 2, 8).max(-1) >= zero, True)


@pytest.mark.parametrize("kv_bits", [4, 8])
def test_quantized_cache_is_stored_as_codes_and_equals_fake_quant(tiny, tokens, tmp_path, kv_bits: int) -> None:
    _, past = tiny("llama", with_past=True)
    _, plain = tiny("llama")
    options = QuantOptions(scheme=f"w4a8kv{kv_bits}", group=16)
    cached = transform(past, tmp_path / "cached.onnx", lambda m: quantize_model(m, options))
    fake = transform(plain, tmp_path / "fake.onnx", lambda m: quantize_model(m, options))
    reference = ort_logits(fake, tokens)
    np.testing.assert_allclose(ort_logits(cached, tokens), reference, atol=1e-4)
    stepped, cache = decode(cached, tokens, prefill=9)
    np.testing.assert_allclose(stepped, reference[:, 8:], atol=1e-3)
    codes, scales, zeros = (cache[f"present.0.key{sfx}"] for sfx in ("", "_scale", "_zero"))
    seq = tokens.shape[1]
    assert codes.dtype == np.uint8 and codes.shape == (2, 1, seq, 16 * kv_bits // 8)
    assert scales.shape == zeros.shape == (2, 1, seq, 1)
    stored = codes.nbytes + scales.nbytes + zeros.nbytes
    float_bytes = 2 * 1 * seq * 16 * 4
    assert stored / float_bytes == pytest.approx((16 * kv_bits / 8 + 5) / 64)
    text = summary(discover(io.load_model(cached)))
    assert "integer codes" in text


def test_quantizing_a_quantized_cache_again_is_refused(tiny, tmp_path) -> None:
    _, past = tiny("llama", with_past=True)
    model = io.load_model(past)
    quantize_model(model, QuantOptions(scheme="w16a16kv4"))
    from rotgraph.passes.quantization.quantize_kv import QuantizeKVCachePass

    with pytest.raises(Exception, match="already quantized"):
        QuantizeKVCachePass(ActSpec(4, False, 0, 0.95))(model)


def test_greedy_generation_is_the_same_with_and_without_cache_and_after_rotation(tiny, tmp_path) -> None:
    folder, past = tiny("llama", with_past=True)
    _, plain = tiny("llama")
    rotated = transform(past, tmp_path / "rot.onnx", rotate_model)
    io.copy_companions(past, rotated, rotated)
    runs = [generate(p, "The quick brown fox", 12) for p in (past, plain, rotated)]
    assert len(runs[0].new_tokens) == 12 or runs[0].stopped_at_eos
    assert runs[0].new_tokens == runs[1].new_tokens == runs[2].new_tokens
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([runs[0].prompt_tokens])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0, ids.shape[1] :].tolist()[: len(runs[0].new_tokens)] == runs[0].new_tokens


def test_generate_cli_streams_and_rejects_bad_input(tiny, capsys) -> None:
    _, past = tiny("llama", with_past=True)
    assert main(["generate", str(past), "--prompt", "The quick", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", str(past), "--prompt", "The quick", "--chat"]) == 1
    assert "chat template" in capsys.readouterr().err
    assert main(["generate", str(past), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert main(["generate", str(past.parent / "missing.onnx"), "--prompt", "x"]) == 1


def test_ort_format_keeps_the_graph_interface_and_decodes(tiny, tokens, tmp_path) -> None:
    _, past = tiny("llama", with_past=True)
    options = QuantOptions(scheme="w4a8kv4", group=16, fmt="ort")
    out = transform(past, tmp_path / "ort.onnx", lambda m: quantize_model(m, options))
    names = [o.name for o in session(out).get_outputs()]
    assert names[0] == "logits" and names[1:4] == ["present.0.key", "present.0.key_scale", "present.0.key_zero"]
    full = ort_logits(out, tokens)
    stepped, _ = decode(out, tokens, prefill=9)
    np.testing.assert_allclose(stepped, full[:, 8:], atol=1e-3 * np.abs(full).max())


@pytest.mark.parametrize(("model_type", "scheme"), [("llama", "w16a16"), ("qwen2", "w4a16")])
def test_ort_format_fuses_attention_into_group_query_attention(
    tiny, tokens, tmp_path, model_type: str, scheme: str
) -> None:
    """A float cache in the ort format: onnxruntime's GroupQueryAttention replaces the eager attention,
    with the same logits (prefill and step by step) and the same graph interface as the eager graph
    (w16a16: a float model whose only change is the attention)."""
    _, past = tiny(model_type, with_past=True)
    options = QuantOptions(scheme, group=16, fmt="ort", rotation="none" if scheme == "w16a16" else "quarot")
    fused = transform(past, tmp_path / "fused.onnx", lambda m: quantize_model(m, options))
    eager = transform(
        past, tmp_path / "eager.onnx", lambda m: quantize_model(m, replace(options, fused_attention=False))
    )
    ops = [n.op_type for n in io.load_model(fused).graph]
    layers = len(canonicalize(io.load_model(past)).blocks)
    assert ops.count("GroupQueryAttention") == layers and "Softmax" not in ops
    assert "GroupQueryAttention" not in [n.op_type for n in io.load_model(eager).graph]
    assert [o.name for o in session(fused).get_outputs()] == [o.name for o in session(eager).get_outputs()]
    reference, reference_cache = decode(eager, tokens, prefill=6)
    stepped, cache = decode(fused, tokens, prefill=6)
    np.testing.assert_allclose(stepped, reference, atol=1e-4 * np.abs(reference).max())
    for name, value in reference_cache.items():
        np.testing.assert_allclose(cache[name], value, atol=1e-5)


def test_attention_fusion_refuses_an_unexpected_pattern(tiny) -> None:
    from rotgraph.calibrate import Calibration
    from rotgraph.errors import StructureError
    from rotgraph.passes import GroupQueryAttentionPass
    from rotgraph.pipeline import run_passes

    _, past = tiny("llama", with_past=True)
    model = io.load_model(past)
    attentions = [b.attention for b in canonicalize(model).blocks]
    scale = next(iter(attentions[1].scores.outputs[0].uses())).node  # drop layer 1's score scaling
    scale.outputs[0].replace_all_uses_with(attentions[1].scores.outputs[0])
    model.graph.remove(scale, safe=True)
    with pytest.raises(StructureError, match=r"layer 1 attention: expected .* read by one Mul, found Add"):
        run_passes(model, [GroupQueryAttentionPass(Calibration(attentions=tuple(attentions)))])
