"""What passes report and declare: `modified` only when the graph changed, and a pass that reads a result
of an earlier stage (`rotgraph.results.Calibration`) refuses to run before the stage that produces it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from rotgraph import io
from rotgraph.fakequant import ActSpec
from rotgraph.passes import GroupQueryAttentionPass, SmoothQuantPass, UntieEmbeddingPass
from rotgraph.passes.ort.gqa_kv_cache import GqaQuantizedCachePass
from rotgraph.passes.ort.pack_qkv import PackQKVPass
from rotgraph.passes.ort.restore_ort_norms import RestoreOrtNormsPass
from rotgraph.passes.ort.shared_kv_buffer import SharedKVBufferPass
from rotgraph.passes.qdq.standard_ops import StandardOpsPass
from rotgraph.passes.quantization.quantize_activations import QuantizeActivationsPass
from rotgraph.passes.quantization.quantize_weights import QuantizeWeightsPass
from rotgraph.passes.quantization.static_activations import StaticActivationsPass, StaticSpec
from rotgraph.pipeline import canonicalize, run_passes
from rotgraph.quant import WeightSpec
from rotgraph.results import PRODUCERS, Calibration


def norm_graph() -> ir.Model:
    """y = RMSNormalization(x, w) at opset 23, built node by node, every value typed and shaped."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    w = ir.Value(name="w", const_value=ir.tensor(np.linspace(0.5, 2.0, 4, dtype=np.float32), name="w"))
    w.type, w.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([4])
    node = ir.Node("", "RMSNormalization", [x, w], name="norm")
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 4])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w], opset_imports={"": 23}, name="norm")
    return ir.Model(graph, ir_version=10)


def test_standard_ops_reports_a_change_only_when_it_lowers_something() -> None:
    assert StandardOpsPass(23)(norm_graph()).modified is False  # already standard at opset 23
    model = norm_graph()
    assert StandardOpsPass(17)(model).modified is True  # RMSNormalization decomposed, opset lowered
    assert "RMSNormalization" not in {n.op_type for n in model.graph}
    assert StandardOpsPass(17)(model).modified is False  # nothing left to lower


def test_restored_norm_keeps_its_names_and_function(tmp_path) -> None:
    """RestoreOrtNormsPass's rule: RMSNormalization -> SimplifiedLayerNormalization under the node's name,
    its output keeping its name and type; onnxruntime computes the same; a second run changes nothing."""
    import onnxruntime as ort

    x = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
    paths = [tmp_path / "rms.onnx", tmp_path / "simplified.onnx"]
    model = norm_graph()
    ir.save(model, paths[0])
    assert RestoreOrtNormsPass(always=True)(model).modified is True
    (node,) = model.graph
    assert (node.op_type, node.domain, node.name) == ("SimplifiedLayerNormalization", "", "norm")
    assert node.outputs[0] is model.graph.outputs[0] and node.outputs[0].name == "y"
    assert node.outputs[0].dtype == ir.DataType.FLOAT and node.attributes.get_int("stash_type") == 1
    ir.save(model, paths[1])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rms, simplified = (ort.InferenceSession(str(p), options).run(None, {"x": x})[0] for p in paths)
    np.testing.assert_allclose(simplified, rms, rtol=1e-6)
    assert RestoreOrtNormsPass(always=True)(model).modified is False  # no RMSNormalization left


def test_passes_with_nothing_to_do_report_no_change(tiny) -> None:
    _, path = tiny("llama", "dynamo")
    model = io.load_model(path)
    canonicalize(model)
    assert UntieEmbeddingPass()(model).modified is True  # the tiny model ties lm_head to the embedding
    for nothing_to_do in (
        UntieEmbeddingPass(),  # untied now
        GroupQueryAttentionPass(Calibration(attentions=())),  # no attention found to fuse
        SharedKVBufferPass(),  # no GroupQueryAttention
        PackQKVPass(),  # no quantized Q/K/V projections
        RestoreOrtNormsPass(),  # the input had no onnxruntime norms
    ):
        assert nothing_to_do(model).modified is False, type(nothing_to_do).__name__
    assert QuantizeActivationsPass(ActSpec(8))(model).modified is True
    assert QuantizeWeightsPass(WeightSpec(4, True, 16))(model).modified is True


def readers_without_their_producers() -> list[tuple[ir.passes.PassBase, str, str]]:
    """(a pass reading a result, the result, its producer) for a `Calibration` with no results."""
    empty = Calibration()
    return [
        (SmoothQuantPass(empty), "absmax", "CalibratePass('absmax')"),
        (QuantizeWeightsPass(WeightSpec(4, True, 16), "gptq", empty), "hessians", "CalibratePass('hessian')"),
        (QuantizeActivationsPass(ActSpec(4), empty), "clips", "CalibratePass('clip')"),
        (StaticActivationsPass(empty, StaticSpec(8)), "ranges", "CalibrateActivationsPass"),
        (
            StaticActivationsPass(Calibration(ranges={}), StaticSpec(8), wide=16.0),
            "spreads",
            "CalibrateActivationsPass",
        ),
        (GqaQuantizedCachePass(empty, 8), "cache_scales", "CalibrateGqaCachePass"),
        (GroupQueryAttentionPass(empty), "attentions", "FindFusableAttentionPass"),
    ]


@pytest.mark.parametrize(("reader", "result", "producer"), readers_without_their_producers())
def test_a_reader_before_its_producer_is_refused_naming_both(reader, result: str, producer: str) -> None:
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 23}), ir_version=10)
    with pytest.raises(ir.passes.PreconditionError) as refused:
        run_passes(model, [reader])
    message = str(refused.value)
    assert message.startswith(f"{type(reader).__name__} needs ")
    assert f"Calibration.{result}" in message and f"from {producer}; run it first" in message


def test_every_result_names_its_producer() -> None:
    results = {f.name for f in dataclasses.fields(Calibration)} - {"tokens"}
    assert set(PRODUCERS) == results
    assert all(getattr(Calibration(), name) is None for name in results)  # None until produced


def test_gptq_statistics_handed_back_are_reused_without_calibration(tiny) -> None:
    """`quantize_model` returns the Hessians its calibration stage produced; given them back (no tokens),
    the calibration stage is left out and the weights come out the same."""
    from rotgraph.quantize import QuantOptions, quantize_model

    _, path = tiny("llama", "dynamo")
    options = QuantOptions(scheme="w4a16", weights="gptq", group=16, rotation="none")
    first = io.load_model(path)
    hessians = quantize_model(first, options, np.random.default_rng(5).integers(0, 384, size=(2, 32)))
    assert hessians is not None and len(hessians) == 4 * 2  # four input sites in each of two blocks
    again = io.load_model(path)
    returned = quantize_model(again, options, hessians=hessians)
    assert returned is not None and returned.keys() == hessians.keys()
    codes = [name for name in first.graph.initializers if name.endswith(".codes")]
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    assert {f"layers.{block}.{role}.codes" for block in (0, 1) for role in roles} <= set(codes)
    for name in codes:
        ours, theirs = first.graph.initializers[name].const_value, again.graph.initializers[name].const_value
        assert ours is not None and theirs is not None
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
