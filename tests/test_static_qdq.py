"""The standard QDQ graph: only standard ONNX ops, static activation scales equal to an independent
calibration, logits equal to an independent fake-quantized forward, opset variants, onnxruntime's
integer kernels, refused options."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rotgraph import io
from rotgraph.cli import main
from rotgraph.errors import RotgraphError
from rotgraph.quantize import QuantOptions, quantize_model
from tests.conftest import ort_logits

CALIBRATION = np.random.default_rng(7).integers(0, 384, size=(3, 40))


def quantized(tiny, tmp_path: Path, name: str, with_past: bool = False, **options: object) -> Path:
    _, path = tiny("llama", "dynamo", with_past=with_past)
    model = io.load_model(path)
    quantize_model(model, QuantOptions(**options), CALIBRATION)  # type: ignore[arg-type]
    out = tmp_path / name / "model.onnx"
    out.parent.mkdir()
    io.save_model(model, out)
    return out


def initializer(path: Path, name: str) -> np.ndarray:
    tensors = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    return onnx.numpy_helper.to_array(tensors[name])


@pytest.mark.parametrize(
    ("options", "with_past"),
    [
        ({"scheme": "w8a8", "group": 0, "activations": "static", "opset": 17}, False),
        ({"scheme": "w4a8kv8", "group": 16, "activations": "static", "opset": 21}, False),
        ({"scheme": "w8a8kv8", "group": 0, "activations": "static", "opset": 19}, True),
        ({"scheme": "w4a4kv4", "group": 16, "activations": "dynamic", "opset": 23}, False),
        ({"scheme": "w4a4kv4", "group": 16, "activations": "dynamic", "opset": 21}, True),
    ],
)
def test_qdq_output_is_standard_onnx(tiny, tmp_path, options: dict, with_past: bool) -> None:
    """Walk every node: default domain, defined at the model's opset, no local functions; the full onnx
    checker and strict shape inference pass; onnxruntime runs it."""
    out = quantized(tiny, tmp_path, "q", with_past, rotation="quarot", **options)
    proto = onnx.load(str(out))
    assert len(proto.functions) == 0
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [options["opset"]]
    for node in proto.graph.node:
        assert node.domain in ("", "ai.onnx"), node
        assert onnx.defs.has(node.op_type, options["opset"], ""), node.op_type
    onnx.checker.check_model(str(out), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(out), str(tmp_path / "inferred.onnx"), strict_mode=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    if options["activations"] == "static":  # a Q per projection input site (4 per block) and key/value
        assert ops["QuantizeLinear"] == 2 * (4 + (2 if "kv" in options["scheme"] else 0))
    assert np.isfinite(ort_logits(out, CALIBRATION[:1, :16])).all()


@pytest.mark.slow  # its own tiny export (three KV heads)
def test_keys_and_values_get_a_range_per_kv_head(tiny, tmp_path) -> None:
    """With three KV heads, keys and values are quantized along axis 1 (three scales and zero points);
    each value head's scale is that of its own range, measured independently on the V projection output
    of the Hugging Face model over the same windows."""
    folder, path = tiny("llama", "dynamo", num_key_value_heads=3)
    model = io.load_model(path)
    options = QuantOptions("w16a8kv8", rotation="none", activations="static", opset=21)  # float weights
    quantize_model(model, options, CALIBRATION)
    out = tmp_path / "kv" / "model.onnx"
    out.parent.mkdir()
    io.save_model(model, out)
    for node in onnx.load(str(out)).graph.node:
        if node.name.endswith((".k.act_quantize", ".v.act_quantize")):
            assert [(a.name, a.i) for a in node.attribute] == [("axis", 1)]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    outputs: list[np.ndarray] = []
    hf.model.layers[0].self_attn.v_proj.register_forward_hook(lambda _m, _a, y: outputs.append(y.numpy()))
    with torch.no_grad():
        for row in CALIBRATION:
            hf(input_ids=torch.from_numpy(row[None, :]), use_cache=False)
    v = np.concatenate(outputs, axis=1).reshape(-1, 3, hf.config.head_dim).astype(np.float64)
    lo, hi = np.minimum(v.min(axis=(0, 2)), 0), np.maximum(v.max(axis=(0, 2)), 0)
    np.testing.assert_allclose(initializer(out, "layers.0.v.act_scale"), (hi - lo) / 255, rtol=1e-5)
    np.testing.assert_array_equal(initializer(out, "layers.0.v.act_zero"), np.round(-lo / ((hi - lo) / 255)))
    assert np.isfinite(ort_logits(out, CALIBRATION[:1, :16])).all()


def _projection_inputs(folder: Path, tokens: np.ndarray) -> dict[tuple[int, str], list[np.ndarray]]:
    """Inputs of each block's q, o, gate and down projections in the Hugging Face model (torch hooks)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    seen: dict[tuple[int, str], list[np.ndarray]] = {}
    for i, layer in enumerate(hf.model.layers):
        for site, module in (
            ("qkv", layer.self_attn.q_proj),
            ("o", layer.self_attn.o_proj),
            ("gate_up", layer.mlp.gate_proj),
            ("down", layer.mlp.down_proj),
        ):
            module.register_forward_pre_hook(lambda _m, a, key=(i, site): seen.setdefault(key, []).append(a[0].numpy()))
    with torch.no_grad():
        for row in tokens:
            hf(input_ids=torch.from_numpy(row[None, :]), use_cache=False)
    return seen


