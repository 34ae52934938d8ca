"""The ort/genai deployment graph: each fusion pass against the unfused graph (onnxruntime, optimizations
disabled, prefill and decode steps), and `quantize --format genai` folders run by onnxruntime-genai."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from rotgraph import io
from rotgraph.cli import main
from rotgraph.evaluate import make_session
from rotgraph.generate import Decoder
from rotgraph.options import QuantOptions
from rotgraph.passes.ort.pack_gate_up import PackGateUpPass
from rotgraph.passes.ort.pack_qkv import PackQKVPass
from rotgraph.passes.ort.restore_ort_norms import RestoreOrtNormsPass
from rotgraph.passes.ort.rotary_attention import RotaryIntoAttentionPass
from rotgraph.passes.ort.shared_kv_buffer import SharedKVBufferPass
from rotgraph.pipeline import run_passes
from rotgraph.stages import quantize_stages

PROMPT = np.array([[5, 17, 200, 31, 7, 64, 3]])
STEPS = [9, 250, 42, 1]


def step_logits(path: Path) -> np.ndarray:
    """Logits of the prompt's last position and of each decode step, optimizations disabled."""
    decoder = Decoder(make_session(path, "disable"))
    rows = [decoder.step(PROMPT)]
    rows += [decoder.step(np.array([[t]])) for t in STEPS]
    return np.stack(rows)


def unfused(source: Path, out: Path, scheme: str, rotation: str) -> Path:
    """The ort-format pipeline without its deployment fusion (nor fused norms)."""
    options = QuantOptions(scheme=scheme, rotation=rotation, fmt="ort", group=16, deployment_fusion=False)
    model = io.load_model(source)
    run_passes(model, [p for s in quantize_stages(options) for p in s.passes])
    out.parent.mkdir(parents=True, exist_ok=True)
    io.save_model(model, out)
    return out


