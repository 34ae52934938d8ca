"""SmoothQuant: exact in float, and it moves activation range into the weights as defined."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ort_logits, torch_logits

from rotgraph import io
from rotgraph.calibrate import Calibration, projection_inputs
from rotgraph.constants import SMOOTHQUANT_KEY
from rotgraph.passes import SmoothQuantPass
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model, run_passes
from rotgraph.quantize import QuantOptions, quantize_model
from rotgraph.structure import discover
from rotgraph.weights import read_float64

ATOL = 2e-5


def probe_absmax(path, tokens: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """max |x| per channel of every projection input site, read from an onnxruntime run of the saved
    model with those values as extra outputs (built with the onnx package, not rotgraph's probes)."""
    import onnx

    proto = onnx.load(str(path))
    sites = projection_inputs(discover(io.load_model(path)))
    names = [lin.input.name for lin in sites.values()]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    probed = path.with_name("probed.onnx")
    onnx.save(proto, str(probed))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(probed), options, providers=["CPUExecutionProvider"])
    outs = session.run(names, {"input_ids": tokens.astype(np.int64)})
    return {
        site: np.abs(x).reshape(-1, x.shape[-1]).max(axis=0).astype(np.float64)
        for site, x in zip(sites, outs, strict=True)
    }


def smoothed(path, tokens, tmp_path, alpha: float, rotate: bool):
    model = io.load_model(path)
    if rotate:
        rotate_model(model, RotateOptions(seed=4))
    else:
        canonicalize(model)
    before = tmp_path / "before.onnx"
    io.save_model(model, before)
    act_max = probe_absmax(before, tokens)
    run_passes(model, [SmoothQuantPass(Calibration(absmax=act_max), alpha)])
    out = tmp_path / "smoothed.onnx"
    io.save_model(model, out)
    return model, act_max, out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("rotate", [False, True])
def test_smoothing_keeps_the_function(tiny, tokens, tmp_path, model_type: str, rotate: bool) -> None:
    folder, path = tiny(model_type, "dynamo", num_attention_heads=4, num_key_value_heads=2)
    model, _, out = smoothed(path, tokens, tmp_path, 0.5, rotate)
    assert SMOOTHQUANT_KEY in model.metadata_props
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_alpha_one_flattens_every_smoothed_activation(tiny, tokens, tmp_path) -> None:
    """alpha = 1 puts all of max|X_j| into the weights: each channel of a smoothed input then peaks at 1
    on the calibration tokens. The GQA-pooled V->O site peaks at 1 in its largest head of each group."""
    _, path = tiny("llama", "dynamo", num_attention_heads=4, num_key_value_heads=2)
    model, _, out = smoothed(path, tokens, tmp_path, 1.0, rotate=False)
    after = probe_absmax(out, tokens)
    for block in discover(model).blocks:
        a = block.attention
        for site in ("qkv", "gate_up", "down"):
            np.testing.assert_allclose(after[block.index, site], 1.0, rtol=1e-4)
        per_group = after[block.index, "o"].reshape(a.num_kv_heads, -1, a.head_dim).max(axis=1)
        np.testing.assert_allclose(per_group, 1.0, rtol=1e-4)


def test_alpha_zero_flattens_the_weight_rows(tiny, tokens, tmp_path) -> None:
    """alpha = 0 puts all of max|W_j| into the activation: the rows of the weights that only the last
    site rewrites (O, pooled per KV group, and down) then peak at 1."""
    _, path = tiny("llama", "dynamo", num_attention_heads=4, num_key_value_heads=2)
    model, _, _ = smoothed(path, tokens, tmp_path, 0.0, rotate=False)
    for block in discover(model).blocks:
        a, m = block.attention, block.mlp
        o_rows = np.abs(read_float64(a.o.weight)).max(axis=1).reshape(a.num_kv_heads, -1, a.head_dim).max(axis=1)
        np.testing.assert_allclose(o_rows, 1.0, rtol=1e-9)
        np.testing.assert_allclose(np.abs(read_float64(m.down.weight)).max(axis=1), 1.0, rtol=1e-9)


def test_down_site_is_skipped_behind_the_online_hadamard(tiny, tokens, tmp_path) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=4))
    down = [read_float64(b.mlp.down.weight) for b in discover(model).blocks]
    before = tmp_path / "before.onnx"
    io.save_model(model, before)
    run_passes(model, [SmoothQuantPass(Calibration(absmax=probe_absmax(before, tokens)), 0.5)])
    for block, old in zip(discover(model).blocks, down, strict=True):
        np.testing.assert_array_equal(read_float64(block.mlp.down.weight), old)


def test_value_output_site_is_skipped_behind_the_o_hadamard(tiny, tokens, tmp_path) -> None:
    """An online Hadamard before o_proj mixes the heads: V's columns no longer match O's input channels,
    so SmoothQuant leaves V and O alone there and the function is kept."""
    folder, path = tiny("llama", "dynamo", num_attention_heads=4, num_key_value_heads=2)
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=4, out_hadamard=True))
    value_output = [
        (read_float64(b.attention.v.weight), read_float64(b.attention.o.weight)) for b in discover(model).blocks
    ]
    before = tmp_path / "before.onnx"
    io.save_model(model, before)
    run_passes(model, [SmoothQuantPass(Calibration(absmax=probe_absmax(before, tokens)), 0.5)])
    for block, (v, o) in zip(discover(model).blocks, value_output, strict=True):
        np.testing.assert_array_equal(read_float64(block.attention.o.weight), o)
        ratio = read_float64(block.attention.v.weight) / v  # the norm site scales V's rows, nothing its columns
        np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-6)
    out = tmp_path / "smoothed.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_bad_alpha_and_missing_ranges_are_refused(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    with pytest.raises(Exception, match="alpha"):
        SmoothQuantPass(Calibration(), 1.5)
    model = io.load_model(path)
    canonicalize(model)
    with pytest.raises(Exception, match="no calibrated activation range"):
        run_passes(model, [SmoothQuantPass(Calibration(absmax={}), 0.5)])


def test_quantize_with_smoothing(tiny, tokens, tmp_path) -> None:
    _, path = tiny("llama", "dynamo")
    calibration = np.random.default_rng(5).integers(0, 384, size=(4, 64))
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w8a8", rotation="none", smooth=0.5, group=16), calibration)
    assert SMOOTHQUANT_KEY in model.metadata_props
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    logits, reference = ort_logits(out, tokens), ort_logits(path, tokens)
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    with pytest.raises(Exception, match="calibration"):
        quantize_model(io.load_model(path), QuantOptions(scheme="w8a8", rotation="none", smooth=0.5))
