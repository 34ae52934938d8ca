"""Layer-wise rotation learning (kurtosis, output error), learned per-channel scaling, and SpinQuant + GPTQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import mean_kl, ort_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.errors import RotgraphError
from rotgraph.learn import LearnOptions, learn
from rotgraph.learning.layerwise import LayerwiseObjective
from rotgraph.passes.rotation.rotate_heads import head_rotations
from rotgraph.passes.rotation.rotate_residual import residual_rotation
from rotgraph.passes.rotation.scale_channels import ScaleChannelsPass
from rotgraph.pipeline import RotateOptions, rotate_model, run_passes
from rotgraph.probe import probe
from rotgraph.rotations import load_rotations, load_scales, save_rotations
from rotgraph.structure import discover

IDS = np.random.default_rng(7).integers(0, 384, size=(4, 32))  # the calibration windows of these tests


def _layerwise_options(**kw: object) -> LearnOptions:
    base: dict = dict(objective="kurtosis", steps=40, seq_len=32, windows=4, site_tokens=96, checkpoint_every=10)
    return LearnOptions(**{**base, **kw})


def _rotated(path: Path, out: Path, rotations: Path | None) -> Path:
    spin = ["--rotation", "learned", "--rotations", str(rotations)] if rotations else []  # the newer name
    assert main(["rotate", str(path), "-o", str(out), *spin]) == 0
    return out


def _norm_output_kurtosis(path: Path, tokens: np.ndarray) -> float:
    """Mean per-token kurtosis of every block's Q and gate inputs, as onnxruntime computes them in the
    rotated graph (numpy, independent of the learner's torch objective)."""
    model = io.load_model(path)
    desc = discover(model)
    values = [v for b in desc.blocks for v in (b.attention.q.input, b.mlp.gate.input)]
    ks = []
    for p in probe(model, values, tokens):
        y = np.asarray(p.array, np.float64).reshape(-1, p.array.shape[-1])
        ks.append(((y**4).mean(-1) / (y**2).mean(-1) ** 2).mean())
    return float(np.mean(ks))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kurtosis", "output-error"])
def test_layerwise_learner_is_orthogonal_exact_and_beats_hadamard(tiny, tokens, tmp_path, objective) -> None:
    _, path = tiny("llama", "dynamo")
    learned = tmp_path / "k.safetensors"
    options = _layerwise_options(scheme="w4a4kv4", objective=objective, group=16)
    report = learn(path, learned, options, token_windows=IDS, progress=False)
    r1, r2 = load_rotations(learned)
    assert report.orthogonality_error < 1e-6
    assert np.abs(r1.T @ r1 - np.eye(r1.shape[0])).max() < 1e-6
    assert all(np.abs(h.T @ h - np.eye(h.shape[0])).max() < 1e-6 for h in r2)
    assert np.abs(r1 - residual_rotation(48, 0)[0]).max() > 1e-3  # it moved from the Hadamard start

    reference = ort_logits(path, tokens)
    quarot = _rotated(path, tmp_path / "quarot" / "model.onnx", None)
    ours = _rotated(path, tmp_path / "learned" / "model.onnx", learned)
    np.testing.assert_allclose(ort_logits(ours, tokens), reference, atol=1e-4 * np.abs(reference).max())
    if objective == "kurtosis":  # measured on the folded graphs on the calibration windows
        assert _norm_output_kurtosis(ours, IDS) < _norm_output_kurtosis(quarot, IDS) - 0.1

    kl = {}
    for name, extra in (("quarot", []), ("learned", ["--rotation", "spinquant", "--rotations", str(learned)])):
        out = tmp_path / f"q-{name}" / "model.onnx"
        argv = [
            "quantize",
            str(path),
            "-o",
            str(out),
            "--scheme",
            "w4a4kv4",
            "--group",
            "16",
            "--no-validate",
            "--recipe",
            "plain",
            "--activations",
            "dynamic",  # the per-token quantizers the learners learn against
        ]
        # the learners model R3/R4, not the Hadamard before o_proj that quantize adds at 4-bit activations
        assert main([*argv, "--set", "rotation.out_hadamard=false", *extra]) == 0
        kl[name] = mean_kl(reference, ort_logits(out, tokens))
    assert kl["learned"] < kl["quarot"], kl  # on the planted-outlier model, at 4-bit activations and KV


def test_kurtosis_objective_decreases_under_cayley_sgd(tiny) -> None:
    """The layer-wise loss along the learner's own steps, recomputed from the returned rotations."""
    from rotgraph.learning.layerwise import collect
    from rotgraph.learning.stiefel import CayleySGD

    _, path = tiny("qwen2", "dynamo")
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        desc, layers = collect(io.load_model(path), IDS, 64, 0, Path(scratch))
    obj = LayerwiseObjective(desc, layers, seed=0, scaling=False)
    opt = CayleySGD([obj.r1, *obj.r2], lr=1.0)
    with torch.no_grad():
        start = float(obj.rotation_loss())
    for _ in range(15):
        opt.zero_grad()
        obj.rotation_loss().backward()
        opt.step()
    with torch.no_grad():
        end = float(obj.rotation_loss())
    # the Hadamard start's kurtosis from scratch, in numpy: the objective is what the module says
    x = np.concatenate([np.concatenate([s.attn.numpy(), s.mlp.numpy()]) for s in layers]).astype(np.float64)
    y = x @ residual_rotation(desc.hidden_size, 0)[0]
    k = ((y**4).mean(-1) / (y**2).mean(-1) ** 2).mean()
    for s, (h, _) in zip(layers, head_rotations(16, len(layers), 0), strict=True):
        v = s.v.numpy().astype(np.float64) @ h
        k += ((v**4).mean(-1) / (v**2).mean(-1) ** 2).mean() / len(layers)
    assert start == pytest.approx(k, rel=1e-4)
    assert end < start - 0.1


def _rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Symmetric RTN of w [in, out] in groups of `group` input rows, in numpy."""
    g = w.T.reshape(-1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(-1, keepdims=True) / qmax
    return (np.clip(np.round(g / scale), -qmax - 1, qmax) * scale).reshape(w.shape[1], -1).T


@pytest.mark.parametrize(
    ("deployed", "center"),
    [(False, False), (True, False), (False, True)],
    ids=["quarot-quantizers", "asymmetric-out-hadamard", "centered"],
)
def test_output_error_objective_is_the_quantized_layers_error_and_decreases(tiny, deployed: bool, center: bool) -> None:
    """At the Hadamard start the objective equals the quantized layers' relative output error computed
    in numpy (per-token 4-bit activations, a 4-bit KV cache, 4-bit RTN weights); Cayley SGD lowers it.
    `deployed`: asymmetric activations, and O reading its input through the Hadamard before o_proj
    (64 wide here: a Sylvester matrix built in the test). `center`: each quantized input's mean subtracted
    before its quantizer and added back through the float weight."""
    from rotgraph.fakequant import ActSpec
    from rotgraph.learning.layerwise import collect
    from rotgraph.learning.quantizers import Quantizers
    from rotgraph.learning.stiefel import CayleySGD

    # grouped-query attention: O reads each KV head 3 (2) times
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2} if deployed else {}
    _, path = tiny("qwen2", "dynamo", **config)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        desc, layers = collect(io.load_model(path), IDS, 64, 0, Path(scratch))
    act, kv = ActSpec(4, not deployed, 0, 0.9), ActSpec(4, False, 0, 0.95)
    sylvester = np.ones((1, 1))
    while deployed and len(sylvester) < 64:
        sylvester = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), sylvester)
    out_h = sylvester / np.sqrt(len(sylvester))
    quant = Quantizers(act, kv, 4, 16, torch.from_numpy(out_h.astype(np.float32)) if deployed else None)
    obj = LayerwiseObjective(
        desc, layers, seed=0, scaling=False, objective="output-error", quantizers=quant, center=center
    )
    with torch.no_grad():
        start = float(obj.rotation_loss(0))

    def err(y_hat: np.ndarray, y: np.ndarray) -> float:
        return float((((y_hat - y) ** 2).sum(-1) / (y**2).sum(-1)).mean())  # per token, then the mean

    r1 = residual_rotation(desc.hidden_size, 0)[0]
    a = desc.blocks[0].attention
    heads, kv_heads, d = a.num_heads, a.num_kv_heads, a.head_dim
    expected = 0.0
    for s, (h, _) in zip(layers, head_rotations(d, len(layers), 0), strict=True):
        for site in ("attn", "mlp"):  # every column: a tiny layer is narrower than one draw
            x, w = getattr(s, site).numpy().astype(np.float64), s.weights[site].numpy().astype(np.float64)
            m = x.mean(0) if center else np.zeros(x.shape[1])
            y_hat = act.reference((x - m) @ r1) @ _rtn(r1.T @ w, 4, 16) + m @ w
            expected += err(y_hat, x @ w) / (2 * len(layers))
        v = s.v.numpy().astype(np.float64)
        o = s.weights["o"].numpy().astype(np.float64)
        vq = kv.reference(v @ h)
        z, y = (np.repeat(t, heads // kv_heads, axis=1).reshape(len(v), -1) for t in (vq, v))
        o_rotated = np.einsum("ji,hjo->hio", h, o.reshape(heads, d, -1)).reshape(heads * d, -1)
        m = z.mean(0) if center else np.zeros(z.shape[1])
        shift = m @ o_rotated
        if deployed:
            z, o_rotated = z @ out_h, out_h.T @ o_rotated
            m = m @ out_h
        expected += err(act.reference(z - m) @ _rtn(o_rotated, 4, 16) + shift, y @ o) / len(layers)
    assert start == pytest.approx(expected, rel=1e-3)

    opt = CayleySGD([obj.r1, *obj.r2], lr=20.0)
    for step in range(15):
        opt.zero_grad()
        obj.rotation_loss(step).backward()
        opt.step()
    with torch.no_grad():
        assert float(obj.rotation_loss(0)) < 0.9 * start


def test_scales_learn_against_the_scaled_layers_output_error(tiny) -> None:
    """Objective "output-error" with scaling: at random scales the scales' objective equals the numpy
    error of the scaled quantized layers (activations divided by s, weight rows multiplied, O's rows per
    query head under GQA); Adam on log s lowers it from s = 1."""
    from rotgraph.fakequant import ActSpec
    from rotgraph.learning.layerwise import collect
    from rotgraph.learning.quantizers import Quantizers

    _, path = tiny("qwen2", "dynamo")
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        desc, layers = collect(io.load_model(path), IDS, 64, 0, Path(scratch))
    act, kv = ActSpec(4, True, 0, 0.9), ActSpec(4, False, 0, 0.95)
    obj = LayerwiseObjective(desc, layers, 0, True, "output-error", Quantizers(act, kv, 4, 16))
    rng = np.random.default_rng(4)
    with torch.no_grad():
        for p in obj.log_s.values():
            p.copy_(torch.from_numpy(rng.normal(scale=0.5, size=p.shape)))
        got = float(obj.scale_loss(0))

    def err(y_hat: np.ndarray, y: np.ndarray) -> float:
        return float((((y_hat - y) ** 2).sum(-1) / (y**2).sum(-1)).mean())

    r1 = residual_rotation(desc.hidden_size, 0)[0]
    a = desc.blocks[0].attention
    heads, kv_heads, d = a.num_heads, a.num_kv_heads, a.head_dim
    expected = 0.0
    for i, (x, (h, _)) in enumerate(zip(layers, head_rotations(d, len(layers), 0), strict=True)):
        for site in ("attn", "mlp"):
            s = np.exp(obj.log_s[f"{site}{i}"].detach().numpy())
            xs, w = getattr(x, site).numpy().astype(np.float64), x.weights[site].numpy().astype(np.float64)
            y_hat = act.reference(xs @ r1 / s) @ _rtn(s[:, None] * (r1.T @ w), 4, 16)
            expected += err(y_hat, xs @ w) / (3 * len(layers))
        s = np.exp(obj.log_s[f"v{i}"].detach().numpy()).reshape(kv_heads, d)
        v = x.v.numpy().astype(np.float64)
        o = x.weights["o"].numpy().astype(np.float64)
        vq = kv.reference(v @ h / s)
        z, y = (np.repeat(t, heads // kv_heads, axis=1).reshape(len(v), -1) for t in (vq, v))
        o_rotated = np.einsum("ji,hjo->hio", h, o.reshape(heads, d, -1))
        o_scaled = (np.repeat(s, heads // kv_heads, axis=0)[:, :, None] * o_rotated).reshape(heads * d, -1)
        expected += err(act.reference(z) @ _rtn(o_scaled, 4, 16), y @ o) / (3 * len(layers))
    assert got == pytest.approx(expected, rel=1e-3)

    with torch.no_grad():
        for p in obj.log_s.values():
            p.zero_()
        start = float(obj.scale_loss(0))
    opt = torch.optim.Adam(obj.log_s.parameters(), lr=0.05)
    for step in range(30):
        opt.zero_grad()
        obj.scale_loss(step).backward()
        opt.step()
    with torch.no_grad():
        assert float(obj.scale_loss(0)) < 0.95 * start


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_scaling_folds_exactly(tiny, tokens, tmp_path, model_type) -> None:
    """Random scales far from 1 at every site (norm outputs, V per KV head under GQA), after R1/R2: the
    float graph's function is unchanged."""
    _, path = tiny(model_type, "dynamo")
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=1))
    desc = discover(model)
    rng = np.random.default_rng(3)
    a = desc.blocks[0].attention
    scales = {}
    for b in desc.blocks:
        scales[b.index, "attn"] = np.exp(rng.normal(size=desc.hidden_size))
        scales[b.index, "mlp"] = np.exp(rng.normal(size=desc.hidden_size))
        scales[b.index, "v"] = np.exp(rng.normal(size=a.num_kv_heads * a.head_dim))
    run_passes(model, [ScaleChannelsPass(scales)])
    out = tmp_path / "scaled.onnx"
    io.save_model(model, out)
    reference = ort_logits(path, tokens)
    np.testing.assert_allclose(ort_logits(out, tokens), reference, atol=1e-4 * np.abs(reference).max())


