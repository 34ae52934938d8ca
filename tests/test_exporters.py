"""Graphs as other tools leave them: onnxruntime's fused norms and MatMuls, opset-23 RMSNormalization and
RotaryEmbedding, fused attention. The reference is the Hugging Face model."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest
from conftest import ort_logits, torch_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.constants import MS_DOMAIN, ORT_NORMS_KEY
from rotgraph.errors import StructureError
from rotgraph.passes.canonical.expand_ort_ops import ExpandOrtFusedOpsPass
from rotgraph.pipeline import RotateOptions, canonicalize, rotate_model
from rotgraph.structure import discover

ATOL = 2e-5


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def ort_fused_norms(path: Path, out: Path) -> collections.Counter:
    """onnxscript's onnxruntime fusions for RMSNorm, skip + RMSNorm and transposed MatMuls."""
    from onnxscript.rewriter.ort_fusions import fused_matmul_rule_sets, rms_normalization, skip_normalization

    model = io.load_model(path)
    common_passes.ShapeInferencePass()(model)
    rms_normalization.fuse_rms_normalization(model)
    skip_normalization.fuse_skip_rms_normalization(model)
    fused_matmul_rule_sets.fused_matmul_rule_sets().apply_to_model(model)
    io.save_model(model, out)
    return op_counts(model)


@pytest.mark.parametrize("with_past", [False, True])
def test_onnxruntime_fused_norms_and_matmuls(tiny, tokens, tmp_path, with_past: bool) -> None:
    folder, path = tiny("llama", "dynamo", with_past)
    fused = tmp_path / "fused.onnx"
    counts = ort_fused_norms(path, fused)
    assert counts["SkipSimplifiedLayerNormalization"] == 4 and counts["SimplifiedLayerNormalization"] == 1
    assert counts["FusedMatMul"] >= 1
    model = io.load_model(fused)
    rotate_model(model, RotateOptions(seed=6))
    after = op_counts(model)  # the fused norms come back (weightless: their scales are in the weights)
    assert after["SkipSimplifiedLayerNormalization"] == 4 and after["SimplifiedLayerNormalization"] == 1
    assert after["FusedMatMul"] == 0 and after["RMSNormalization"] == 0
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def typed(name: str, shape: list[int], array: np.ndarray | None = None) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    if array is not None:
        value.const_value = ir.tensor(array, name=name)
    return value


def fused_graph(node: ir.Node, inputs: list[ir.Value], outputs: dict[int, str]) -> ir.Model:
    """A model of one onnxruntime node, its outputs at `outputs` (index -> name) graph outputs."""
    for index, name in outputs.items():
        node.outputs[index].name, node.outputs[index].type = name, ir.TensorType(ir.DataType.FLOAT)
    initializers = [v for v in node.inputs if v is not None and v.const_value is not None]
    graph = ir.Graph(
        inputs,
        [node.outputs[i] for i in outputs],
        nodes=[node],
        initializers=initializers,
        opset_imports={"": 23, "com.microsoft": 1},
    )
    return ir.Model(graph, ir_version=10)