def test_static_scales_equal_an_independent_numpy_calibration(tiny, tmp_path) -> None:
    """minmax, unsigned: scale = (max(hi, 0) - min(lo, 0)) / 255, zero = round(-lo / scale) from the
    projection inputs the Hugging Face model computes on the same windows; percentile, signed: the
    threshold is the smallest |x| with at least 99.999% of the values at or below it (onnxruntime's rule)
    to within one of its 2048 histogram bins."""
    folder, _ = tiny("llama", "dynamo")
    seen = _projection_inputs(folder, CALIBRATION)
    out = quantized(tiny, tmp_path, "minmax", scheme="w16a8", rotation="none", activations="static")
    sym = quantized(
        tiny,
        tmp_path,
        "pct",
        scheme="w16a8",
        rotation="none",
        activations="static",
        act_symmetric=True,
        calibration="percentile",
    )
    for (block, site), arrays in seen.items():
        x = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        scale = (hi - lo) / 255
        found = initializer(out, f"layers.{block}.{site}.act_scale")
        np.testing.assert_allclose(found, scale, rtol=1e-5)
        assert initializer(out, f"layers.{block}.{site}.act_zero") == np.round(-lo / scale)
        threshold = float(initializer(sym, f"layers.{block}.{site}.act_scale")) * 127
        magnitudes = np.sort(np.abs(x))
        kth = magnitudes[int(np.ceil(0.99999 * len(x))) - 1]
        assert abs(threshold - kth) <= 1.5 * magnitudes[-1] / 2048
        assert initializer(sym, f"layers.{block}.{site}.act_zero").dtype == np.int8


def test_qdq_logits_equal_a_fake_quantized_torch_forward(tiny, tmp_path) -> None:
    """The Hugging Face model with each projection input quantized and dequantized in numpy by the scales
    and zero points stored in the graph, and the weights it stores (codes x scale), gives the QDQ graph's
    logits (onnxruntime, optimizations off)."""
    folder, _ = tiny("llama", "dynamo")
    out = quantized(tiny, tmp_path, "q", scheme="w8a8", group=0, rotation="none", activations="static", opset=21)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()

    def fake_quant(name: str):  # type: ignore[no-untyped-def]
        scale = initializer(out, f"{name}.act_scale").astype(np.float32)
        zero = initializer(out, f"{name}.act_zero").astype(np.float32)

        def hook(_module, args):  # type: ignore[no-untyped-def]
            x = args[0].numpy()
            q = np.clip(np.round(x / scale) + zero, 0, 255)
            return (torch.from_numpy(((q - zero) * scale).astype(np.float32)),)

        return hook

    for i, layer in enumerate(hf.model.layers):
        a, m = layer.self_attn, layer.mlp
        for site, modules in (
            ("qkv", (a.q_proj, a.k_proj, a.v_proj)),
            ("o", (a.o_proj,)),
            ("gate_up", (m.gate_proj, m.up_proj)),
            ("down", (m.down_proj,)),
        ):
            for module in modules:
                module.register_forward_pre_hook(fake_quant(f"layers.{i}.{site}"))
        for role, module in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj)):
            w = initializer(out, f"layers.{i}.{role}.codes") * initializer(out, f"layers.{i}.{role}.scale")
            module.weight.data = torch.from_numpy(w.T.astype(np.float32))
        for role, module in (("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)):
            w = initializer(out, f"layers.{i}.{role}.codes") * initializer(out, f"layers.{i}.{role}.scale")
            module.weight.data = torch.from_numpy(w.T.astype(np.float32))
    table = initializer(out, "embedding.codes") * initializer(out, "embedding.scale").reshape(-1, 1)
    head = initializer(out, "lm_head.codes") * initializer(out, "lm_head.scale").reshape(1, -1)
    hf.model.embed_tokens.weight.data = torch.from_numpy(table.astype(np.float32))
    hf.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head.T.astype(np.float32)))
    tokens = CALIBRATION[:2, :24]
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(tokens), use_cache=False).logits.numpy()
    logits = ort_logits(out, tokens)
    # a value within float rounding of a rounding boundary may land one step away: compare the bulk
    assert np.quantile(np.abs(logits - expected), 0.99) < 1e-4 * np.abs(expected).max()
    assert np.abs(logits - expected).max() < 2e-2 * np.abs(expected).max()