def test_learned_scaling_folds_through_the_rotation_file(tiny, tokens, tmp_path) -> None:
    _, path = tiny("qwen2", "dynamo")
    learned = tmp_path / "s.safetensors"
    learn(path, learned, _layerwise_options(steps=10, scaling=True), token_windows=IDS, progress=False)
    scales = load_scales(learned)
    assert len(scales) == 3 * 2 and all((s > 0).all() for s in scales.values())
    assert max(np.abs(np.log(s)).max() for s in scales.values()) > 1e-3  # learned, not the ones they start at
    rotated = _rotated(path, tmp_path / "r" / "model.onnx", learned)
    reference = ort_logits(path, tokens)
    np.testing.assert_allclose(ort_logits(rotated, tokens), reference, atol=1e-4 * np.abs(reference).max())


def test_bad_scales_are_refused(tmp_path) -> None:
    eye = {"R1": torch.eye(8, dtype=torch.float64), "R2.0": torch.eye(4, dtype=torch.float64)}
    path = tmp_path / "r.safetensors"
    save_rotations(path, {**eye, "S.attn.0": -torch.ones(8, dtype=torch.float64)}, {})
    with pytest.raises(RotgraphError, match="positive"):
        load_scales(path)
    save_rotations(path, {**eye, "S.foo.0": torch.ones(8, dtype=torch.float64)}, {})
    with pytest.raises(RotgraphError, match="unexpected scale tensor"):
        load_scales(path)
    assert load_rotations(path)[0].shape == (8, 8)  # the rotations themselves still read


