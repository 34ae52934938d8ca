"""Graphs with fused attention and norms as users hold them: onnxscript's onnxruntime fusions
(MultiHeadAttention, SkipSimplifiedLayerNormalization) and the onnxruntime-genai builder's fp32 graphs
(packed QKV into GroupQueryAttention with RoPE inside, the embedding a Gather on a Transpose of the lm_head
weight). R1, R2 and R4 fold into the projections around the fused op; the reference is the Hugging Face
model."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import edited_export, mean_kl, ort_logits, torch_logits

from rotgraph import io, kernels
from rotgraph.cli import main
from rotgraph.constants import R3_KEY, ROTATION_KEY
from rotgraph.errors import StructureError
from rotgraph.passes import InsertQKHadamardPass
from rotgraph.pipeline import RotateOptions, canonicalize, foldable_form_passes, rotate_model, run_passes
from rotgraph.structure.summary import summary

ATOL = 2e-5
FIXTURES = Path(__file__).parent / "fixtures"


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def builder_logits(path: Path, tokens: np.ndarray, fixture: Path) -> np.ndarray:
    """The builder graph's prefill: input_ids, an all-ones attention_mask and an empty cache (its head size
    is symbolic in the graph: read it from the fixture's genai_config.json)."""
    config = json.loads((fixture / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batch, seq = tokens.shape
    feeds = {"input_ids": tokens.astype(np.int64), "attention_mask": np.ones((batch, seq), np.int64)}
    empty = np.zeros((batch, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    feeds |= {i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    return np.asarray(session.run(["logits"], feeds)[0])


def fuse_for_ort(path: Path, out: Path) -> Path:
    """The model at `path` with onnxscript's onnxruntime fusions (`optimize_for_ort`, which runs
    `onnxscript.optimizer.optimize` first), saved at `out`: what a deployment engineer runs."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, _ = optimize_for_ort(io.load_model(path))
    io.save_model(model, out)
    return out


@pytest.fixture(scope="module")
def ort_fused(tiny, tmp_path_factory):
    """ort_fused(model_type, with_past) -> (hf_folder, graph with onnxscript's onnxruntime fusions)."""
    made: dict[tuple[str, bool], tuple[Path, Path]] = {}

    def build(model_type: str, with_past: bool) -> tuple[Path, Path]:
        if (model_type, with_past) not in made:
            folder, path = tiny(model_type, "dynamo", with_past)
            made[model_type, with_past] = (
                folder,
                fuse_for_ort(path, tmp_path_factory.mktemp("ort-fused") / "model.onnx"),
            )
        return made[model_type, with_past]

    return build


@pytest.mark.parametrize(("model_type", "with_past"), [("llama", False), ("llama", True), ("qwen2", False)])
def test_multi_head_attention_from_onnxscript_rotates_exactly(
    ort_fused, tokens, tmp_path, model_type: str, with_past: bool
) -> None:
    """onnxscript fuses attention into MultiHeadAttention (for GQA too: the heads are repeated before it) with
    RoPE and the cache outside it: R1, R2, R4 fold into the projections (Qwen2: the V bias Add too), and R3
    goes on the RoPE outputs before the op."""
    folder, path = ort_fused(model_type, with_past)
    model = io.load_model(path)
    assert op_counts(model)["MultiHeadAttention"] == 2 and op_counts(model)["SkipSimplifiedLayerNormalization"] == 4
    desc = canonicalize(model)
    assert "fused com.microsoft MultiHeadAttention (separate Q/K/V MatMuls, RoPE outside)" in summary(desc)
    assert all(b.attention.fused is not None and b.attention.q_rope is not None for b in desc.blocks)
    assert (desc.blocks[0].attention.key_cache is not None) == with_past
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=5))
    counts = op_counts(model)
    assert counts["MultiHeadAttention"] == 2 and counts["Hadamard"] == 2 * 2 + 2  # R3 on Q and K, R4
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


@pytest.mark.slow
def test_multi_head_attention_takes_a_padding_mask_and_a_cache(tmp_path) -> None:
    """onnxscript's fusions over a graph with attention_mask, position_ids and a KV cache: MultiHeadAttention
    gets the mask as its attention_bias (operand 5), the cache stays a Concat before it. The roles are the
    unfused graph's, and a left-padded batch, prefill and one decode step, gives each row's own logits (each
    row alone through the unfused graph), before and after rotation."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from test_inputs import check_padding, export_with_mask

    from rotgraph.inputs import read_roles
    from rotgraph.testing import make_tiny_model

    source = export_with_mask(make_tiny_model(tmp_path / "hf", "llama"), tmp_path / "source" / "model.onnx")
    model, _ = optimize_for_ort(io.load_model(source))
    attentions = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert len(attentions) == 2 and all(len(n.inputs) > 5 and n.inputs[5] is not None for n in attentions)
    fused = tmp_path / "fused" / "model.onnx"
    fused.parent.mkdir()
    io.save_model(model, fused)
    (fused.parent / "tokenizer.json").write_bytes((source.parent / "tokenizer.json").read_bytes())
    assert read_roles(fused) == read_roles(source)
    check_padding(fused, reference=source)
    rotate_model(model, RotateOptions(seed=6))
    assert op_counts(model)["MultiHeadAttention"] == 2 and op_counts(model)["Hadamard"] == 2 * 2 + 2
    rotated = tmp_path / "rotated.onnx"
    io.save_model(model, rotated)
    check_padding(rotated, reference=source)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_genai_builder_graph_rotates_exactly(name: str, tokens, tmp_path) -> None:
    """Packed QKV (Qwen2: with its packed bias) into GroupQueryAttention with RoPE inside, Skip norms, the
    embedding a Gather on Transpose(lm_head weight): R1, R2 (on V's columns of the packed weight) and R4;
    no R3, with the reason recorded. The fused attention stays fused."""
    path = FIXTURES / f"genai-{name}-fp32" / "model.onnx"
    folder = FIXTURES / f"hf-{name}"
    desc = canonicalize(io.load_model(path))
    a = desc.blocks[0].attention
    assert a.packed and a.rope_inside and a.q_rope is None
    assert (a.q.columns, a.k.columns, a.v.columns) == ((0, 64), (64, 96), (96, 128))
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 16) and desc.lm_head_tied
    assert "fused com.microsoft GroupQueryAttention (packed QKV MatMul, RoPE inside)" in summary(desc)
    assert "KV cache: inside 2 fused GroupQueryAttention nodes" in summary(desc)
    model = io.load_model(path)
    rotate_model(model, RotateOptions(seed=4))
    counts = op_counts(model)
    assert counts["GroupQueryAttention"] == 2 and counts["Hadamard"] == 2  # R4 only
    assert model.metadata_props[R3_KEY].startswith("none")
    assert json.loads(model.metadata_props[ROTATION_KEY])["r3"] is False
    kinds = ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
    source = op_counts(io.load_model(path))
    assert [counts[k] for k in kinds] == [source[k] for k in kinds]  # the builder's fused norms, given back
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    reference = torch_logits(folder, tokens)
    np.testing.assert_allclose(builder_logits(path, tokens, path.parent), reference, atol=ATOL)  # the fixture
    np.testing.assert_allclose(builder_logits(out, tokens, path.parent), reference, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rope_moved_out_of_the_builder_attention_is_exact_and_takes_r3(name: str, tokens, tmp_path) -> None:
    """SplitRotaryPass on the builder's graphs: every GroupQueryAttention gets do_rotary=0 and RotaryEmbedding
    nodes on Q and K before it. The graph still computes the Hugging Face model, and a right-padded batch,
    prefill and one decode step, gives each row's logits of the builder graph run alone. Then R3 goes
    between RoPE and the op (Hadamards on Q and K in every layer) and the rotated graph is exact the same
    way."""
    from test_inputs import check_padding

    from rotgraph.passes.canonical.split_rotary import SplitRotaryPass

    path = FIXTURES / f"genai-{name}-fp32" / "model.onnx"
    model = io.load_model(path)
    assert SplitRotaryPass()(model).modified
    attentions = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert len(attentions) == 2 and all(n.attributes.get_int("do_rotary", 1) == 0 for n in attentions)
    assert op_counts(model)["RotaryEmbedding"] == 2 * 2
    split = tmp_path / "split.onnx"
    io.save_model(model, split)
    np.testing.assert_allclose(
        builder_logits(split, tokens, path.parent), torch_logits(FIXTURES / f"hf-{name}", tokens), atol=ATOL
    )
    check_padding(split, reference=path)
    rotate_model(model, RotateOptions(seed=4))
    assert op_counts(model)["Hadamard"] == 2 * 2 + 2 and model.metadata_props[R3_KEY].startswith("hadamard")
    rotated = tmp_path / "rotated.onnx"
    io.save_model(model, rotated)
    check_padding(rotated, reference=path)
    assert not SplitRotaryPass()(io.load_model(FIXTURES / "optimum-llama" / "model.onnx")).modified


@pytest.mark.slow
def test_kv_cache_quantization_on_the_builder_graph_after_rope_moved_out(tokens, tmp_path) -> None:
    """The builder graph refuses a quantized KV cache (RoPE inside GroupQueryAttention); after SplitRotaryPass
    w4a4kv4 quantizes it (keys after RoPE and R3, and values, fake-quantized as they enter the op, which
    keeps its float cache: 4 projection inputs and K and V per layer), and rotation beats none against the
    Hugging Face model."""
    from rotgraph.evaluate import make_session, run_logits
    from rotgraph.passes.canonical.split_rotary import SplitRotaryPass
    from rotgraph.quantize import QuantOptions, quantize_model

    path = FIXTURES / "genai-llama-fp32" / "model.onnx"
    reference = torch_logits(FIXTURES / "hf-llama", tokens)
    kl = {}
    for rotation in ("none", "quarot"):
        model = io.load_model(path)
        SplitRotaryPass()(model)  # quantize_model does it for a kv scheme; here explicit, and idempotent
        quantize_model(model, QuantOptions("w4a4kv4", rotation=rotation, group=16))
        assert op_counts(model)["FakeQuant"] == 2 * (4 + 2)
        out = tmp_path / rotation / "model.onnx"
        with io.staged_output(out) as staged:
            io.save_model(model, staged)
        kl[rotation] = mean_kl(reference, run_logits(make_session(out, "disable"), tokens))
    assert kl["quarot"] < kl["none"], kl


def test_untie_gives_the_builder_embedding_its_own_table() -> None:
    model = io.load_model(FIXTURES / "genai-llama-fp32" / "model.onnx")
    run_passes(model, foldable_form_passes())
    desc = canonicalize(model)
    assert not desc.lm_head_tied and desc.embedding_table.is_initializer()
    assert desc.lm_head.weight.is_initializer() and desc.lm_head.weight is not desc.embedding_table
    assert "Transpose" not in op_counts(model)


def test_r3_required_on_rope_inside_a_fused_op_is_refused() -> None:
    model = io.load_model(FIXTURES / "genai-llama-fp32" / "model.onnx")
    run_passes(model, foldable_form_passes())
    with pytest.raises(StructureError, match="R3 needs RoPE outside the fused attention"):
        run_passes(model, [InsertQKHadamardPass()])


def test_unreadable_fused_attention_is_named_first() -> None:
    """An op that hides its projections (here the builder's GroupQueryAttention relabelled as
    com.microsoft Attention) is named as the cause, not a missing MatMul."""
    model = io.load_model(FIXTURES / "genai-llama-fp32" / "model.onnx")
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.op_type = "Attention"
    with pytest.raises(StructureError, match=r"attention is fused into com\.microsoft Attention") as error:
        canonicalize(model)
    assert "expected 3 MatMuls" not in str(error.value)


def test_an_onnxruntime_quantized_graph_is_named() -> None:
    with pytest.raises(StructureError, match="already quantized for onnxruntime"):
        canonicalize(io.load_model(FIXTURES / "genai-llama-int4" / "model.onnx"))


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
def test_builder_graph_quantizes_its_packed_qkv_once(fmt: str, tmp_path) -> None:
    """The packed QKV weight is one projection to quantize (once, as "qkv"), and quantize's validation against
    the float graph passes; with a quantized KV cache, quantize moves RoPE out of the op first
    (SplitRotaryPass: a RotaryEmbedding on Q and K per layer) and R3 goes after it."""
    from rotgraph.quantize import QuantOptions, quantize

    path = FIXTURES / "genai-llama-fp32" / "model.onnx"
    out = tmp_path / fmt / "model.onnx"
    report = quantize(path, out, QuantOptions("w4a16", group=16, fmt=fmt))
    assert report.validation is not None and report.validation.top1 > 0.9
    counts = op_counts(io.load_model(out))
    assert counts["GroupQueryAttention"] == 2 and counts["SkipSimplifiedLayerNormalization"] == 4
    # QKV (packed), O, gate and up (packed by the ort format's deployment fusion), down; lm_head
    assert counts["MatMulNBits" if fmt == "ort" else "DequantizeLinear"] == (2 * 4 + 1 if fmt == "ort" else 2 * 5 + 2)
    kv4 = tmp_path / "kv4" / "model.onnx"
    report = quantize(path, kv4, QuantOptions("w4a4kv4", group=16, fmt=fmt))
    assert report.validation is not None and report.validation.kl < report.validation.unrelated_kl
    counts = op_counts(io.load_model(kv4))
    assert counts["RotaryEmbedding"] == 2 * 2 and counts["GroupQueryAttention"] == 2
    assert counts["Hadamard"] == 2 * (2 + 1 + 1)  # R3 on Q and K after RoPE, R4, before o_proj (4-bit activations)


def test_group_query_attention_with_rope_outside_rotates_exactly(tiny, tokens, tmp_path) -> None:
    """rotgraph's own float ort graph (`quantize --scheme w16a16 --rotation none --format ort`): separate Q/K/V
    MatMuls into GroupQueryAttention, RoPE before it and the cache inside it. R1-R4 all apply, R3 on the RoPE
    outputs before the op."""
    from rotgraph.quantize import QuantOptions, quantize

    folder, path = tiny("llama", "dynamo", True)
    source = tmp_path / "gqa" / "model.onnx"
    options = QuantOptions("w16a16", rotation="none", fmt="ort", deployment_fusion=False)  # RoPE stays outside
    quantize(path, source, options, validate=False)
    desc = canonicalize(io.load_model(source))
    assert "fused com.microsoft GroupQueryAttention (separate Q/K/V MatMuls, RoPE outside)" in summary(desc)
    model = io.load_model(source)
    rotate_model(model, RotateOptions(seed=8))
    assert op_counts(model)["GroupQueryAttention"] == 2 and op_counts(model)["Hadamard"] == 2 * 2 + 2
    out = tmp_path / "rotated.onnx"
    io.save_model(model, out)
    np.testing.assert_allclose(ort_logits(out, tokens), torch_logits(folder, tokens), atol=ATOL)


def test_smoothquant_on_a_packed_qkv_is_exact_in_float(tokens, tmp_path) -> None:
    """SmoothQuant scales the packed QKV rows once and divides only V's columns (and V's bias) by the
    V -> O scales: in float (w16a16) the smoothed rotated graph still computes the Hugging Face model."""
    from rotgraph.quantize import QuantOptions, quantize

    path = FIXTURES / "genai-qwen2-fp32" / "model.onnx"
    out = tmp_path / "smooth" / "model.onnx"
    options = QuantOptions("w16a16", smooth=0.5, calibration_windows=2, calibration_seq_len=32)
    quantize(path, out, options, validate=False)
    logits = builder_logits(out, tokens, path.parent)
    np.testing.assert_allclose(logits, torch_logits(FIXTURES / "hf-qwen2", tokens), atol=ATOL)


@pytest.mark.parametrize("scheme", ["w4a8", "w4a4kv4"])
def test_multi_head_attention_graph_quantizes_in_the_ort_format(ort_fused, tmp_path, scheme: str) -> None:
    """A graph whose attention is already MultiHeadAttention keeps it in the ort format (no
    GroupQueryAttention rewrite is attempted), with a float cache and with one stored as 4-bit codes."""
    from rotgraph.quantize import QuantOptions, quantize

    _, path = ort_fused("llama", True)
    out = tmp_path / "model.onnx"
    report = quantize(path, out, QuantOptions(scheme, group=16, fmt="ort"))
    assert report.validation is not None and report.validation.kl < report.validation.unrelated_kl
    counts = op_counts(io.load_model(out))
    assert counts["MultiHeadAttention"] == 2 and counts["GroupQueryAttention"] == 0
    # gate and up packed by the deployment fusion, which a cache stored as rotgraph's codes does without
    assert counts["MatMulNBits"] == (2 * 7 + 1 if "kv" in scheme else 2 * 6 + 1)


def test_statistics_of_one_model_agree_across_exporters(tmp_path) -> None:
    """The same Hugging Face model exported by onnxruntime-genai's builder (fused attention and norms,
    external data; its rewritten weights go through a scratch folder, as `rotgraph inspect` does) and by
    optimum (plain ops): inspect's per-layer statistics agree."""
    from rotgraph.stats import activation_stats

    windows = np.random.default_rng(2).integers(0, 384, size=(2, 48))
    builder = activation_stats(FIXTURES / "genai-llama-fp32" / "model.onnx", windows, scratch=tmp_path / "scratch")
    optimum = activation_stats(FIXTURES / "optimum-llama" / "model.onnx", windows)
    for a, b in zip(builder, optimum, strict=True):
        np.testing.assert_allclose(
            [a.residual_max_over_rms, a.residual_kurtosis, a.down_max_over_rms, a.down_kurtosis],
            [b.residual_max_over_rms, b.residual_kurtosis, b.down_max_over_rms, b.down_kurtosis],
            rtol=1e-4,
        )


@pytest.mark.parametrize("source", ["builder", "multi-head-attention"])
def test_rotation_beats_no_rotation_at_4_bit_activations_on_fused_graphs(
    ort_fused, tokens, tmp_path, source: str
) -> None:
    """The claim rotation exists for, on fused graphs with the fixtures' planted outlier channels: w4a4
    (the KV cache of a builder graph stays float: its RoPE is inside the fused op, so R3 cannot go there)."""
    from rotgraph.evaluate import make_session, run_logits
    from rotgraph.quantize import QuantOptions, quantize_model

    if source == "builder":
        path, folder = FIXTURES / "genai-llama-fp32" / "model.onnx", FIXTURES / "hf-llama"
    else:
        folder, path = ort_fused("llama", True)
    reference = torch_logits(folder, tokens)
    kl = {}
    for rotation in ("none", "quarot"):
        model = io.load_model(path)
        quantize_model(model, QuantOptions("w4a4", rotation=rotation, group=16))
        out = tmp_path / rotation / "model.onnx"
        with io.staged_output(out) as staged:
            io.save_model(model, staged)
        kl[rotation] = mean_kl(reference, run_logits(make_session(out, "disable"), tokens))
    assert kl["quarot"] < kl["none"], kl


def logits_with_kernels(path: Path, tokens: np.ndarray, library: Path | None) -> np.ndarray:
    """Logits from onnxruntime (every graph rewrite disabled) with rotgraph's compiled kernels registered
    (`library`), or on the ONNX function bodies (None)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if library is not None:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input_ids": tokens.astype(np.int64)})[0])


@pytest.fixture(scope="module")
def fused_llama(tmp_path_factory):
    """fused_llama(logit_scale) -> a tiny Llama with its final norm's weights times `logit_scale`, exported
    and fused for onnxruntime (`fuse_for_ort`)."""
    made: dict[float, Path] = {}

    def build(logit_scale: float) -> Path:
        if logit_scale not in made:

            def loud(model: object) -> None:
                model.model.norm.weight.mul_(logit_scale)  # type: ignore[attr-defined]

            root = tmp_path_factory.mktemp("fused-llama")
            made[logit_scale] = fuse_for_ort(edited_export(root, "llama", 3, loud), root / "fused.onnx")
        return made[logit_scale]

    return build


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("logit_scale", [1.0, 3000.0])
def test_rotate_checks_a_fused_graph_alike_with_and_without_the_kernels(
    fused_llama, tmp_path, tokens, monkeypatch, capsys, logit_scale: float, use_kernels: bool
) -> None:
    """A correct rotation of an onnxruntime-fused graph (MultiHeadAttention, SkipSimplifiedLayerNormalization)
    passes `rotgraph rotate`'s float check whether the online Hadamards run on rotgraph's compiled kernels or
    on their function bodies, and its logits match the float ones within float32's rounding tolerance,
    max(1e-3, 2e-4 x max |logit|), stated here apart from `pipeline.default_tolerance`. The final norm scaled
    by 3000 makes logits in the thousands, where the relative part of the tolerance is the one in play."""
    library = kernels.library_path()
    assert library is not None, f"rotgraph's kernels are not built: {kernels.BUILD_HINT}"
    source = fused_llama(logit_scale)
    assert op_counts(io.load_model(source))["MultiHeadAttention"] == 2
    if not use_kernels:
        monkeypatch.setenv("ROTGRAPH_KERNELS", "0")
    out = tmp_path / "rotated" / "model.onnx"
    assert main(["rotate", str(source), "-o", str(out), "--seed", "1"]) == 0, capsys.readouterr().err
    assert "validated: max |logit difference|" in capsys.readouterr().out
    # the check ran where the kernels were registered for the rotated graph's Hadamards exactly when asked
    assert kernels.register(ort.SessionOptions(), out, None) is use_kernels
    assert collections.Counter(n.domain for n in io.load_model(out).graph)["rotgraph"] > 0
    reference = logits_with_kernels(source, tokens, None)
    rotated = logits_with_kernels(out, tokens, library if use_kernels else None)
    scale = float(np.abs(reference).max())
    assert (scale > 1e3) == (logit_scale > 1)
    tolerance = max(1e-3, 2e-4 * scale)
    diff = float(np.abs(rotated.astype(np.float64) - reference).max())
    assert diff <= tolerance, f"max |logit difference| {diff:.3g} > {tolerance:.3g} (max |logit| {scale:.3g})"