def test_opset_variants_load_and_agree(tiny, tmp_path) -> None:
    """w8a8 static QuaRot (per-channel weights) written at opsets 17, 19, 21 and 23: the same logits."""
    tokens = CALIBRATION[:2, :24]
    logits = [
        ort_logits(
            quantized(tiny, tmp_path, f"o{opset}", scheme="w8a8", group=0, activations="static", opset=opset), tokens
        )
        for opset in (17, 19, 21, 23)
    ]
    for other in logits[1:]:
        np.testing.assert_allclose(other, logits[0], rtol=1e-5, atol=1e-5)


def test_dynamic_activations_in_standard_ops_compute_what_the_functions_compute(tiny, tmp_path) -> None:
    """Dynamic per-token activations and KV cache inlined into standard ops give the same logits as the
    graph with rotgraph's functions."""
    tokens = CALIBRATION[:2, :24]
    functions = quantized(tiny, tmp_path, "f", scheme="w4a4kv4", group=16)
    standard = quantized(tiny, tmp_path, "s", scheme="w4a4kv4", group=16, opset=23)
    assert onnx.load(str(functions)).functions and not onnx.load(str(standard)).functions
    np.testing.assert_array_equal(ort_logits(standard, tokens), ort_logits(functions, tokens))


def test_onnxruntime_runs_static_w8a8_on_integer_kernels(tiny, tmp_path) -> None:
    """onnxruntime with every optimization on turns each of the 14 projections into MatMulIntegerToFloat
    (int8 x uint8 -> float); no float MatMul reads a weight; its logits stay those of the QDQ graph."""
    out = quantized(tiny, tmp_path, "q", scheme="w8a8", group=0, activations="static", opset=21)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out.parent / "optimized.onnx")  # beside the weights it reads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    tokens = CALIBRATION[:2, :24]
    optimized = onnx.load(str(out.parent / "optimized.onnx"))
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["MatMulIntegerToFloat"] == 2 * 7
    matrices = {t.name: onnx.numpy_helper.to_array(t) for t in optimized.graph.initializer if len(t.dims) == 2}
    # the online Hadamard's factors (entries of one magnitude) stay float MatMuls; no weight does
    weights = {name for name, m in matrices.items() if np.ptp(np.abs(m)) > 1e-6}
    float_matmuls = [n for n in optimized.graph.node if n.op_type in ("MatMul", "FusedMatMul", "Gemm")]
    assert not [n.name for n in float_matmuls if any(i in weights for i in n.input)]
    fast = session.run(None, {"input_ids": tokens})[0]
    reference = ort_logits(out, tokens)
    assert np.abs(fast - reference).max() < 1e-2 * np.abs(reference).max()


def _spreads(seen: dict[tuple[int, str], list[np.ndarray]]) -> dict[tuple[int, str], tuple[float, float, float]]:
    """(lo, hi, spread) of each projection input: spread = max |x| / the median over tokens of max |x|."""
    found = {}
    for key, arrays in seen.items():
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays]).astype(np.float64)
        found[key] = (x.min(), x.max(), np.abs(x).max() / np.median(np.abs(x).max(axis=1)))
    return found


def _ratio_between(spreads: dict[tuple[int, str], tuple[float, float, float]]) -> float:
    """A ratio half-way between the two middle spreads: some sites above it, some below."""
    values = sorted(s for _, _, s in spreads.values())
    middle = len(values) // 2
    assert values[middle - 1] < values[middle]
    return (values[middle - 1] + values[middle]) / 2


