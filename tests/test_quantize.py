"""Quantization passes: the ONNX ops compute what the numpy quantizers compute, on real graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import mean_kl, ort_logits

from rotgraph import io
from rotgraph.calibrate import CLIP_GRID, Calibration, best_clip
from rotgraph.constants import ROTATION_KEY
from rotgraph.errors import RotgraphError, ValidationError
from rotgraph.fakequant import ActSpec, insert_fake_quant
from rotgraph.options import QuantOptions, Scheme
from rotgraph.passes import UntieEmbeddingPass
from rotgraph.pipeline import canonical_form_passes, canonicalize, run_passes
from rotgraph.quant import WeightSpec, quantize_rtn
from rotgraph.quantize import quantize_model
from rotgraph.stages import quantize_stages
from rotgraph.structure import before_fake_quant, discover, is_hadamard
from rotgraph.weights import read_float64, rewrite_initializer


def run_single(tmp_path: Path, spec: ActSpec, widths: list[int], data: list[np.ndarray]) -> list[np.ndarray]:
    """A graph with one FakeQuant per input, all sharing one overload."""
    inputs = [
        ir.Value(name=f"x{i}", shape=ir.Shape(["b", w]), type=ir.TensorType(ir.DataType.FLOAT))
        for i, w in enumerate(widths)
    ]
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 23}, name="g")
    model = ir.Model(graph, ir_version=10)
    for i, x in enumerate(inputs):
        node = insert_fake_quant(model, x, spec)
        node.outputs[0].name = f"y{i}"
        graph.outputs.append(node.outputs[0])
    path = tmp_path / "fq.onnx"
    io.save_model(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {f"x{i}": d for i, d in enumerate(data)})


@pytest.mark.parametrize(
    "spec",
    [ActSpec(8), ActSpec(4, clip=0.9), ActSpec(4, symmetric=False, clip=0.95), ActSpec(4, symmetric=False, group=16)],
    ids=lambda s: s.overload,
)
def test_fake_quant_op_matches_numpy_for_every_width(tmp_path, spec: ActSpec) -> None:
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((5, 48)).astype(np.float32), (3 * rng.standard_normal((5, 96))).astype(np.float32)]
    for got, x in zip(run_single(tmp_path, spec, [48, 96], data), data, strict=True):
        np.testing.assert_allclose(got, spec.reference(x), rtol=1e-5, atol=1e-6)
        assert len(np.unique(got[0])) <= 2**spec.bits * (x.shape[1] // (spec.group or x.shape[1]))


def test_scheme_parsing() -> None:
    assert Scheme.parse("w4a4kv4") == Scheme(4, 4, 4)
    assert Scheme.parse("w4a16") == Scheme(4, 16, None)
    with pytest.raises(Exception, match="expected w"):
        Scheme.parse("w3a4")


@pytest.mark.parametrize("group,symmetric", [(16, True), (0, True), (16, False)])
def test_weights_dequantize_to_the_rtn_result(tiny, tokens, tmp_path, group: int, symmetric: bool) -> None:
    _, path = tiny("llama", "dynamo")
    reference = io.load_model(path)
    canonicalize(reference)
    expected = {}
    spec = WeightSpec(4, symmetric, group or None)
    for block in discover(reference).blocks:
        w = read_float64(block.mlp.down.weight)
        expected[block.index] = quantize_rtn(w.T, spec).dequantize().T
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w4a16", rotation="none", group=group, symmetric_weights=symmetric))
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    # Evaluate each down_proj's DequantizeLinear output with onnxruntime and compare to numpy.
    desc = discover(model)
    for block in desc.blocks:
        model.graph.outputs.append(block.mlp.down.weight)
    probe = tmp_path / "probe.onnx"
    io.save_model(model, probe)
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    names = [b.mlp.down.weight.name for b in desc.blocks]
    for block, got in zip(desc.blocks, session.run(names, {"input_ids": tokens}), strict=True):
        np.testing.assert_allclose(got, expected[block.index], rtol=1e-6, atol=1e-7)
    # The whole graph: the float model with every weight replaced by its numpy RTN dequantization.
    head = WeightSpec(8, True, group or None)
    float_model = io.load_model(path)
    run_passes(float_model, [*canonical_form_passes(), UntieEmbeddingPass()])
    desc = discover(float_model)
    for block in desc.blocks:
        a, m = block.attention, block.mlp
        for lin in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down):
            rewrite_initializer(lin.weight, lambda w: quantize_rtn(w.T, spec).dequantize().T)
    rewrite_initializer(desc.lm_head.weight, lambda w: quantize_rtn(w.T, head).dequantize().T)
    rewrite_initializer(desc.embedding_table, lambda w: quantize_rtn(w, head).dequantize())
    dequantized = tmp_path / "dequantized.onnx"
    io.save_model(float_model, dequantized)
    np.testing.assert_allclose(ort_logits(out, tokens), ort_logits(dequantized, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8kv8", "w4a4kv4"])
def test_schemes_build_stay_close_and_rotation_pays_at_4_bits(tiny, tokens, tmp_path, scheme: str) -> None:
    """Each scheme quantizes every projection, activation and cache entry it names; w8a8 is a small
    perturbation of the float model; at 4-bit activations the rotated model is closer to float than the
    unrotated one (the fixture plants outlier channels in the residual stream)."""
    _, path = tiny("qwen2", "torchscript")
    reference = ort_logits(path, tokens)
    kl = {}
    for rotation in ("none", "quarot"):
        model = io.load_model(path)
        quantize_model(model, QuantOptions(scheme=scheme, rotation=rotation, group=16))
        counts = {op: sum(n.op_type == op for n in model.graph) for op in ("DequantizeLinear", "FakeQuant")}
        kv = 4 if "kv" in scheme else 0
        assert counts == {"DequantizeLinear": 14 + 2, "FakeQuant": 8 + kv}  # 7 projections x 2 blocks, head
        out = tmp_path / f"{rotation}.onnx"
        io.save_model(model, out)
        logits = ort_logits(out, tokens)
        kl[rotation] = mean_kl(reference, logits)
        if scheme == "w8a8":  # 8 bits everywhere: a small perturbation of the float model
            assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    if scheme == "w4a4kv4":
        assert kl["quarot"] < kl["none"], kl


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4kv4"])
def test_gptq_beats_rtn_on_its_calibration_tokens(tiny, tmp_path, scheme: str) -> None:
    """GPTQ minimizes each layer's output error on the calibration inputs: on those tokens the GPTQ model
    is closer to float than the RTN one (same rotation, groups and grid)."""
    _, path = tiny("llama", "dynamo")
    calibration = np.random.default_rng(5).integers(0, 384, size=(4, 64))
    reference = ort_logits(path, calibration)
    kl = {}
    for weights in ("rtn", "gptq"):
        model = io.load_model(path)
        options = QuantOptions(scheme=scheme, rotation="quarot", weights=weights, group=16)
        quantize_model(model, options, calibration)
        out = tmp_path / f"{weights}.onnx"
        io.save_model(model, out)
        kl[weights] = mean_kl(reference, ort_logits(out, calibration))
    assert kl["gptq"] < kl["rtn"], kl


def test_quantizing_twice_is_refused(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w4a16", rotation="none", group=16))
    with pytest.raises(Exception, match="already"):
        quantize_model(model, QuantOptions(scheme="w4a16", rotation="none", group=16))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("scheme", "head_bits"), [("w4a16", 16), ("w4a16", 8), ("w8a16", 8)])
def test_ort_format_computes_what_the_qdq_format_computes(
    tiny, tokens, tmp_path, scheme: str, head_bits: int, symmetric: bool
) -> None:
    """MatMulNBits and GatherBlockQuantized with rotgraph's packed codes compute what DequantizeLinear +
    MatMul / Gather compute, to float rounding. 8-bit MatMulNBits are emitted with int8 activations
    (accuracy level 4, the only fast onnxruntime kernel for them); to check their codes, scales and
    zero points exactly the test sets every level to 0 (float compute) before running."""
    _, path = tiny("llama", "dynamo")
    outs = {}
    for fmt in ("qdq", "ort"):
        model = io.load_model(path)
        options = QuantOptions(scheme=scheme, group=16, symmetric_weights=symmetric, fmt=fmt, head_bits=head_bits)
        quantize_model(model, options)
        if fmt == "ort":
            ops = [n.op_type for n in model.graph]
            head = int(head_bits == 8)
            # 7 projections x 2 blocks, gate and up packed into one (PackGateUpPass)
            assert ops.count("MatMulNBits") == 12 + head and ops.count("GatherBlockQuantized") == head
            assert "DequantizeLinear" not in ops
            nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
            levels = {n.attributes.get_int("bits"): n.attributes.get_int("accuracy_level") for n in nbits}
            assert levels == ({4: 0} if scheme == "w4a16" else {}) | ({8: 4} if head or scheme == "w8a16" else {})
            for n in nbits:
                n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
        outs[fmt] = tmp_path / f"{fmt}.onnx"
        io.save_model(model, outs[fmt])
    np.testing.assert_allclose(ort_logits(outs["ort"], tokens), ort_logits(outs["qdq"], tokens), atol=1e-4)


def test_ort_format_w4a8_uses_int8_kernels(tiny, tokens, tmp_path) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme="w4a8", group=16, fmt="ort"))
    levels = {n.attributes.get_int("accuracy_level") for n in model.graph if n.op_type == "MatMulNBits"}
    assert levels == {4}
    assert not any(n.op_type == "FakeQuant" for n in model.graph)  # onnxruntime quantizes to int8 itself
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    # The same codes with float compute (accuracy level 0): the int8 activations only perturb the result.
    for n in model.graph:
        if n.op_type == "MatMulNBits":
            n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)
    float_compute = tmp_path / "level0.onnx"
    io.save_model(model, float_compute)
    logits, reference = ort_logits(out, tokens), ort_logits(float_compute, tokens)
    assert 0 < np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_spilled_quantization_equals_the_in_memory_one(tiny, tokens, tmp_path, monkeypatch, fmt: str) -> None:
    """`quantize` writes quantized tensors to a scratch file as it goes; the saved model is the same."""
    from rotgraph.quantize import quantize
    from rotgraph.weights import SpillFile

    monkeypatch.setattr(SpillFile, "MIN_BYTES", 0)  # spill every tensor of the tiny model
    written: list[int] = []
    spill = SpillFile.spill
    monkeypatch.setattr(SpillFile, "spill", lambda self, graph: written.append(spill(self, graph)) or written[-1])
    _, path = tiny("llama", "dynamo")
    options = QuantOptions(scheme="w4a16", rotation="quarot", group=16, fmt=fmt)
    out = tmp_path / "out" / "spilled.onnx"
    quantize(path, out, options)
    assert sorted(f.name for f in out.parent.iterdir()) == ["spilled.onnx", "spilled.onnx.data", "tokenizer.json"]
    assert len(written) == 15 and all(n > 0 for n in written)  # after each of 14 projections, then the head
    model = io.load_model(path)
    quantize_model(model, options)
    memory = tmp_path / "memory.onnx"
    io.save_model(model, memory)
    spilled, held = io.load_model(out), io.load_model(memory)
    assert set(spilled.graph.initializers) == set(held.graph.initializers)
    for name, value in held.graph.initializers.items():
        assert spilled.graph.initializers[name].const_value.tobytes() == value.const_value.tobytes(), name
    np.testing.assert_array_equal(ort_logits(out, tokens), ort_logits(memory, tokens))


@pytest.mark.parametrize(
    ("scheme", "per_layer", "out"),
    [("w4a8", 1, 0), ("w4a16", 1, 0), ("w4a8kv4", 3, 0), ("w4a4kv8", 3, 1), ("w4a4", 1, 1)],
)
def test_quantize_inserts_r3_only_for_a_quantized_kv_cache(tiny, scheme: str, per_layer: int, out: int) -> None:
    """R3 (Hadamard on Q and K) cancels exactly in Q K^T and only helps when the KV cache is quantized;
    R4 (before down_proj) is always there; the Hadamard before o_proj comes with 4-bit activations."""
    _, path = tiny("llama")
    model = io.load_model(path)
    quantize_model(model, QuantOptions(scheme, group=16))
    layers = len(canonicalize(io.load_model(path)).blocks)
    sizes = [n.overload for n in model.graph if n.op_type == "Hadamard"]
    assert len(sizes) == (per_layer + out) * layers
    head_dim = 16  # the tiny Llama's
    assert sizes.count(f"n{head_dim}") == (per_layer - 1) * layers
    before_o = [before_fake_quant(b.attention.o.input).producer() for b in discover(model).blocks]
    assert sum(is_hadamard(n) for n in before_o) == out * layers
    assert json.loads(model.metadata_props[ROTATION_KEY])["o_hadamard"] == bool(out)


def test_out_hadamard_is_asked_for_or_refused(tiny) -> None:
    _, path = tiny("llama")
    model = io.load_model(path)
    quantize_model(model, QuantOptions("w4a4", group=16, out_hadamard=False))
    assert not any(is_hadamard(before_fake_quant(b.attention.o.input).producer()) for b in discover(model).blocks)
    for bad in ({"rotation": "none"}, {"online": False}):
        with pytest.raises(RotgraphError, match="o_proj"):
            QuantOptions("w4a4", out_hadamard=True, **bad)  # type: ignore[arg-type]


def test_quantize_refuses_a_broken_output_with_the_figures(tiny, tmp_path, monkeypatch) -> None:
    """A quantizer whose scales are off by the grid size (amax instead of amax / qmax) gives finite logits;
    the validation against the float model must refuse it and write nothing. The correct one passes."""
    import rotgraph.passes.quantization.quantize_weights as qw
    from rotgraph.quant import QuantizedWeight
    from rotgraph.quantize import quantize

    _, path = tiny("llama", "dynamo")
    options = QuantOptions(scheme="w4a16", rotation="none", group=16)
    good = quantize(path, tmp_path / "good" / "q.onnx", options)
    assert good.validation is not None and good.validation.kl < good.validation.unrelated_kl

    def wrong_scales(wt: np.ndarray, spec: WeightSpec) -> QuantizedWeight:
        q = quantize_rtn(wt, spec)
        return QuantizedWeight(q.codes, q.scales * spec.qmax, q.zeros, spec)

    monkeypatch.setattr(qw, "quantize_rtn", wrong_scales)
    with pytest.raises(ValidationError, match=r"broken: KL to float .* nats \(unrelated positions: .*\)"):
        quantize(path, tmp_path / "bad" / "q.onnx", options)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.mark.parametrize("fmt", ["rotate", "qdq", "ort"])
def test_outputs_carry_no_unused_initializers(tiny, tmp_path, fmt: str) -> None:
    """Every initializer of a written model is read by a node (onnxruntime warns at every session about
    the ones that are not)."""
    import onnx

    from rotgraph.pipeline import RotateOptions, rotate
    from rotgraph.quantize import quantize

    _, path = tiny("llama", "dynamo", with_past=True)
    out = tmp_path / "out.onnx"
    if fmt == "rotate":
        rotate(path, out, RotateOptions(validate=False))
    else:
        quantize(path, out, QuantOptions(scheme="w4a8", group=16, fmt=fmt), validate=False)
    proto = onnx.load(str(out), load_external_data=False)
    read = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    assert [i.name for i in proto.graph.initializer if i.name not in read] == []


def test_each_rotated_weight_is_computed_once(tiny, tmp_path, monkeypatch) -> None:
    """quantize with GPTQ runs the rotated model (calibration) and then quantizes and saves it: the
    rotation of each weight is computed once, written to the scratch folder and read back from there."""
    from collections import Counter

    from rotgraph.quantize import quantize
    from rotgraph.weights import _Chain

    computed: Counter[str] = Counter()
    evaluate = _Chain.evaluate  # what both the save (the cast tensor) and read_float64 call

    def counting(self: _Chain, *args, **kwargs) -> np.ndarray:
        if self.steps:
            computed[str(self.name)] += 1
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(_Chain, "evaluate", counting)
    _, path = tiny("llama", "dynamo")
    quantize(path, tmp_path / "q.onnx", QuantOptions(scheme="w4a16", weights="gptq", group=16, calibration_windows=2))
    assert computed and max(computed.values()) == 1, computed


def test_the_log_says_which_weights_got_which_bits(tiny, caplog) -> None:
    import logging

    _, path = tiny("llama", "dynamo")
    with caplog.at_level(logging.INFO, logger="rotgraph"):
        quantize_model(io.load_model(path), QuantOptions(scheme="w4a16", rotation="none", group=16))
    assert "quantized 14 projection weights (rtn, 4 bits)" in caplog.text  # 7 per block, 2 blocks
    assert "quantized the embedding and lm_head (rtn, 8 bits)" in caplog.text


def test_calibration_and_statistics_write_nothing_to_the_system_temp_folder(tiny, tmp_path, monkeypatch) -> None:
    """Probes serialize the graph in memory and read the weights where they are; a scratch copy of
    rotated weights goes to the output's staging folder, never to the system temp folder."""
    import tempfile

    from rotgraph.quantize import quantize
    from rotgraph.stats import activation_stats

    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    made: list[str] = []  # temporary folders made in the system temp folder, even if removed again
    mkdtemp = tempfile.mkdtemp

    def recording(suffix=None, prefix=None, dir=None):  # type: ignore[no-untyped-def]
        folder = mkdtemp(suffix, prefix, dir)
        if Path(folder).parent == system_temp:
            made.append(folder)
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    _, path = tiny("llama", "dynamo")
    windows = np.random.default_rng(3).integers(0, 384, size=(2, 32))
    options = QuantOptions(scheme="w4a16", weights="gptq", smooth=0.5, group=16, calibration_windows=2)
    quantize(path, tmp_path / "out" / "q.onnx", options)
    assert len(activation_stats(path, windows)) == 2
    assert made == []
    # torch, imported by the tokenizer's library, makes its compiler cache folder there on import
    assert [f.name for f in system_temp.iterdir() if not f.name.startswith("torchinductor")] == []
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["q.onnx", "q.onnx.data", "tokenizer.json"]