def run_disabled(model: ir.Model, path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Every graph output, by onnxruntime with all graph optimizations disabled."""
    ir.save(model, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def skip_norm(outputs: dict[int, str], bias: bool = True) -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    x, skip = typed("x", [2, 3, 8]), typed("skip", [2, 3, 8])
    gamma = typed("gamma", [8], rng.uniform(0.5, 2.0, 8).astype(np.float32))
    beta = typed("beta", [8], rng.normal(size=8).astype(np.float32))
    node = ir.Node(
        MS_DOMAIN,
        "SkipSimplifiedLayerNormalization",
        [x, skip, gamma, *([beta] if bias else [])],
        [ir.AttrFloat32("epsilon", 1e-3)],
        num_outputs=4,
        name="layers.0.norm",
    )
    feeds = {"x": rng.normal(size=(2, 3, 8)).astype(np.float32), "skip": rng.normal(size=(2, 3, 8)).astype(np.float32)}
    return fused_graph(node, [x, skip], outputs), feeds


@pytest.mark.parametrize("bias", [False, True])
def test_skip_norm_expands_to_what_onnxruntime_computes(tmp_path, bias: bool) -> None:
    """SkipSimplifiedLayerNormalization with its residual sum read: Add [+ bias Add] + RMSNormalization, the
    sum's Add taking over output 3 (and its name); the same two outputs as onnxruntime's fused kernel."""
    model, feeds = skip_norm({0: "normalized", 3: "residual"}, bias)
    reference = run_disabled(model, tmp_path / "fused.onnx", feeds)
    assert ExpandOrtFusedOpsPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Add", *(["Add"] if bias else []), "RMSNormalization"]
    assert [v.name for v in model.graph.outputs] == ["normalized", "residual"]
    assert json.loads(model.metadata_props[ORT_NORMS_KEY]) == {"simplified": 0, "skip": 1}
    for ours, theirs in zip(run_disabled(model, tmp_path / "expanded.onnx", feeds), reference, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ExpandOrtFusedOpsPass()(model).modified is False  # nothing left to expand


@pytest.mark.parametrize("stat", [1, 2])
def test_skip_norm_with_its_mean_or_inverse_std_read_is_refused_by_name(stat: int) -> None:
    model, _ = skip_norm({0: "normalized", stat: "statistic"})
    with pytest.raises(StructureError, match=r"SkipSimplifiedLayerNormalization node 'layers\.0\.norm': its mean"):
        ExpandOrtFusedOpsPass()(model)


def test_norm_over_another_axis_is_refused_by_name() -> None:
    x, scale = typed("x", [2, 3, 8]), typed("scale", [3, 8], np.ones((3, 8), np.float32))
    node = ir.Node("", "SimplifiedLayerNormalization", [x, scale], [ir.AttrInt64("axis", 1)], name="final_norm")
    with pytest.raises(StructureError, match="LayerNormalization node 'final_norm': normalizes over a non-last"):
        ExpandOrtFusedOpsPass()(fused_graph(node, [x], {0: "y"}))


@pytest.mark.parametrize(("trans_b", "alpha"), [(1, 0.125), (0, 2.5), (1, 1.0)])
def test_fused_matmul_expands_to_what_onnxruntime_computes(tmp_path, trans_b: int, alpha: float) -> None:
    """FusedMatMul(A, B, transB, alpha) -> MatMul(A, Transpose(B)) * alpha: onnxruntime's fused kernel's
    output; the output keeps its name."""
    rng = np.random.default_rng(4)
    a, b = typed("a", [2, 4, 3, 8]), typed("b", [2, 4, 5, 8] if trans_b else [2, 4, 8, 5])
    attrs = [ir.AttrInt64("transB", trans_b), ir.AttrFloat32("alpha", alpha)]
    model = fused_graph(ir.Node(MS_DOMAIN, "FusedMatMul", [a, b], attrs, name="scores"), [a, b], {0: "scores_out"})
    feeds = {v.name: rng.normal(size=v.shape.numpy()).astype(np.float32) for v in (a, b)}  # type: ignore[union-attr]
    reference = run_disabled(model, tmp_path / "fused.onnx", feeds)[0]
    assert ExpandOrtFusedOpsPass()(model).modified
    ops = [n.op_type for n in model.graph if n.op_type != "Constant"]
    assert ops == ["Transpose"] * trans_b + ["MatMul"] + ["Mul"] * (alpha != 1.0)
    assert model.graph.outputs[0].name == "scores_out" and ORT_NORMS_KEY not in model.metadata_props
    expanded = run_disabled(model, tmp_path / "expanded.onnx", feeds)[0]
    np.testing.assert_allclose(expanded, reference, rtol=1e-5, atol=1e-6)


def test_fused_matmul_with_a_transposed_left_operand_stays() -> None:
    a, b = typed("a", [8, 3]), typed("b", [8, 5])
    node = ir.Node(MS_DOMAIN, "FusedMatMul", [a, b], [ir.AttrInt64("transA", 1)], name="kept")
    model = fused_graph(node, [a, b], {0: "y"})
    assert ExpandOrtFusedOpsPass()(model).modified is False
    assert [n.op_type for n in model.graph] == ["FusedMatMul"]


def test_opset23_rms_normalization_and_rotary_embedding(tiny, tokens, tmp_path) -> None:
    from onnxscript.rewriter.rules.fusion import _rotary_embedding

    folder, path = tiny("qwen2", "dynamo")
    model = io.load_model(path)
    canonicalize(model)  # opset 23 RMSNormalization
    assert _rotary_embedding.fuse_rotary_embedding(model) == 4
    opset23 = tmp_path / "opset23.onnx"
    io.save_model(model, opset23)
    model = io.load_model(opset23)
    assert op_counts(model)["RotaryEmbedding"] == 4 and op_counts(model)["RMSNormalization"] == 5
    rotate_model(model, RotateOptions(seed=7))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    one = tokens[:1]  # the fused graph's cos/sin caches have batch 1 (onnxruntime's kernel wants x's batch)
    np.testing.assert_allclose(ort_logits(out, one), torch_logits(folder, one), atol=ATOL)


def test_fused_attention_is_rotated_by_the_cli(tiny, tmp_path, capsys) -> None:
    """onnxscript's MultiHeadAttention fusion is read (tests/test_fused.py checks the logits against the Hugging
    Face model); the CLI validates the rotated graph against the fused input, and the attention stays fused."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, path = tiny("llama", "dynamo")
    model, counts = optimize_for_ort(io.load_model(path))
    assert counts["sdpa_via_mha"] + counts["gqa"] + counts["mha1"] + counts["mha2"] > 0
    fused = tmp_path / "ort.onnx"
    io.save_model(model, fused)
    out = tmp_path / "o" / "r.onnx"
    assert main(["rotate", str(fused), "-o", str(out)]) == 0, capsys.readouterr().err
    assert op_counts(io.load_model(out))["MultiHeadAttention"] == 2


