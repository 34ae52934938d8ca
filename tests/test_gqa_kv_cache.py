"""The KV cache kept as int8 / int4 codes inside onnxruntime's GroupQueryAttention (`--set kv_cache.store=onnxruntime`):
the graph against the same graph with a float cache and standard QuantizeLinear/DequantizeLinear on the keys
and values it stores (onnxruntime, optimizations disabled, prefill and decode steps), the calibrated scales
against a direct numpy computation, and the genai folder in onnxruntime-genai's own loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from rotgraph import io
from rotgraph.calibrate import Calibration
from rotgraph.cli import main
from rotgraph.errors import RotgraphError
from rotgraph.options import QuantOptions
from rotgraph.passes.ort.gqa_kv_cache import CacheScales, GqaQuantizedCachePass, cache_attentions, mse_scales
from rotgraph.pipeline import run_passes
from rotgraph.stages import quantize_stages

STAGE = "KV cache inside GroupQueryAttention"
RNG = np.random.default_rng(0)


def float_cache_and_scales(source: Path, scheme: str, work: Path) -> tuple[Path, ir.Model, CacheScales]:
    """(the ort pipeline up to the cache stage, saved; the same run through it and the rest; the scales
    it calibrated)."""
    options = QuantOptions(scheme=scheme, fmt="ort", group=16, kv_cache="onnxruntime")
    tokens = RNG.integers(0, 300, size=(2, 48))
    calibration = Calibration(tokens)
    stages = quantize_stages(options, calibration)
    at = [s.name for s in stages].index(STAGE)
    model = io.load_model(source)
    run_passes(model, [p for s in stages[:at] for p in s.passes])
    before = work / "before" / "model.onnx"
    before.parent.mkdir()
    io.save_model(model, before)
    model = io.load_model(before)
    run_passes(model, [p for s in stages[at:] for p in s.passes])
    assert calibration.cache_scales is not None
    return before, model, calibration.cache_scales


def with_qdq(model: ir.Model, scales: CacheScales, bits: int) -> ir.Model:
    """`model` (float cache) with standard per-channel QuantizeLinear -> DequantizeLinear on the keys and
    values every GroupQueryAttention reads: the function a quantized cache should compute."""
    code = ir.DataType.INT8 if bits == 8 else ir.DataType.INT4
    graph = model.graph
    for i, node in enumerate(cache_attentions(model)):
        for slot, scale in ((1, scales.keys[i]), (2, scales.values[i])):
            x = node.inputs[slot]
            assert x is not None
            s = ir.Value(name=f"qdq{i}.{slot}.s", const_value=ir.Tensor(np.asarray(scale, np.float32)))
            z = ir.Value(name=f"qdq{i}.{slot}.z", const_value=ir.Tensor(np.zeros(len(scale), np.int8), dtype=code))
            s.shape, s.type = ir.Shape([len(scale)]), ir.TensorType(ir.DataType.FLOAT)
            z.shape, z.type = ir.Shape([len(scale)]), ir.TensorType(code)
            graph.register_initializer(s)
            graph.register_initializer(z)
            q = ir.Node("", "QuantizeLinear", [x, s, z], [ir.AttrInt64("axis", -1)])
            dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], [ir.AttrInt64("axis", -1)])
            graph.insert_before(node, [q, dq])
            node.replace_input_with(slot, dq.outputs[0])
    return model


@pytest.mark.parametrize("scheme", ["w4a8kv8", "w4a8kv4"])
def test_the_quantized_cache_computes_a_per_channel_fake_quantization(tiny, tmp_path: Path, scheme: str) -> None:
    from test_genai_format import step_logits

    _, source = tiny("llama", "dynamo", with_past=True)
    before, quantized, found = float_cache_and_scales(source, scheme, tmp_path)
    bits = int(scheme[-1])
    reference = with_qdq(io.load_model(before), found, bits)
    paths = {}
    for name, model in (("quantized", quantized), ("reference", reference)):
        paths[name] = tmp_path / name / "model.onnx"
        paths[name].parent.mkdir()
        io.save_model(model, paths[name])
    got, want = step_logits(paths["quantized"]), step_logits(paths["reference"])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    caches = [v for v in quantized.graph.inputs if v.name and v.name.startswith("past")]
    assert {v.dtype for v in caches} == {ir.DataType.INT8 if bits == 8 else ir.DataType.UINT8}
    head_dim = 16
    assert {v.shape[-1] for v in caches} == {head_dim if bits == 8 else head_dim // 2}  # type: ignore[index]


def test_scales_are_the_least_squares_clip_per_channel() -> None:
    x = RNG.standard_normal((4000, 6))
    x[0, 2] = 40.0  # one outlier: clipping it costs less than the resolution it would take
    scales = mse_scales(x, 4)
    for c in range(x.shape[1]):
        errors = {}
        for s in (scales[c], np.abs(x[:, c]).max() / 7):
            errors[float(s)] = float(((np.clip(np.round(x[:, c] / s), -8, 7) * s - x[:, c]) ** 2).sum())
        assert errors[float(scales[c])] <= min(errors.values()) + 1e-9
    assert scales[2] < 40.0 / 7 * 0.6


def test_the_pass_refuses_rope_inside_and_missing_scales(tiny) -> None:
    _, source = tiny("llama", "dynamo", with_past=True)
    options = QuantOptions(scheme="w4a16", fmt="ort", group=16)  # float cache: RoPE goes into the op
    model = io.load_model(source)
    run_passes(model, [p for s in quantize_stages(options) for p in s.passes])
    with pytest.raises(RotgraphError, match="RoPE inside"):
        cache_attentions(model)
    with pytest.raises(ir.passes.PreconditionError, match=r"needs the KV cache scales .* from CalibrateGqaCachePass"):
        run_passes(model, [GqaQuantizedCachePass(Calibration(), 8)])


def test_bad_kv_cache_options_are_refused_before_any_work() -> None:
    with pytest.raises(RotgraphError, match="needs --format ort or genai"):
        QuantOptions(scheme="w4a8kv4", fmt="qdq", kv_cache="onnxruntime")
    with pytest.raises(RotgraphError, match=r"use --set kv_cache\.store=onnxruntime"):
        QuantOptions(scheme="w4a8kv4", fmt="genai", kv_cache="rotgraph")
    with pytest.raises(RotgraphError, match="expected one of"):
        QuantOptions(scheme="w4a8kv4", fmt="ort", kv_cache="fp8")


@pytest.mark.parametrize("scheme", ["w4a8kv8", "w4a8kv4"])
def test_a_genai_folder_with_a_quantized_cache_runs_in_genai(tiny, tmp_path: Path, scheme: str) -> None:
    from test_genai_format import genai_run, rotgraph_greedy

    _, source = tiny("llama", "dynamo", with_past=True)
    folder = tmp_path / scheme
    args = [
        "quantize",
        str(source),
        "-o",
        str(folder),
        "--format",
        "genai",
        "--scheme",
        scheme,
        "--group",
        "16",
        "--recipe",
        "plain",
    ]
    assert main([*args, "--set", "calibration.windows=2"]) == 0
    config = json.loads((folder / io.GENAI_CONFIG).read_text())
    assert config["model"]["decoder"]["head_size"] == 16  # the real head size, not the packed int4 width
    assert config["search"]["past_present_share_buffer"]  # RoPE's positions come from the mask, not the cache
    # the R3 Hadamards after RotaryEmbedding run on the kernels (built by setup.sh), not on function bodies
    assert config["model"]["decoder"]["session_options"]["custom_ops_library"] == "librotgraph_ops.so"
    ids = [5, 17, 200, 31, 7]
    reference, logits = rotgraph_greedy(folder / "model.onnx", ids, 8)
    tokens, first = genai_run(folder, ids, 8)
    assert tokens == reference
    np.testing.assert_allclose(first, logits[0], atol=1e-4 * np.abs(logits[0]).max())


def test_rope_before_the_hadamard_becomes_rotary_embedding(tiny, tmp_path: Path) -> None:
    from test_genai_format import op_count, step_logits

    from rotgraph.passes.ort.pack_rotary_qkv import PackRotaryQKVPass
    from rotgraph.passes.ort.rotary_embedding import RotaryEmbeddingPass
    from rotgraph.passes.ort.rotary_hadamard import RotaryHadamardPass
    from rotgraph.passes.ort.shared_kv_buffer import SharedKVBufferPass

    _, source = tiny("llama", "dynamo", with_past=True)
    options = QuantOptions(scheme="w4a8kv8", fmt="ort", group=16, kv_cache="onnxruntime", deployment_fusion=False)
    model = io.load_model(source)
    run_passes(
        model, [p for s in quantize_stages(options, Calibration(RNG.integers(0, 300, (2, 32)))) for p in s.passes]
    )
    paths = [tmp_path / "exported" / "model.onnx"]
    paths[0].parent.mkdir()
    io.save_model(model, paths[0])
    passes = (
        ("rotary", RotaryEmbeddingPass(256)),
        ("fused", RotaryHadamardPass()),
        ("packed", PackRotaryQKVPass()),
        ("shared", SharedKVBufferPass()),
    )
    for name, done in passes:
        run_passes(model, [done])
        paths.append(tmp_path / name / "model.onnx")
        paths[-1].parent.mkdir()
        io.save_model(model, paths[-1])
    reference = step_logits(paths[0])
    for path in paths[1:]:
        np.testing.assert_allclose(step_logits(path), reference, atol=2e-4 * np.abs(reference).max(), err_msg=str(path))
    layers = op_count(paths[-1], "GroupQueryAttention")
    assert op_count(paths[1], "RotaryEmbedding") == 2 * layers
    assert op_count(paths[2], "RotaryHadamard") == 2 * layers and op_count(paths[2], "RotaryEmbedding") == 0
    # packed: one projection and one RotaryHadamard per layer for Q, K and V, the attention reads packed QKV
    assert op_count(paths[-1], "RotaryHadamard") == layers
    assert op_count(paths[-1], "MatMulNBits") == op_count(paths[2], "MatMulNBits") - 2 * layers
    assert op_count(paths[-1], "Neg") == op_count(paths[-1], "Cos") == op_count(paths[-1], "Transpose") == 0
    graph = io.load_model(paths[-1]).graph
    assert all(
        u.node.op_type == "GroupQueryAttention" for v in graph.inputs if "past" in (v.name or "") for u in v.uses()
    )


def test_auto_keeps_the_cache_that_won_per_scheme() -> None:
    """kv8: onnxruntime's cache (as good as rotgraph's, smaller, faster); kv4 in the ort format:
    rotgraph's per-token cache (better quality); genai: always onnxruntime's; qdq: never."""
    assert QuantOptions(scheme="w4a8kv8", fmt="ort").gqa_cache
    assert not QuantOptions(scheme="w4a8kv4", fmt="ort").gqa_cache
    assert QuantOptions(scheme="w4a8kv4", fmt="genai").gqa_cache
    assert not QuantOptions(scheme="w4a8kv8", fmt="ort", fused_attention=False).gqa_cache
    assert not QuantOptions(scheme="w4a8kv8", fmt="qdq").gqa_cache
    assert not QuantOptions(scheme="w4a8", fmt="ort").gqa_cache


def test_a_builder_graph_gets_the_cache_inside_its_attention(tmp_path: Path) -> None:
    """The genai builder's graph (RoPE inside its GroupQueryAttention, a symbolic cache width): RoPE moves
    out, R3 goes after it, and the folder with int4 codes in the cache runs in onnxruntime-genai as in
    rotgraph's loop."""
    from test_genai_format import genai_run, rotgraph_greedy

    source = Path(__file__).parent / "fixtures" / "genai-llama-fp32" / "model.onnx"
    folder = tmp_path / "kv4"
    args = [
        "quantize",
        str(source),
        "-o",
        str(folder),
        "--format",
        "genai",
        "--scheme",
        "w4a8kv4",
        "--group",
        "16",
        "--recipe",
        "plain",
    ]
    assert main([*args, "--set", "calibration.windows=2"]) == 0
    graph = io.load_model(folder / "model.onnx").graph
    caches = [v for v in graph.inputs if v.dtype == ir.DataType.UINT8]
    assert len(caches) == 4 and all(v.shape is not None and v.shape[-1] == 8 for v in caches)  # head_dim 16
    ids = [5, 17, 200, 31, 7]
    reference, logits = rotgraph_greedy(folder / "model.onnx", ids, 6)
    tokens, first = genai_run(folder, ids, 6)
    assert tokens == reference
    np.testing.assert_allclose(first, logits[0], atol=1e-4 * np.abs(logits[0]).max())
