from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from rotgraph import io
from rotgraph.errors import StructureError
from rotgraph.pipeline import canonicalize
from rotgraph.structure import discover, r1_readers, r1_writers, r2_pairs, rotate_head_columns, rotate_head_rows
from rotgraph.structure.summary import summary


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_discovers_tiny_models(tiny, exporter: str, model_type: str) -> None:
    _, path = tiny(model_type, exporter)
    desc = canonicalize(io.load_model(path))
    assert len(desc.blocks) == 2
    assert (desc.hidden_size, desc.vocab_size) == (48, 384)
    attn = desc.blocks[0].attention
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (3, 1, 16)
    assert attn.q.shape == (48, 48) and attn.k.shape == (48, 16) and attn.v.shape == (48, 16)
    assert attn.q_rope is not None and attn.k_rope is not None
    assert desc.blocks[0].mlp.gate.shape == (48, 96) and desc.blocks[0].mlp.down.shape == (96, 48)
    assert (attn.v.bias is not None) == (model_type == "qwen2")
    assert len(desc.norms()) == 5
    # the dynamo exporter ties lm_head through a Transpose, TorchScript stores a transposed copy
    assert desc.lm_head_tied == (exporter == "dynamo")


def test_gate_and_up_are_told_apart_by_data_flow(tiny) -> None:
    _folder, path = tiny("llama", "dynamo")
    desc = canonicalize(io.load_model(path))
    mlp = desc.blocks[1].mlp
    # gate feeds the activation (Sigmoid for SiLU), up feeds the gating Mul directly
    assert any(c.op_type == "Sigmoid" for c in mlp.gate.output.consumers())
    assert not any(c.op_type == "Sigmoid" for c in mlp.up.output.consumers())


def test_head_dim_other_than_hidden_over_heads(tiny) -> None:
    _, path = tiny("llama", "dynamo", head_dim=24, num_attention_heads=4, num_key_value_heads=2)
    attn = canonicalize(io.load_model(path)).blocks[0].attention
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 24)
    assert attn.q.shape == (48, 96) and attn.o.shape == (96, 48)


def test_names_do_not_matter(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    rng = np.random.default_rng(0)
    for i, node in enumerate(model.graph):
        node.name = f"n{rng.integers(1 << 30)}_{i}"
        for j, out in enumerate(node.outputs):
            if not out.is_graph_output():
                out.name = f"v{rng.integers(1 << 30)}_{i}_{j}"
    inits = list(model.graph.initializers.values())
    model.graph.initializers.clear()
    for i, init in enumerate(inits):
        init.name = f"w{i}"
        model.graph.register_initializer(init)
    assert len(canonicalize(model).blocks) == 2


def test_decomposed_norm_gives_a_hint(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    with pytest.raises(StructureError, match="CanonicalizeNormsPass"):
        discover(io.load_model(path))


def test_missing_norm_says_where(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    desc = canonicalize(model)
    norm = desc.blocks[1].mlp_norm.node
    norm.outputs[0].replace_all_uses_with(norm.inputs[0])  # a block without its MLP norm
    model.graph.remove(norm, safe=True)
    with pytest.raises(StructureError, match="block 1"):
        discover(model)


def test_layernorm_model_is_rejected(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    canonicalize(model)
    for node in model.graph:
        if node.op_type == "RMSNormalization":
            node.op_type = "LayerNormalization"
    with pytest.raises(StructureError, match="found 5 LayerNormalization nodes"):
        discover(model)


def test_summary_names_what_was_found(tiny) -> None:
    _, path = tiny("qwen2", "dynamo")
    text = summary(canonicalize(io.load_model(path)))
    assert "2 blocks" in text and "grouped-query" in text and "biases: yes" in text


def _weight_matmuls(model: ir.Model) -> set[int]:
    """MatMul nodes by a weight (an initializer, or a Transpose of one: a tied lm_head), found without
    the structure module."""
    out = set()
    for node in model.graph:
        weight = node.inputs[1] if node.op_type == "MatMul" else None
        producer = weight.producer() if weight is not None else None
        source = producer.inputs[0] if producer is not None and producer.op_type == "Transpose" else weight
        if source is not None and source.is_initializer():
            out.add(id(node))
    return out


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_fold_sites_cover_every_linear_once(tiny, exporter: str, model_type: str) -> None:
    """R1 reads or writes every weight MatMul of the graph exactly once; R2 pairs each layer's V and O."""
    _, path = tiny(model_type, exporter)
    model = io.load_model(path)
    desc = canonicalize(model)
    sites = [id(lin.node) for lin in [*r1_readers(desc), *r1_writers(desc)]]
    assert len(sites) == len(set(sites)) == 7 * len(desc.blocks) + 1
    assert set(sites) == {id(lin.node) for lin in desc.linears()} == _weight_matmuls(model)
    readers = {id(lin.node) for lin in r1_readers(desc)}
    for block in desc.blocks:  # readers take the residual stream in, writers add to it
        a, m = block.attention, block.mlp
        assert {id(lin.node) for lin in (a.q, a.k, a.v, m.gate, m.up)} <= readers
        assert id(a.o.node) not in readers and id(m.down.node) not in readers
    assert id(desc.lm_head.node) in readers
    pairs = r2_pairs(desc)
    assert [p.layer for p in pairs] == [b.index for b in desc.blocks]
    for pair, block in zip(pairs, desc.blocks, strict=True):
        assert pair.v is block.attention.v and pair.o is block.attention.o
        assert (pair.num_heads, pair.num_kv_heads, pair.head_dim, pair.group) == (3, 1, 16, 3)
        assert pair.v.shape[1] == pair.num_kv_heads * pair.head_dim
        assert pair.o.shape[0] == pair.num_heads * pair.head_dim


def test_head_rotations_act_per_head_on_numpy_and_torch() -> None:
    """V's columns and O's rows are rotated head by head, the same way in float64 numpy and in torch."""
    import torch

    rng = np.random.default_rng(5)
    d, kv_heads, heads = 4, 2, 6
    h = np.linalg.qr(rng.normal(size=(d, d)))[0]
    w_v, b_v, w_o = rng.normal(size=(8, kv_heads * d)), rng.normal(size=kv_heads * d), rng.normal(size=(heads * d, 8))
    cols = [slice(g * d, (g + 1) * d) for g in range(kv_heads)]
    rows = [slice(i * d, (i + 1) * d) for i in range(heads)]
    np.testing.assert_allclose(rotate_head_columns(w_v, h), np.hstack([w_v[:, c] @ h for c in cols]), atol=1e-12)
    np.testing.assert_allclose(rotate_head_columns(b_v, h), np.hstack([b_v[c] @ h for c in cols]), atol=1e-12)
    np.testing.assert_allclose(rotate_head_rows(w_o, h), np.vstack([h.T @ w_o[r] for r in rows]), atol=1e-12)
    t = torch.from_numpy
    np.testing.assert_allclose(rotate_head_columns(t(w_v), t(h)).numpy(), rotate_head_columns(w_v, h), atol=1e-12)
    np.testing.assert_allclose(rotate_head_rows(t(w_o), t(h)).numpy(), rotate_head_rows(w_o, h), atol=1e-12)


def test_corrupt_file_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(Exception, match="not a readable ONNX model"):
        io.load_model(bad)
    assert ir  # onnx_ir is the graph IR under test