def op_count(path: Path, op_type: str) -> int:
    return sum(n.op_type == op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


FUSIONS: list[tuple[str, Callable[[], object]]] = [
    ("rotary", lambda: RotaryIntoAttentionPass(256)),
    ("pack", PackQKVPass),
    ("gate_up", PackGateUpPass),
    ("shared", SharedKVBufferPass),
    ("norms", lambda: RestoreOrtNormsPass(always=True)),
]


@pytest.mark.parametrize(
    ("model_type", "scheme"),
    [("llama", "w16a16"), ("llama", "w4a16"), pytest.param("qwen2", "w4a8", marks=pytest.mark.slow)],  # Q/K/V biases
)
def test_each_fusion_keeps_the_function(tiny, tmp_path: Path, model_type: str, scheme: str) -> None:
    _, source = tiny(model_type, "dynamo", with_past=True)
    base = unfused(source, tmp_path / "unfused" / "model.onnx", scheme, "quarot")
    reference = step_logits(base)
    model = io.load_model(base)
    for name, make in FUSIONS:
        run_passes(model, [make()])  # type: ignore[list-item]
        path = tmp_path / name / "model.onnx"
        path.parent.mkdir()
        io.save_model(model, path)
        np.testing.assert_allclose(step_logits(path), reference, atol=2e-4 * np.abs(reference).max(), err_msg=name)
    layers = op_count(path, "GroupQueryAttention")
    assert op_count(path, "Slice") == op_count(path, "Neg") == op_count(path, "Cos") == 0  # RoPE inside
    assert op_count(path, "SkipSimplifiedLayerNormalization") == 2 * layers
    projections = "MatMul" if scheme == "w16a16" else "MatMulNBits"
    assert op_count(path, projections) == 4 * layers + 1  # QKV, O, gate-up, down; lm_head
    assert op_count(path, "Split") == layers
    assert op_count(base, projections) == 7 * layers + 1


def swiglu(widths: tuple[int, int] = (6, 6), bias: bool = True, gate_readers: int = 0) -> ir.Model:
    """y = SiLU(x Wg [+ bg]) * (x Wu [+ bu]) built node by node (the bias Adds with the constant first, the
    product's operands swapped); with `gate_readers`, the gate is read by that many more nodes too."""
    rng = np.random.default_rng(7)

    def typed(name: str, shape: tuple[int, ...], constant: bool = False) -> ir.Value:
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
        if constant:
            value.const_value = ir.tensor(rng.normal(size=shape).astype(np.float32), name=name)
        return value

    x, nodes, outputs = typed("x", (2, 3, 8)), [], {}
    for role, width in zip(("gate", "up"), widths, strict=True):
        nodes.append(ir.Node("", "MatMul", [x, typed(f"{role}.weight", (8, width), True)], name=f"{role}_proj"))
        if bias:
            nodes.append(ir.Node("", "Add", [typed(f"{role}.bias", (width,), True), nodes[-1].outputs[0]]))
        outputs[role] = nodes[-1].outputs[0]
        outputs[role].name = f"{role}_out"
    sigmoid = ir.Node("", "Sigmoid", [outputs["gate"]], name="act_sigmoid")
    silu = ir.Node("", "Mul", [sigmoid.outputs[0], outputs["gate"]], name="act_mul")
    product = ir.Node("", "Mul", [outputs["up"], silu.outputs[0]], name="mlp_product")
    for node, name in ((sigmoid, "sigmoid_out"), (silu, "silu_out"), (product, "y")):
        node.outputs[0].name, node.outputs[0].type = name, ir.TensorType(ir.DataType.FLOAT)
    nodes += [sigmoid, silu, product]
    nodes += [ir.Node("", "Identity", [outputs["gate"]], name=f"reader_{i}") for i in range(gate_readers)]
    constants = [v for n in nodes for v in n.inputs if v is not None and v.const_value is not None]
    graph_outputs = [product.outputs[0], *(n.outputs[0] for n in nodes if n.op_type == "Identity")]
    graph = ir.Graph([x], graph_outputs, nodes=nodes, initializers=constants, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def run_disabled(model: ir.Model, path: Path, x: np.ndarray) -> np.ndarray:
    ir.save(model, path)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return np.asarray(ort.InferenceSession(str(path), options).run(["y"], {"x": x})[0])


@pytest.mark.parametrize("bias", [False, True])
def test_gate_up_packing_rule_on_a_swiglu(tmp_path: Path, bias: bool) -> None:
    """PackGateUpPass's rule on one MLP: one MatMul on the gate and up weights side by side (+ their biases),
    a Split feeding the SiLU and the product under their names; the same output; then nothing left to do."""
    x = np.random.default_rng(8).normal(size=(2, 3, 8)).astype(np.float32)
    model = swiglu(bias=bias)
    reference = run_disabled(model, tmp_path / "apart.onnx", x)
    assert PackGateUpPass()(model).modified is True
    ops = [(n.op_type, n.name) for n in model.graph]
    assert ops == [
        ("MatMul", "gate_up_0"),
        *([("Add", "gate_up_0_bias")] if bias else []),
        ("Split", "gate_up_0_split"),
        ("Sigmoid", "act_sigmoid"),
        ("Mul", "act_mul"),
        ("Mul", "mlp_product"),
    ]
    split = next(n for n in model.graph if n.op_type == "Split")
    assert [v.name for v in split.outputs] == ["gate_out_packed", "up_out_packed"]
    kept = [n.outputs[0].name for n in model.graph if n.name.startswith(("act_", "mlp_"))]
    assert kept == ["sigmoid_out", "silu_out", "y"]
    assert set(model.graph.initializers) == {"gate_up_0.weight", *(["gate_up_0.bias"] if bias else [])}
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].producer().name == "mlp_product"
    np.testing.assert_array_equal(run_disabled(model, tmp_path / "packed.onnx", x), reference)
    assert PackGateUpPass()(model).modified is False


@pytest.mark.parametrize(("widths", "gate_readers"), [((6, 4), 0), ((6, 6), 1)])
def test_gate_up_packing_leaves_what_it_cannot_pack(widths: tuple[int, int], gate_readers: int) -> None:
    """Gate and up of different widths (a Split in halves cannot cut them), or a gate read elsewhere too."""
    model = swiglu(widths, gate_readers=gate_readers)
    before = [n.op_type for n in model.graph]
    assert PackGateUpPass()(model).modified is False
    assert [n.op_type for n in model.graph] == before


def genai_run(folder: Path, ids: list[int], new: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the prompt's last logits from onnxruntime-genai's own generator (it runs the
    model for a new token lazily, so only the prompt's logits can be read before sampling)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    logits = np.asarray(generator.get_output("logits"))[0, -1]
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(ids) :], logits


def rotgraph_greedy(model: Path, ids: list[int], new: int) -> tuple[list[int], np.ndarray]:
    decoder = Decoder(make_session(model, "disable"))
    logits = [decoder.step(np.array([ids]))]
    tokens = []
    for _ in range(new):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(decoder.step(np.array([[tokens[-1]]])))
    return tokens, np.stack(logits[:new])


@pytest.fixture(scope="module")
def float_folder(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(Hugging Face folder, exported model, genai folder of the float model without rotation)."""
    hf, source = tiny("llama", "dynamo", with_past=True)
    folder = tmp_path_factory.mktemp("genai-float") / "float"
    args = ["quantize", str(source), "-o", str(folder), "--format", "genai", "--scheme", "w16a16", "--rotation", "none"]
    assert main(args) == 0
    return hf, source, folder


def test_a_float_genai_folder_runs_in_genai_like_the_float_graph(float_folder: tuple[Path, Path, Path]) -> None:
    _, source, folder = float_folder
    for ids in ([5, 17, 200, 31], [300, 2, 99, 150, 7, 64]):
        tokens, logits = genai_run(folder, ids, 10)
        ref_tokens, ref_logits = rotgraph_greedy(source, ids, 10)
        assert tokens == ref_tokens
        np.testing.assert_allclose(logits, ref_logits[0], atol=1e-4 * np.abs(ref_logits[0]).max())


def test_the_genai_config_matches_the_model(float_folder: tuple[Path, Path, Path]) -> None:
    hf, _, folder = float_folder
    hf_config = json.loads((hf / "config.json").read_text())
    config = json.loads((folder / io.GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["num_hidden_layers"] == hf_config["num_hidden_layers"]
    assert decoder["num_attention_heads"] == hf_config["num_attention_heads"]
    assert decoder["num_key_value_heads"] == hf_config["num_key_value_heads"]
    assert decoder["head_size"] == hf_config["hidden_size"] // hf_config["num_attention_heads"]
    assert decoder["hidden_size"] == hf_config["hidden_size"]
    assert config["model"]["vocab_size"] == hf_config["vocab_size"]
    assert config["model"]["context_length"] == hf_config["max_position_embeddings"]
    assert (config["model"]["bos_token_id"], config["model"]["eos_token_id"]) == (
        hf_config["bos_token_id"],
        hf_config["eos_token_id"],
    )
    assert config["search"]["past_present_share_buffer"] is True and config["search"]["do_sample"] is False
    graph = onnx.load(str(folder / decoder["filename"]), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, [o.name for o in graph.output]
    names = decoder["inputs"]
    layers = range(hf_config["num_hidden_layers"])
    expected = {names["input_ids"], names["attention_mask"]}
    expected |= {names[f"past_{kind}_names"] % i for kind in ("key", "value") for i in layers}
    assert inputs == expected
    assert outputs[0] == decoder["outputs"]["logits"]
    assert {decoder["outputs"][f"present_{kind}_names"] % i for kind in ("key", "value") for i in layers} == set(
        outputs[1:]
    )
    for file in (io.TOKENIZER_FILE, "tokenizer_config.json"):
        assert (folder / file).is_file()


def test_generate_and_eval_take_the_folder(float_folder: tuple[Path, Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = float_folder
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(folder), "--windows", "1", "--seq-len", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.slow
def test_a_quantized_folder_with_hadamards_runs_with_and_without_the_kernel_library(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, source = tiny("llama", "dynamo", with_past=True)
    ids = [5, 17, 200, 31, 7]
    folders = {}
    for kernels in ("1", "0"):
        monkeypatch.setenv("ROTGRAPH_KERNELS", kernels)
        folder = tmp_path / f"kernels-{kernels}"
        assert (
            main(
                [
                    "quantize",
                    str(source),
                    "-o",
                    str(folder),
                    "--format",
                    "genai",
                    "--scheme",
                    "w4a16",
                    "--group",
                    "16",
                    "--recipe",
                    "plain",
                ]
            )
            == 0
        )
        folders[kernels] = folder
    library = json.loads((folders["1"] / io.GENAI_CONFIG).read_text())["model"]["decoder"]["session_options"]
    assert library["custom_ops_library"] == "librotgraph_ops.so"  # the kernels are built by setup.sh
    assert (folders["1"] / "librotgraph_ops.so").is_file()
    plain = json.loads((folders["0"] / io.GENAI_CONFIG).read_text())["model"]["decoder"]["session_options"]
    assert "custom_ops_library" not in plain and not (folders["0"] / "librotgraph_ops.so").exists()
    monkeypatch.setenv("ROTGRAPH_KERNELS", "0")
    reference, _ = rotgraph_greedy(folders["0"] / "model.onnx", ids, 8)
    for folder in folders.values():
        tokens, _ = genai_run(folder, ids, 8)
        assert tokens == reference
