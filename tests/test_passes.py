"""Each pass alone, and the whole pipeline, against the Hugging Face model's own logits."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from conftest import ort_logits, torch_logits

from rotgraph import io
from rotgraph.hadamard import hadamard_factors
from rotgraph.online import insert_hadamard
from rotgraph.passes import (
    CanonicalizeNormsPass,
    FuseNormScalesPass,
    InsertDownHadamardPass,
    InsertOutHadamardPass,
    InsertQKHadamardPass,
    RotateHeadsPass,
    RotateResidualPass,
    UntieEmbeddingPass,
)
from rotgraph.pipeline import RotateOptions, rotate_model, run_passes
from rotgraph.structure import discover, is_hadamard
from rotgraph.weights import read_float64

ATOL = 2e-5  # tiny-model logits are O(1); float32 rounding of the rewritten weights is ~1e-6


def run(model: ir.Model, passes: list, tmp_path: Path, name: str = "out.onnx") -> Path:
    run_passes(model, [CanonicalizeNormsPass(), common_passes.ShapeInferencePass(strict_mode=False), *passes])
    out = tmp_path / name
    io.save_model(model, out)
    return out


def weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: read_float64(v) for k, v in model.graph.initializers.items() if v.const_value is not None}


@pytest.fixture(params=["dynamo", "torchscript"])
def exported(request, tiny) -> tuple[Path, Path]:
    return tiny("llama", request.param)


def test_canonicalized_export_matches_torch(exported, tokens, tmp_path) -> None:
    folder, path = exported
    out = run(io.load_model(path), [], tmp_path)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_fuse_norm_scales(exported, tokens, tmp_path) -> None:
    folder, path = exported
    model = io.load_model(path)
    out = run(model, [UntieEmbeddingPass(), FuseNormScalesPass()], tmp_path)
    desc = discover(model)
    for norm in desc.norms():
        assert np.all(read_float64(norm.scale) == 1.0)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_untie_gives_lm_head_its_own_weight(tiny, tokens, tmp_path) -> None:
    folder, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    out = run(model, [UntieEmbeddingPass()], tmp_path)
    desc = discover(model)
    assert not desc.lm_head_tied and desc.lm_head.weight.is_initializer()
    np.testing.assert_array_equal(read_float64(desc.lm_head.weight), read_float64(desc.embedding_table).T)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_r1_rotates_the_residual_stream(exported, tokens, tmp_path) -> None:
    folder, path = exported
    model = io.load_model(path)
    before = canonical_embedding(path)
    out = run(model, [UntieEmbeddingPass(), FuseNormScalesPass(), RotateResidualPass(seed=3)], tmp_path)
    after = read_float64(discover(model).embedding_table)
    # the new table is the old one times an orthogonal matrix, and not the old one
    q = np.linalg.lstsq(before, after, rcond=None)[0]
    np.testing.assert_allclose(q @ q.T, np.eye(48), atol=1e-5)
    assert np.abs(after - before).max() > 0.1
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def canonical_embedding(path: Path) -> np.ndarray:
    model = io.load_model(path)
    run_passes(model, [CanonicalizeNormsPass()])
    return read_float64(discover(model).embedding_table)


def test_r1_requires_fused_norms(exported) -> None:
    _, path = exported
    model = io.load_model(path)
    with pytest.raises(Exception, match=r"FuseNormScalesPass|UntieEmbeddingPass"):
        run_passes(model, [CanonicalizeNormsPass(), RotateResidualPass()])


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_r2_rotates_values_per_head(tiny, tokens, tmp_path, model_type: str) -> None:
    folder, path = tiny(model_type, "dynamo")
    model = io.load_model(path)
    old = weights(model)
    out = run(model, [RotateHeadsPass(seed=5)], tmp_path)
    attn = discover(model).blocks[0].attention
    new_v = read_float64(attn.v.weight)
    assert not np.allclose(new_v, old[attn.v.weight.name])
    if attn.v.bias is not None:
        assert not np.allclose(read_float64(attn.v.bias), old[attn.v.bias.name])
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_r2_with_more_kv_heads_and_wide_heads(tiny, tokens, tmp_path) -> None:
    folder, path = tiny("llama", "dynamo", head_dim=24, num_attention_heads=4, num_key_value_heads=2)
    out = run(io.load_model(path), [RotateHeadsPass(seed=1)], tmp_path)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_r3_inserts_hadamards_after_rope(exported, tokens, tmp_path) -> None:
    folder, path = exported
    model = io.load_model(path)
    out = run(model, [InsertQKHadamardPass()], tmp_path)
    assert sum(is_hadamard(n) for n in model.graph) == 4  # Q and K in 2 blocks
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_r4_inserts_hadamard_before_down_proj(exported, tokens, tmp_path) -> None:
    folder, path = exported
    model = io.load_model(path)
    out = run(model, [InsertDownHadamardPass()], tmp_path)
    for block in discover(model).blocks:
        assert is_hadamard(block.mlp.down.input.producer())
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hadamard_before_o_proj_after_r1_r2_is_exact(tiny, tokens, tmp_path, model_type: str) -> None:
    """After R2 has rotated each head's rows of O (grouped-query heads, Qwen2's V bias), the Hadamard
    across O's whole input keeps the function, and O reads it."""
    folder, path = tiny(model_type, "dynamo", num_attention_heads=4, num_key_value_heads=2)
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=5, out_hadamard=True))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    for block in discover(model).blocks:
        assert is_hadamard(block.attention.o.input.producer())
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_online_passes_refuse_to_run_twice(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    run_passes(
        model, [CanonicalizeNormsPass(), InsertQKHadamardPass(), InsertDownHadamardPass(), InsertOutHadamardPass()]
    )
    with pytest.raises(Exception, match="already"):
        run_passes(model, [InsertDownHadamardPass()])
    with pytest.raises(Exception, match="already"):
        run_passes(model, [InsertOutHadamardPass()])
    with pytest.raises(Exception, match="already"):
        run_passes(model, [InsertQKHadamardPass()])


@pytest.mark.parametrize("n", [16, 48, 96, 24])
def test_hadamard_function_body_computes_the_matrix(n: int, tmp_path) -> None:
    """The ONNX function (run by onnxruntime) equals x @ H with H the matrix the passes fold."""
    x = ir.Value(name="x", shape=ir.Shape(["b", 3, n]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 23}, name="g")
    model = ir.Model(graph, ir_version=10)
    factors = hadamard_factors(n)
    assert factors is not None
    node = insert_hadamard(model, x, factors)
    graph.outputs.append(node.outputs[0])
    node.outputs[0].name = "y"
    path = tmp_path / "h.onnx"
    io.save_model(model, path)
    import onnxruntime as ort

    data = np.random.default_rng(0).standard_normal((2, 3, n)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": data})[0]
    np.testing.assert_allclose(y, data.astype(np.float64) @ factors.matrix(), atol=1e-5)


@pytest.mark.parametrize(
    "model_type,exporter",
    [("llama", "dynamo"), ("llama", "torchscript"), ("qwen2", "dynamo"), ("qwen2", "torchscript")],
)
def test_full_pipeline_is_exact(tiny, tokens, tmp_path, model_type: str, exporter: str) -> None:
    folder, path = tiny(model_type, exporter)
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=11))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    assert sum(is_hadamard(n) for n in model.graph) == 6
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_untied_llama_pipeline_is_exact(tiny, tokens, tmp_path) -> None:
    folder, path = tiny("llama", "dynamo", tie_word_embeddings=False)
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=2))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_seeds_change_the_rotation(tiny, tmp_path) -> None:
    _, path = tiny("llama", "dynamo")
    tables = []
    for seed in (0, 0, 1):
        model = io.load_model(path)
        rotate_model(model, RotateOptions(seed=seed, online=False))
        tables.append(read_float64(discover(model).embedding_table))
    np.testing.assert_array_equal(tables[0], tables[1])
    assert not np.allclose(tables[0], tables[2])


