"""The committed exporter fixtures (tests/fixtures/, made by scripts/make_exporter_fixtures.py): each graph
runs in onnxruntime and computes its Hugging Face model, and holds the ops its README lists."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import mean_kl, torch_logits
from onnx import numpy_helper

FIXTURES = Path(__file__).parent / "fixtures"
FLOAT = {"optimum-llama": "hf-llama", "genai-llama-fp32": "hf-llama", "genai-qwen2-fp32": "hf-qwen2"}
BUILDER = ("genai-llama-fp32", "genai-llama-int4", "genai-qwen2-fp32")
ALL = (*FLOAT, "genai-llama-int4")
# Largest logit difference to the Hugging Face model measured on 2026-11-30: 3e-6 (optimum), 6e-6
# (builder Llama), 4e-6 (builder Qwen2), on logits up to about 15.
ATOL = 2e-5


def hf_config(hf: str) -> dict:
    return json.loads((FIXTURES / hf / "config.json").read_text())


def session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(FIXTURES / name / "model.onnx"), options, providers=["CPUExecutionProvider"])


def prefill_feeds(sess: ort.InferenceSession, tokens: np.ndarray, head_dim: int) -> dict[str, np.ndarray]:
    """Feeds for every input the graph declares: the builder's cache width is symbolic (`kv_cache_dim`),
    so it comes from the Hugging Face config."""
    batch, length = tokens.shape
    feeds: dict[str, np.ndarray] = {}
    for arg in sess.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = tokens.astype(np.int64)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((batch, length), np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
        elif arg.name.startswith("past_key_values."):
            assert arg.type == "tensor(float)" and isinstance(arg.shape[1], int), (arg.name, arg.type, arg.shape)
            feeds[arg.name] = np.zeros((batch, arg.shape[1], 0, head_dim), np.float32)
        else:
            raise AssertionError(f"{arg.name}: an input the fixture README does not list")
    return feeds


def run_fixture(name: str, hf: str, tokens: np.ndarray) -> np.ndarray:
    sess = session(name)
    return np.asarray(sess.run(["logits"], prefill_feeds(sess, tokens, hf_config(hf)["head_dim"]))[0])


@pytest.fixture(scope="module")
def reference(tokens) -> dict[str, np.ndarray]:
    return {hf: torch_logits(FIXTURES / hf, tokens) for hf in ("hf-llama", "hf-qwen2")}


@pytest.mark.parametrize("name", FLOAT)
def test_float_graph_computes_the_hugging_face_model(name: str, tokens, reference) -> None:
    hf = FLOAT[name]
    logits = run_fixture(name, hf, tokens)
    assert logits.shape == (*tokens.shape, hf_config(hf)["vocab_size"])
    np.testing.assert_allclose(logits, reference[hf], rtol=0, atol=ATOL)


def test_int4_graph_stays_close_to_the_hugging_face_model(tokens, reference) -> None:
    """RTN int4 (block 32) is not the float model; measured on 2026-11-30: mean KL 0.0127 nats, top-1
    agreement 0.917 (44 of 48 positions)."""
    logits = run_fixture("genai-llama-int4", "hf-llama", tokens)
    assert mean_kl(reference["hf-llama"], logits) < 0.025
    assert (logits.argmax(-1) == reference["hf-llama"].argmax(-1)).mean() >= 0.85


def readme_ops(name: str) -> collections.Counter:
    """The `- ops:` line of the fixture's README section, as (domain, op) counts."""
    section = (FIXTURES / "README.md").read_text().split(f"## `{name}/`", 1)[1].split("\n## ", 1)[0]
    line = re.search(r"^- ops: (.*)$", section, re.MULTILINE)
    assert line, f"README has no ops line for {name}"
    counts: collections.Counter = collections.Counter()
    for op, domain, count in re.findall(r"(\w+)(?: \(([\w.]+)\))? x(\d+)", line.group(1)):
        counts[(domain or "ai.onnx", op)] = int(count)
    return counts


def load(name: str, data: bool = False) -> onnx.ModelProto:
    return onnx.load(str(FIXTURES / name / "model.onnx"), load_external_data=data)


@pytest.mark.parametrize("name", ALL)
def test_graph_holds_the_ops_its_readme_lists(name: str) -> None:
    graph = load(name).graph
    assert collections.Counter((n.domain or "ai.onnx", n.op_type) for n in graph.node) == readme_ops(name)


def test_optimum_graph() -> None:
    model = load("optimum-llama")
    graph = model.graph
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert len(graph.value_info) == 0
    layers = hf_config("hf-llama")["num_hidden_layers"]
    cache = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", *cache]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits", *present]
    # The tied lm_head reads the embedding through a Transpose, not a second copy.
    producer = {out: node for node in graph.node for out in node.output}
    lm_head = producer["logits"]
    assert lm_head.op_type == "MatMul"
    transpose = producer[lm_head.input[1]]
    assert transpose.op_type == "Transpose" and transpose.input[0] == "model.embed_tokens.weight"


def builder_nodes(graph: onnx.GraphProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == op]


