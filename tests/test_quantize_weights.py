"""A shared (tied) quantized embedding and lm_head: what onnxruntime computes from the shared codes equals
the numpy dequantization, with and without a rotation between the two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ort_logits

from rotgraph import io
from rotgraph.errors import RotgraphError
from rotgraph.options import QuantOptions
from rotgraph.passes.canonical.untie_embedding import embedding_map
from rotgraph.passes.rotation.rotate_residual import residual_rotation
from rotgraph.pipeline import canonicalize, rotate_model
from rotgraph.quant import WeightSpec, quantize_rtn
from rotgraph.quantize import quantize_model
from rotgraph.stages import rotate_options
from rotgraph.structure import discover
from rotgraph.weights import read_float64, rewrite_initializer


def _float_table(path: Path) -> np.ndarray:
    model = io.load_model(path)
    return read_float64(canonicalize(model).embedding_table)


def _levels_to_float(model: ir.Model) -> None:
    """Float compute in every MatMulNBits, so the codes and scales are checked exactly."""
    for n in model.graph:
        if n.op_type == "MatMulNBits":
            n.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 0)


@pytest.mark.parametrize(("bits", "full_range"), [(4, False), (8, False), (4, True)])
def test_gather_block_quantized_rows_are_the_numpy_dequantized_rows(
    tiny, tmp_path, bits: int, full_range: bool
) -> None:
    """The embedding's GatherBlockQuantized, reading the lm_head's MatMulNBits codes through a Reshape,
    returns quantize_rtn's dequantized rows of the float table for every token id (negative scales too)."""
    _, path = tiny("llama", "dynamo")
    expected = quantize_rtn(_float_table(path), WeightSpec(bits, True, 16, full_range=full_range)).dequantize()
    model = io.load_model(path)
    options = QuantOptions(
        scheme="w4a16", rotation="none", group=16, fmt="ort", head_bits=bits, shared_head=True, full_range=full_range
    )
    quantize_model(model, options)
    ops = [n.op_type for n in model.graph]
    # 14 projections (gate and up packed into one: 12) + lm_head
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 13
    lookup = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.outputs[0] in model.graph.outputs)
    assert lookup.inputs[0].producer().inputs[0] is head.inputs[1]  # one copy of the codes
    assert lookup.inputs[2] is head.inputs[2]  # and of the scales
    model.graph.outputs.append(lookup.outputs[0])
    out = tmp_path / "q.onnx"
    io.save_model(model, out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.arange(expected.shape[0], dtype=np.int64)[None, :]
    feeds = {i.name: ids for i in session.get_inputs() if i.name == "input_ids"}
    rows = session.run([lookup.outputs[0].name], feeds)[0][0]
    np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
def test_a_rotated_model_shares_one_table_through_q_t_diag_g_q(tiny, tokens, tmp_path, fmt: str) -> None:
    """QuaRot unties the pair (E Q for the embedding, Q^T diag(g) E^T for lm_head, g the final norm's scale);
    the shared head quantizes E Q once and lm_head reads x M (E Q)^T. Reference: the rotated float model
    with every projection replaced by its numpy RTN dequantization, the table by that of E Q and lm_head
    by M deq(E Q)^T, with M = Q^T diag(g) Q built from the seeded R1 and the norm weight (not fitted)."""
    _, path = tiny("llama", "dynamo")
    options = QuantOptions(scheme="w4a16", group=16, fmt=fmt, head_bits=4, shared_head=True)
    model = io.load_model(path)
    quantize_model(model, options)
    assert sum(n.op_type == "Gather" for n in model.graph) == int(fmt == "qdq")
    out = tmp_path / "q.onnx"
    _levels_to_float(model)
    io.save_model(model, out)

    float_model = io.load_model(path)
    gamma = read_float64(canonicalize(io.load_model(path)).final_norm.scale)
    rotate_model(float_model, rotate_options(options))
    desc = discover(float_model)
    spec, head = WeightSpec(4, True, 16), WeightSpec(4, True, 16)
    for block in desc.blocks:
        a, m = block.attention, block.mlp
        for lin in (a.q, a.k, a.v, a.o, m.gate, m.up, m.down):
            rewrite_initializer(lin.weight, lambda w: quantize_rtn(w.T, spec).dequantize().T)
    table = quantize_rtn(read_float64(desc.embedding_table), head).dequantize()
    q, _ = residual_rotation(desc.hidden_size, options.seed)
    mix = q.T @ np.diag(gamma) @ q
    rewrite_initializer(desc.embedding_table, lambda _: table)
    rewrite_initializer(desc.lm_head.weight, lambda _: mix @ table.T)
    reference = tmp_path / "reference.onnx"
    io.save_model(float_model, reference)
    np.testing.assert_allclose(ort_logits(out, tokens), ort_logits(reference, tokens), rtol=1e-4, atol=1e-4)


def test_embedding_map_recovers_the_map_and_refuses_an_unrelated_head() -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((200, 12))
    mix = rng.standard_normal((12, 12))
    np.testing.assert_allclose(embedding_map(table, mix @ table.T), mix, atol=1e-10)
    with pytest.raises(RotgraphError, match="not a linear map of the embedding table"):
        embedding_map(table, rng.standard_normal((12, 200)))


def test_a_float_shared_head_is_refused_before_any_work() -> None:
    with pytest.raises(RotgraphError, match=r"pass --set weights\.head_bits=8 \(or 4\)"):
        QuantOptions(head_bits=16, shared_head=True)


def test_full_range_uses_every_code_and_never_raises_the_error() -> None:
    """Per group, the full-range search keeps the old scale unless the signed one (the extreme on code -8)
    quantizes the group with less squared error; both dequantize from codes on the 4-bit grid."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 96)) * rng.uniform(0.1, 3.0, size=(64, 1))
    plain = quantize_rtn(w, WeightSpec(4, True, 32))
    full = quantize_rtn(w, WeightSpec(4, True, 32, full_range=True))
    error = [((q.dequantize() - w) ** 2).reshape(64, 3, 32).sum(-1) for q in (plain, full)]
    assert (error[1] <= error[0] + 1e-12).all() and error[1].sum() < 0.95 * error[0].sum()
    assert full.codes.min() >= -8 and full.codes.max() <= 7 and (full.scales < 0).any()
    # without the clipping search every group's largest-magnitude weight sits on code -8, dequantized exactly
    exact = quantize_rtn(w, WeightSpec(4, True, 32, clip_search=False, full_range=True))
    at = np.abs(w.reshape(64, 3, 32)).argmax(-1)[..., None]
    assert (np.take_along_axis(exact.codes.reshape(64, 3, 32), at, -1) == -8).all()
    extreme = np.take_along_axis(w.reshape(64, 3, 32), at, -1)
    np.testing.assert_allclose(np.take_along_axis(exact.dequantize().reshape(64, 3, 32), at, -1), extreme, rtol=1e-12)