def test_onnxruntime_simplified_layer_norm_is_accepted(tiny, tokens, tmp_path) -> None:
    """Graphs fused by onnxruntime's tools carry SimplifiedLayerNormalization instead of RMSNormalization."""
    folder, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    run_passes(model, [CanonicalizeNormsPass()])
    for node in model.graph:
        if node.op_type == "RMSNormalization":
            node.op_type = "SimplifiedLayerNormalization"  # same inputs and attributes in onnxruntime
    assert sum(n.op_type == "SimplifiedLayerNormalization" for n in model.graph) == 5
    rotate_model(model, RotateOptions(seed=3))  # expanded for the passes, fused again at the end
    norms = collections.Counter(n.op_type for n in model.graph if "Normalization" in n.op_type)
    assert norms["SimplifiedLayerNormalization"] + norms["SkipSimplifiedLayerNormalization"] == 5, norms
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_sizes_without_hadamard_fall_back_to_random_orthogonal(tiny, tokens, tmp_path, caplog) -> None:
    # hidden 92 and head_dim 46 have no known Hadamard matrix: R1 and R2 must still be exact
    folder, path = tiny("llama", "dynamo", hidden_size=92, num_attention_heads=2, num_key_value_heads=1)
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=0, online=False))
    assert "no Hadamard matrix of order 92" in caplog.text and "order 46" in caplog.text
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)
    with pytest.raises(Exception, match="no Hadamard matrix of order 46"):
        rotate_model(io.load_model(path), RotateOptions(online=True))