def test_scaling_needs_a_layerwise_objective() -> None:
    with pytest.raises(RotgraphError, match="layer-wise"):
        LearnOptions(scaling=True)
    with pytest.raises(RotgraphError, match="objective"):
        LearnOptions(objective="magic")


@pytest.mark.parametrize(
    "options",
    [{"objective": "end-to-end"}, {"objective": "kurtosis"}, {"scaling": True}, {"scheme": "w4a16"}],
    ids=["end-to-end", "kurtosis", "scaling", "float-activations"],
)
def test_centered_inputs_need_the_output_error_objective(options: dict) -> None:
    with pytest.raises(RotgraphError, match="--center-activations"):
        LearnOptions(center_activations=True, **({"objective": "output-error"} | options))


def test_layerwise_resume_reproduces_an_uninterrupted_run(tiny, tmp_path, monkeypatch) -> None:
    _, path = tiny("llama", "dynamo")
    options = _layerwise_options(steps=5, scaling=True, checkpoint_every=2)
    full, resumed = tmp_path / "full.safetensors", tmp_path / "resumed.safetensors"
    learn(path, full, options, token_windows=IDS, progress=False)
    calls = {"n": 0}
    original = LayerwiseObjective.scale_loss

    def interrupted(self, step):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # the 8th step: after the checkpoint of step 6 (5 rotation steps, then scales)
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(LayerwiseObjective, "scale_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        learn(path, resumed, options, token_windows=IDS, progress=False)
    checkpoint = tmp_path / "resumed.safetensors.ckpt"
    assert not resumed.exists() and torch.load(checkpoint, weights_only=True)["step"] == 6
    monkeypatch.setattr(LayerwiseObjective, "scale_loss", original)
    learn(path, resumed, options, token_windows=IDS, resume=True, progress=False)
    assert not checkpoint.exists()
    a, b = load_rotations(full), load_rotations(resumed)
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)
    sa, sb = load_scales(full), load_scales(resumed)
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_spinquant_with_float_weights_then_gptq(tiny, tokens, tmp_path) -> None:
    """learn --scheme w16a4kv4 (float weights, quantized activations and KV cache), then quantize the
    folded model with GPTQ weights: the paper's recipe, end to end on the tiny model."""
    _, path = tiny("llama", "dynamo")
    rotations = tmp_path / "r.safetensors"
    options = LearnOptions(scheme="w16a4kv4", steps=4, lr=5.0, batch=2, seq_len=32, windows=4, group=16)
    learn(path, rotations, options, token_windows=IDS, progress=False)
    r1, _ = load_rotations(rotations)
    assert np.abs(r1 - residual_rotation(48, 0)[0]).max() > 1e-3
    text = tmp_path / "text.txt"
    from rotgraph.testing import SAMPLE_TEXT

    text.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    reference = ort_logits(path, tokens)
    kl = {}
    for name, extra in (
        ("none", ["--rotation", "none"]),
        ("learned", ["--rotation", "spinquant", "--rotations", str(rotations)]),
    ):
        out = tmp_path / name / "model.onnx"
        argv = [
            "quantize",
            str(path),
            "-o",
            str(out),
            "--scheme",
            "w4a4kv4",
            "--group",
            "16",
            "--weights",
            "gptq",
            "--recipe",
            "plain",
        ]
        argv += [
            "--set",
            "calibration.windows=2",
            "--text",
            str(text),
            "--activations",
            "dynamic",
            *extra,
        ]  # as learned
        assert main(argv) == 0
        kl[name] = mean_kl(reference, ort_logits(out, tokens))
    assert kl["learned"] < kl["none"], kl
