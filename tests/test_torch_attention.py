"""The torch evaluator on fused-attention graphs (rotgraph.learning.torch_attention), against onnxruntime
with its optimizations off, and `rotgraph learn` on graphs as exporters leave them (KV cache inputs, mask,
positions, fused attention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_inputs import ROWS, export_with_mask

from rotgraph import io
from rotgraph.evaluate import make_session
from rotgraph.export import export
from rotgraph.inputs import input_roles
from rotgraph.learn import LearnOptions, learn
from rotgraph.learning.end_to_end import RotatedNetwork, learning_graph
from rotgraph.learning.torch_graph import TorchGraph
from rotgraph.options import Scheme
from rotgraph.passes.canonical.split_rotary import SplitRotaryPass
from rotgraph.pipeline import foldable_form_passes, run_passes
from rotgraph.rotations import load_rotations
from rotgraph.testing import make_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


def torch_run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    graph = TorchGraph(model)
    with torch.no_grad():
        out = graph({k: torch.from_numpy(v) for k, v in feeds.items()})
    return {v.name: t.numpy() for v, t in zip(model.graph.outputs, out, strict=True)}


def check_against_onnxruntime(path: Path, split_rotary: bool = False) -> None:
    """A padded prefill (on the side the graph takes) at each row's real positions, then one decode step
    after an unpadded prefill fed its present cache: the torch evaluator on the graph's foldable form (the
    form `learn` runs) gives onnxruntime's logits and presents on the file."""
    model = io.load_model(path)
    run_passes(model, [SplitRotaryPass(), *foldable_form_passes()] if split_rotary else foldable_form_passes())
    session = make_session(path, "disable")
    roles = session.roles
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(3)
    tokens, mask = roles.pad([rng.integers(3, 384, n) for n in ROWS])
    feeds = roles.feeds(tokens, mask)
    reference = dict(zip(names, session.run(None, feeds), strict=True))
    ours = torch_run(model, feeds)
    real = mask.astype(bool)
    scale = np.abs(reference[names[0]]).max()
    np.testing.assert_allclose(ours[names[0]][real], reference[names[0]][real], atol=1e-5 * scale)

    tokens = rng.integers(3, 384, (2, 6))
    prefill = dict(zip(names, session.run(None, roles.feeds(tokens)), strict=True))
    step = roles.feeds(rng.integers(3, 384, (2, 1)), past=roles.next_past(prefill))
    reference = dict(zip(names, session.run(None, step), strict=True))
    ours = torch_run(model, step)
    for name in names:
        np.testing.assert_allclose(ours[name], reference[name], atol=1e-5 * np.abs(reference[name]).max())


@pytest.mark.parametrize("fixture", ["genai-llama-fp32", "genai-qwen2-fp32", "optimum-llama"])
def test_exporter_graphs_run_in_torch_as_in_onnxruntime(fixture: str) -> None:
    """The builder's GroupQueryAttention with packed QKV and RoPE inside (right-padded rows, Qwen2 with
    its packed bias), optimum's plain graph with mask, positions and cache."""
    check_against_onnxruntime(FIXTURES / fixture / "model.onnx")


def test_builder_graph_with_rope_moved_out_runs_in_torch_as_in_onnxruntime() -> None:
    """com.microsoft RotaryEmbedding on [batch, heads, seq, head_dim], positions from seqlens_k, then
    GroupQueryAttention with do_rotary=0 (SplitRotaryPass: what learning at a kv scheme runs)."""
    check_against_onnxruntime(FIXTURES / "genai-llama-fp32" / "model.onnx", split_rotary=True)


@pytest.mark.slow
def test_fused_graphs_of_other_tools_run_in_torch_as_in_onnxruntime(tmp_path) -> None:
    """onnxscript's MultiHeadAttention fusion (the mask as attention_bias, cache outside), onnxruntime's
    transformer optimizer (com.microsoft RotaryEmbedding on [batch, seq, hidden]) and torch's opset-23
    export (ONNX Attention and RotaryEmbedding)."""
    from onnxruntime.transformers.optimizer import optimize_model
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    folder = make_tiny_model(tmp_path / "hf", "llama")
    source = export_with_mask(folder, tmp_path / "source" / "model.onnx")
    fused, _ = optimize_for_ort(io.load_model(source))
    assert sum(n.op_type == "MultiHeadAttention" for n in fused.graph) == 2
    io.save_model(fused, tmp_path / "mha.onnx")
    check_against_onnxruntime(tmp_path / "mha.onnx")

    optimized = optimize_model(
        str(FIXTURES / "optimum-llama" / "model.onnx"), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0
    )
    assert "RotaryEmbedding" in {n.op_type for n in optimized.model.graph.node}
    optimized.save_model_to_file(str(tmp_path / "optimized.onnx"))
    check_against_onnxruntime(tmp_path / "optimized.onnx")

    opset23 = export_with_mask(folder, tmp_path / "attention" / "model.onnx", attention="sdpa", opset=23)
    assert sum(n.op_type == "Attention" for n in io.load_model(opset23).graph) == 2
    check_against_onnxruntime(opset23)


def _first_loss(path: Path, scheme: str, ids: np.ndarray) -> float:
    model = io.load_model(path)
    learning_graph(model, Scheme.parse(scheme))
    net = RotatedNetwork(model, Scheme.parse(scheme), group=16, head_bits=16, seed=0)
    with torch.no_grad():
        return float(net.loss(torch.from_numpy(ids)))


@pytest.mark.parametrize("fixture", ["optimum-llama", "genai-llama-fp32"])
def test_learning_on_exporter_graphs_sees_the_network_of_the_plain_export(fixture: str, tmp_path) -> None:
    """The learning network of optimum's graph (cache, mask and positions fed as for a first prompt) and of
    the builder's (fused attention, RoPE moved out for the kv scheme) at the starting rotations has the loss
    of rotgraph's own export of the same Hugging Face folder; and `learn` writes orthogonal rotations."""
    plain = tmp_path / "plain" / "model.onnx"
    export(str(FIXTURES / "hf-llama"), plain)
    ids = np.random.default_rng(5).integers(3, 384, (2, 24))
    source = FIXTURES / fixture / "model.onnx"
    expected = _first_loss(plain, "w4a8kv4", ids)
    assert _first_loss(source, "w4a8kv4", ids) == pytest.approx(expected, rel=1e-3)
    options = LearnOptions(scheme="w4a8kv4", steps=2, lr=1.0, batch=2, seq_len=24, windows=2, group=16)
    report = learn(source, tmp_path / "r.safetensors", options, token_windows=ids, progress=False)
    assert report.orthogonality_error < 1e-10
    r1, r2 = load_rotations(tmp_path / "r.safetensors")
    assert r1.shape == (64, 64) and len(r2) == 2


def test_input_roles_of_the_learning_graph_are_the_source_graphs() -> None:
    """learning_graph inserts FakeQuant on the keys and values instead of storing the cache as codes, so the
    learning network is fed the source graph's inputs."""
    path = FIXTURES / "optimum-llama" / "model.onnx"
    model = io.load_model(path)
    before = input_roles(model)
    learning_graph(model, Scheme.parse("w4a4kv4"))
    assert input_roles(model) == before