def test_wide_ratio_gives_16_bit_codes_to_the_sites_whose_spread_exceeds_it(tiny, tmp_path) -> None:
    """Spreads from the Hugging Face model's projection inputs (torch hooks, same windows): a site above
    the ratio gets uint16 codes with scale (hi - lo) / 65535 over its full range, every other site
    uint8 with (hi - lo) / 255; the graph stays standard ONNX (full checker) and runs."""
    folder, _ = tiny("llama", "dynamo")
    spreads = _spreads(_projection_inputs(folder, CALIBRATION))
    ratio = _ratio_between(spreads)
    options = {"scheme": "w16a8", "rotation": "none", "activations": "static", "opset": 21}
    out = quantized(tiny, tmp_path, "wide", wide_ratio=ratio, **options)
    onnx.checker.check_model(str(out), full_check=True)
    for (block, site), (lo, hi, spread) in spreads.items():
        levels = 65535 if spread > ratio else 255
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        np.testing.assert_allclose(initializer(out, f"layers.{block}.{site}.act_scale"), (hi - lo) / levels, rtol=1e-5)
        zero = initializer(out, f"layers.{block}.{site}.act_zero")
        assert zero.dtype == (np.uint16 if spread > ratio else np.uint8)
        assert zero == np.round(-lo / ((hi - lo) / levels))
    assert np.isfinite(ort_logits(out, CALIBRATION[:1, :16])).all()


def test_wide_sites_leave_the_8_bit_projections_on_integer_kernels(tiny, tmp_path) -> None:
    """w8a8 with some projection inputs at 16 bits: onnxruntime (every optimization on) still fuses each
    projection that reads an 8-bit site into MatMulIntegerToFloat, and only those (q, k, v read qkv;
    gate, up read gate_up); its logits stay those of the QDQ graph."""
    folder, _ = tiny("llama", "dynamo")
    spreads = _spreads(_projection_inputs(folder, CALIBRATION))
    ratio = _ratio_between(spreads)
    readers = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}
    expected = sum(readers[site] for (_, site), (_, _, spread) in spreads.items() if spread <= ratio)
    assert 0 < expected < 2 * 7
    out = quantized(
        tiny, tmp_path, "q", scheme="w8a8", group=0, rotation="none", activations="static", opset=21, wide_ratio=ratio
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out.parent / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(out.parent / "optimized.onnx")).graph.node)
    assert ops["MatMulIntegerToFloat"] == expected
    tokens = CALIBRATION[:2, :24]
    fast = session.run(None, {"input_ids": tokens})[0]
    reference = ort_logits(out, tokens)
    assert np.abs(fast - reference).max() < 1e-2 * np.abs(reference).max()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"opset": 16}, "opsets 17 to 23"),
        ({"scheme": "w4a8", "opset": 20}, "opset 21"),
        ({"scheme": "w8a4", "group": 0, "activations": "static", "opset": 19}, "4-bit activations"),
        ({"scheme": "w8a8", "opset": 19}, "--group 0"),
        ({"fmt": "ort", "activations": "static"}, "qdq format"),
        ({"activations": "static", "calibration": "mse"}, "calibration method"),
        ({"activations": "dynamic", "wide_ratio": 16.0}, "static activations"),
        ({"activations": "static", "wide_ratio": 1.0}, "ratio > 1"),
        ({"scheme": "w8a8", "group": 0, "activations": "static", "opset": 19, "wide_ratio": 16.0}, "opset 21"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(RotgraphError, match=message):
        QuantOptions(**options)


def test_cli_refuses_bad_opset_before_reading_the_model(tmp_path, capsys) -> None:
    """The input does not exist: the opset is what is named, so nothing was read."""
    for extra in (["--set", "output.opset=16"], ["--scheme", "w4a8", "--set", "output.opset=20"]):
        assert main(["quantize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "o.onnx"), *extra]) == 1
        err = capsys.readouterr().err
        assert "opset" in err and "absent" not in err, err


def test_cli_passes_wide_ratio_and_refuses_a_bad_one_before_reading_the_model(tmp_path, capsys) -> None:
    """activations.wide_ratio reaches QuantOptions: a ratio <= 1 and dynamic activations are named, and the absent
    input is not (nothing was read)."""
    for extra in (
        ["--set", "activations.wide_ratio=0.5"],
        ["--set", "activations.wide_ratio=16", "--activations", "dynamic"],
    ):
        assert main(["quantize", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "o.onnx"), *extra]) == 1
        err = capsys.readouterr().err
        assert "--set activations.wide_ratio=" in err and "absent" not in err, err