def test_a_graph_without_type_information_is_read(tiny, tokens, tmp_path, capsys) -> None:
    """Exporters such as optimum write no value_info; the norm patterns need types, so rotgraph infers
    them first instead of asking the user to."""
    import onnx

    folder, path = tiny("llama", "dynamo")
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    bare = tmp_path / "bare" / "model.onnx"
    bare.parent.mkdir()
    onnx.save(proto, str(bare), save_as_external_data=True, location="model.onnx.data")
    assert main(["describe", str(bare)]) == 0, capsys.readouterr().err
    assert "decoder: 2 blocks" in capsys.readouterr().out
    model = io.load_model(bare)
    rotate_model(model, RotateOptions(seed=2))
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_a_folder_without_tokenizer_exports_none_and_rotates(tiny, tokens, tmp_path, capsys, caplog) -> None:
    """Weights-only Hugging Face folders are common; export writes no tokenizer.json (one that encodes
    nothing would break validation) and rotate then validates on seeded token ids."""
    import shutil

    folder, _ = tiny("llama", "dynamo")
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (folder / name).is_file():
            shutil.copy(folder / name, bare / name)
    out = tmp_path / "onnx" / "model.onnx"
    assert main(["export", str(bare), "-o", str(out)]) == 0, capsys.readouterr().err
    assert "has no tokenizer" in caplog.text
    assert sorted(f.name for f in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(out), "-o", str(rotated)]) == 0, capsys.readouterr().err
    np.testing.assert_allclose(ort_logits(rotated, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_a_float16_graph_rotates_and_quantizes_in_float16(tiny, tokens, tmp_path) -> None:
    """float16 weights and activations: the weight math runs in float64 and is written back as float16,
    rotgraph's ops are float16 functions (the float32-only kernels are not used), the rotation is exact
    to float16 rounding against the Hugging Face model in float16, and quantization is validated."""
    import shutil

    import torch

    from rotgraph.export import ModelSource, load, to_onnx
    from rotgraph.quantize import QuantOptions, quantize

    folder, _ = tiny("llama", "dynamo")
    hf, _ = load(ModelSource(folder, None))
    source = tmp_path / "fp16" / "model.onnx"
    with io.staged_output(source) as staged:
        io.save_model(to_onnx(hf.half(), "dynamo"), staged)
    shutil.copy(folder / "tokenizer.json", source.parent / "tokenizer.json")
    rotated = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(source), "-o", str(rotated)]) == 0
    model, original = io.load_model(rotated), io.load_model(source)
    weights = [lin.weight for b in discover(model).blocks for lin in (b.attention.q, b.attention.o, b.mlp.down)]
    assert {w.dtype for w in weights} == {ir.DataType.FLOAT16}
    kept = set(model.graph.initializers) & set(original.graph.initializers)
    assert kept and all(model.graph.initializers[n].dtype == original.graph.initializers[n].dtype for n in kept)
    assert {f.outputs[0].dtype for f in model.functions.values()} <= {ir.DataType.FLOAT16, None}
    with torch.no_grad():
        reference = hf.half()(input_ids=torch.from_numpy(tokens), use_cache=False).logits.float().numpy()
    logits = ort_logits(rotated, tokens).astype(np.float32)
    assert logits.dtype == np.float32 and np.abs(logits - reference).max() < 5e-2 * max(1.0, np.abs(reference).max())
    for scheme, fmt in (("w4a4kv4", "qdq"), ("w4a8", "ort")):
        report = quantize(source, tmp_path / f"{scheme}-{fmt}" / "model.onnx", QuantOptions(scheme, group=16, fmt=fmt))
        assert report.validation is not None and report.validation.top1 > 0.9
