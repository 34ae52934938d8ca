"""Projection inputs centered on their calibrated mean before the activation quantizers
(`CenterActivationsPass`), the mean added back as a bias."""

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
from rotgraph.passes.calibration.center_activations import CenterActivationsPass
from rotgraph.pipeline import canonicalize
from rotgraph.quantize import QuantOptions
from rotgraph.structure import discover, is_constant_shift
from rotgraph.weights import read_float64


def hf_input_means(folder: Path, windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per layer, the mean over windows and positions of what the Hugging Face model's q_proj, o_proj,
    gate_proj and down_proj read."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    found: list[dict[str, np.ndarray]] = [{} for _ in model.model.layers]

    def hook(i: int, site: str):  # type: ignore[no-untyped-def]
        def record(module, args):  # type: ignore[no-untyped-def]
            x = args[0].double()
            found[i][site] = x.reshape(-1, x.shape[-1]).mean(0).numpy()

        return record

    for i, layer in enumerate(model.model.layers):
        for site, module in (
            ("qkv", layer.self_attn.q_proj),
            ("o", layer.self_attn.o_proj),
            ("gate_up", layer.mlp.gate_proj),
            ("down", layer.mlp.down_proj),
        ):
            module.register_forward_pre_hook(hook(i, site))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(windows))
    return found


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_input_means_are_the_models_and_leave_the_float_graph_exact(tiny, tokens, tmp_path, model_type: str) -> None:
    folder, path = tiny(model_type)
    windows = np.random.default_rng(3).integers(0, 384, size=(3, 20))
    model = io.load_model(path)
    canonicalize(model)
    CenterActivationsPass(windows).call(model)
    want = hf_input_means(folder, windows)
    blocks = discover(model).blocks  # the shifts are transparent to discovery
    assert len(blocks) == len(want)
    for block, means in zip(blocks, want, strict=True):
        a, m = block.attention, block.mlp
        for site, readers in (("qkv", [a.q, a.k, a.v]), ("o", [a.o]), ("gate_up", [m.gate, m.up]), ("down", [m.down])):
            shift = readers[0].input.producer()
            assert is_constant_shift(shift)
            assert all(lin.input is readers[0].input and lin.bias is not None for lin in readers)
            found = read_float64(shift.inputs[1])  # type: ignore[union-attr, arg-type]
            np.testing.assert_allclose(found, means[site], atol=1e-5 * np.abs(means[site]).max())
    with pytest.raises(StructureError, match="already subtracted"):
        CenterActivationsPass(windows).call(model)
    centered = tmp_path / "centered.onnx"
    io.save_model(model, centered)
    reference = ort_logits(path, tokens)
    np.testing.assert_allclose(ort_logits(centered, tokens), reference, atol=1e-4 * np.abs(reference).max())


def test_centered_inputs_quantize_better_when_tokens_share_a_direction(tmp_path) -> None:
    """Every token's embedding moved by one vector: after RMSNorm (and the rotation) the projection inputs
    share a direction that a per-token 4-bit grid spends its range on; centered, the same quantizers are
    closer to float."""

    def shared_direction(model) -> None:  # type: ignore[no-untyped-def]
        table = model.model.embed_tokens.weight
        table.add_(3.0 * table.std() * torch.randn(table.shape[1], generator=torch.Generator().manual_seed(0)))

    path = edited_export(tmp_path, "llama", 7, shared_direction)
    plain, centered = kl_without_and_with(path, tmp_path, "w16a4", "activations.center=true")
    assert centered < 0.8 * plain, (plain, centered)  # 3.6e-5 -> 1.2e-6 when written


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_quantized_graphs_keep_one_shift_per_input_and_agree_across_formats(tiny, tokens, tmp_path, fmt: str) -> None:
    """w4a4kv4 with GPTQ and the clip search over centered inputs; in the ort format the shifts survive
    its passes and the graph computes what the qdq one does."""
    _, plain = tiny("llama")
    argv = ["--scheme", "w4a4kv4", "--group", "16", "--activations", "dynamic", "--set", "activations.center=true"]
    argv += [
        "--weights",
        "gptq",
        "--set",
        "activations.clip=search",
        "--set",
        "calibration.windows=2",
        "--recipe",
        "plain",
    ]
    outs = {f: tmp_path / f / "model.onnx" for f in ("qdq", fmt)}
    for f, out in outs.items():
        assert main(["quantize", str(plain), "-o", str(out), *argv, "--format", f]) == 0
    graph = io.load_model(outs[fmt]).graph
    shifts = [n for n in graph if is_constant_shift(n) and n.inputs[1].name.endswith(".mean")]  # type: ignore[union-attr]
    assert len(shifts) == 4 * 2
    reference = ort_logits(outs["qdq"], tokens)
    np.testing.assert_allclose(ort_logits(outs[fmt], tokens), reference, atol=2e-2 * np.abs(reference).max())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scheme": "w4a16"}, "needs quantized dynamic activations"),
        ({"scheme": "w4a8", "activations": "static"}, "needs quantized dynamic activations"),
    ],
)
def test_center_activations_is_refused_where_it_cannot_apply(options: dict, message: str) -> None:
    with pytest.raises(RotgraphError, match=message):
        QuantOptions(center_activations=True, **options)


def test_biased_gate_and_up_pack_into_one_projection(tiny, tokens, tmp_path) -> None:
    """The biases centering adds to gate and up do not keep them apart in the ort format: packed, the
    MLP computes what the two projections did."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from rotgraph.passes.ort.pack_gate_up import PackGateUpPass
    from rotgraph.quantize import quantize_model

    _, path = tiny("llama")
    options = QuantOptions(scheme="w4a4", group=16, fmt="ort", deployment_fusion=False, center_activations=True)
    model = io.load_model(path)
    quantize_model(model, options, np.random.default_rng(5).integers(0, 384, size=(2, 20)))
    paths = {}
    for name in ("apart", "packed"):
        if name == "packed":
            assert PackGateUpPass()(model).modified
            RemoveUnusedNodesPass()(model)
        paths[name] = tmp_path / name / "model.onnx"
        paths[name].parent.mkdir()
        io.save_model(model, paths[name])
    ops = [n.op_type for n in io.load_model(paths["packed"]).graph]
    assert ops.count("Split") == 2 and ops.count("MatMulNBits") == 6 * 2 + 1  # q, k, v, o, gate-up, down; lm_head
    reference = ort_logits(paths["apart"], tokens)
    np.testing.assert_allclose(ort_logits(paths["packed"], tokens), reference, atol=1e-4 * np.abs(reference).max())