@pytest.mark.parametrize("name", BUILDER)
def test_builder_graph_wiring(name: str) -> None:
    hf = "hf-qwen2" if "qwen2" in name else "hf-llama"
    config = hf_config(hf)
    graph = load(name).graph
    layers, heads, kv_heads, head_dim = (
        config[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    # All keys, then all values (optimum interleaves them per layer).
    cache = [f"{{}}.{i}.{kv}" for kv in ("key", "value") for i in range(layers)]
    assert [i.name for i in graph.input] == [
        "input_ids",
        "attention_mask",
        *(c.format("past_key_values") for c in cache),
    ]
    assert [o.name for o in graph.output] == ["logits", *(c.format("present") for c in cache)]
    past = next(i for i in graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in past] == [
        "batch_size",
        kv_heads,
        "past_sequence_length",
        "kv_cache_dim",
    ]
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {i.name: i for i in graph.initializer}

    # One packed QKV projection (plus one packed bias Add for Qwen2) feeds each GroupQueryAttention,
    # which applies the rotary embedding itself; positions come from the attention mask.
    attention = builder_nodes(graph, "GroupQueryAttention")
    assert len(attention) == layers
    for node in attention:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1 and attrs["num_heads"] == heads and attrs["kv_num_heads"] == kv_heads
        assert node.input[1] == node.input[2] == ""
        qkv = producer[node.input[0]]
        if config["model_type"] == "qwen2":
            assert qkv.op_type == "Add" and initializers[qkv.input[1]].dims == [(heads + 2 * kv_heads) * head_dim]
            qkv = producer[qkv.input[0]]
        assert qkv.op_type in ("MatMul", "MatMulNBits")
        assert qkv.op_type == "MatMulNBits" or initializers[qkv.input[1]].dims == [
            config["hidden_size"],
            (heads + 2 * kv_heads) * head_dim,
        ]
        sub = producer[producer[node.input[5]].input[0]]  # seqlens_k = Cast(ReduceSum(mask) - 1)
        assert sub.op_type == "Sub" and producer[sub.input[0]].op_type == "ReduceSum"
        assert producer[sub.input[0]].input[0] == "attention_mask"
        assert initializers[node.input[7]].dims == [config["max_position_embeddings"], head_dim // 2]
    assert len(builder_nodes(graph, "SkipSimplifiedLayerNormalization")) == 2 * layers
    assert len(builder_nodes(graph, "SimplifiedLayerNormalization")) == 1

    # Embedding and lm_head share one initializer.
    lm_head = producer["logits"]
    embedding = next(n for n in graph.node if "input_ids" in n.input)
    if lm_head.op_type == "MatMul":
        assert embedding.op_type == "Gather"
        assert producer[embedding.input[0]].op_type == "Transpose"
        assert producer[embedding.input[0]].input[0] == lm_head.input[1]
    else:
        assert embedding.op_type == "GatherBlockQuantized"
        assert producer[embedding.input[0]].input[0] == lm_head.input[1]
        assert embedding.input[2] == lm_head.input[2]

    genai = json.loads((FIXTURES / name / "genai_config.json").read_text())["model"]["decoder"]
    assert (genai["head_size"], genai["num_key_value_heads"]) == (head_dim, kv_heads)
    assert genai["inputs"]["past_key_names"] == "past_key_values.%d.key"


def codes(weight: np.ndarray, n: int, k: int) -> np.ndarray:
    """MatMulNBits' 4-bit layout: [N, K/block, block/2] bytes, low nibble first."""
    return np.stack([weight & 0x0F, weight >> 4], axis=-1).reshape(n, k)


def test_int4_weights_are_the_round_to_nearest_hugging_face_weights() -> None:
    """Every MatMulNBits weight is the RTN int4 image of its Hugging Face weight: symmetric, zero point 8,
    the scale signed so that each block's largest magnitude lands on code 0 (-8); so its other end may
    clip at code 15 (+7), the one place where the error exceeds half a step."""
    from safetensors.numpy import load_file

    hf = load_file(FIXTURES / "hf-llama" / "model.safetensors")
    graph = load("genai-llama-int4", data=True).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layers = hf_config("hf-llama")["num_hidden_layers"]

    def original(weight_name: str) -> np.ndarray:
        if weight_name.startswith("lm_head"):
            return hf["model.embed_tokens.weight"]
        layer = re.match(r"model\.layers\.(\d+)\.", weight_name).group(1)  # type: ignore[union-attr]
        prefix = f"model.layers.{layer}"
        if ".attn.qkv_proj." in weight_name:
            return np.concatenate([hf[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"])
        if ".attn.o_proj." in weight_name:
            return hf[f"{prefix}.self_attn.o_proj.weight"]
        part = re.search(r"\.mlp\.(\w+_proj)\.", weight_name).group(1)  # type: ignore[union-attr]
        return hf[f"{prefix}.mlp.{part}.weight"]

    nodes = builder_nodes(graph, "MatMulNBits")
    assert len(nodes) == 5 * layers + 1
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4)
        assert len(node.input) == 3, "symmetric: no zero points"
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        weight, scales = init[node.input[1]], init[node.input[2]]
        expected = original(node.input[1]).astype(np.float64)
        assert expected.shape == (n, k)
        scale = np.repeat(scales.astype(np.float64).reshape(n, k // block), block, axis=1)
        q = codes(weight, n, k)
        error = np.abs((q - 8.0) * scale - expected)
        bound = np.where(q == 15, 1.0, 0.5) * np.abs(scale) * (1 + 1e-6)
        assert (error <= bound).all(), node.input[1]
        extreme = np.abs(expected) == np.abs(expected).reshape(n, -1, block).max(-1).repeat(block, 1)
        assert (q[extreme] == 0).all(), node.input[1]