def test_best_clip_is_the_grid_ratio_whose_readers_err_least() -> None:
    """The clip search's choice against a direct computation: per-token symmetric 4-bit quantization
    (scale = ratio * max|x| / 7, codes -8..7) of heavy-tailed rows, error of x @ w relative per token."""
    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=(256, 64)).astype(np.float32)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    y = x.astype(np.float64) @ w

    def error(ratio: float) -> float:
        scale = ratio * np.abs(x).max(-1, keepdims=True) / 7
        x_hat = np.clip(np.round(x / scale), -8, 7) * scale
        return float((((x_hat @ w - y) ** 2).sum(-1) / (y**2).sum(-1)).mean())

    errors = {c: error(c) for c in CLIP_GRID}
    expected = min(errors, key=errors.__getitem__)
    assert best_clip(x, w, ActSpec(4)) == expected
    assert expected < 1.0  # heavy tails: clipping the largest value pays
    assert best_clip(np.ones((8, 64), np.float32), w, ActSpec(4)) == 1.0  # exact at every ratio: the largest


def test_clip_search_gives_each_input_the_ratio_calibrated_for_it(tiny) -> None:
    """`act_clip_search`: the calibration stage finds one ratio of the grid per projection input and each
    input's 4-bit quantizer carries its own (node attribute and function overload); the KV cache keeps
    its 0.95."""
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    data = Calibration(np.random.default_rng(5).integers(0, 384, size=(4, 64)))
    stages = quantize_stages(QuantOptions(scheme="w16a4kv4", act_clip_search=True), data)
    run_passes(model, [p for stage in stages for p in stage.passes])
    blocks = discover(model).blocks
    assert len(data.clips) == 4 * len(blocks) and set(data.clips.values()) <= set(CLIP_GRID)
    for block in blocks:
        a, m = block.attention, block.mlp
        for site, lin in (("qkv", a.q), ("o", a.o), ("gate_up", m.gate), ("down", m.down)):
            node = lin.input.producer()
            assert node is not None and node.op_type == "FakeQuant"
            assert node.attributes["clip"].as_float() == pytest.approx(data.clips[block.index, site])
            assert ActSpec.from_overload(node.overload).clip == data.clips[block.index, site]
    kv = [n for n in model.graph if n.op_type == "FakeQuant" and n.attributes["symmetric"].as_int() == 0]
    assert kv and {round(n.attributes["clip"].as_float(), 2) for n in kv} == {0.95}


def test_asymmetric_activations_give_every_projection_input_a_zero_point(tiny) -> None:
    """`act_asymmetric`: each projection input's per-token quantizer is asymmetric, with its searched clip
    found for that grid; refused where no per-token grid is ours to set."""
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    data = Calibration(np.random.default_rng(5).integers(0, 384, size=(4, 64)))
    options = QuantOptions(scheme="w16a4", act_clip_search=True, act_asymmetric=True)
    run_passes(model, [p for stage in quantize_stages(options, data) for p in stage.passes])
    for block in discover(model).blocks:
        for site, lin in (("qkv", block.attention.q), ("o", block.attention.o), ("down", block.mlp.down)):
            node = lin.input.producer()
            assert node is not None and node.op_type == "FakeQuant"
            spec = ActSpec.from_overload(node.overload)
            assert not spec.symmetric and spec.clip == data.clips[block.index, site]
    for bad in ({"activations": "static"}, {"scheme": "w4a16"}, {"scheme": "w4a8", "fmt": "ort"}):
        with pytest.raises(RotgraphError, match=r"--set activations\.asymmetric=true"):
            QuantOptions(**{"scheme": "w4a4", "activations": "dynamic", "act_asymmetric": True, **bad})  # type: ignore[arg-type]
