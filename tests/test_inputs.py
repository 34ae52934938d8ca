"""Input roles by structure (rotgraph.inputs), every command feeding them, and left-padded batches.

The graph under test takes what real exporters' graphs take: input_ids, attention_mask [batch, past +
seq], position_ids and the KV cache (a tiny Llama exported through a wrapper that passes them to the
Hugging Face model). References: the Hugging Face model itself, and each row run alone, unpadded."""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import torch_logits

from rotgraph import io
from rotgraph.cli import main
from rotgraph.errors import RotgraphError
from rotgraph.evaluate import Session, make_session, max_logit_difference, run_logits
from rotgraph.export import cache_names
from rotgraph.generate import generate
from rotgraph.inputs import InputRoles, UnknownInputError, input_roles, read_roles
from rotgraph.padding import left_padded, right_padded
from rotgraph.pipeline import RotateOptions, rotate_model
from rotgraph.quantize import QuantOptions, quantize_model
from rotgraph.structure.summary import summary
from rotgraph.testing import make_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
ROWS = (9, 4, 7)  # prompt lengths of one left-padded batch


def export_with_mask(folder: Path, out: Path, attention: str = "eager", opset: int | None = None) -> Path:
    """The tiny model as optimum exports it: input_ids, attention_mask, position_ids, past -> logits,
    present (torch's dynamo exporter on a wrapper that hands all of them to the Hugging Face model).
    attention="sdpa" with opset 23: ONNX Attention and RotaryEmbedding ops."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention).eval()
    layers = model.config.num_hidden_layers

    class WithMask(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, position_ids, past):  # type: ignore[no-untyped-def]
            cache = DynamicCache(config=self.inner.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    ids = torch.randint(0, 300, (2, 5))
    past = [torch.zeros(2, 1, 7, 16) for _ in range(2 * layers)]
    mask = torch.ones(2, 12, dtype=torch.int64)
    pos = torch.arange(7, 12)[None].expand(2, 5)
    batch, seq, past_len = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    with torch.no_grad():
        program = torch.onnx.export(
            WithMask().eval(),
            (ids, mask, pos, past),
            dynamo=True,
            opset_version=opset,
            input_names=["input_ids", "attention_mask", "position_ids", *cache_names(layers, "past_key_values")],
            output_names=["logits", *cache_names(layers, "present")],
            dynamic_shapes={
                "input_ids": {0: batch, 1: seq},
                "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},
                "position_ids": {0: batch, 1: seq},
                "past": [{0: batch, 2: past_len}] * (2 * layers),
            },
            optimize=True,
            verbose=False,
        )
    assert program is not None
    out.parent.mkdir(parents=True)
    io.save_model(program.model, out)
    shutil.copy(folder / "tokenizer.json", out.parent / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Hugging Face folder, graph with attention_mask and position_ids)."""
    root = tmp_path_factory.mktemp("masked")
    folder = make_tiny_model(root / "hf", "llama")
    return folder, export_with_mask(folder, root / "onnx" / "model.onnx")


def transform(path: Path, out: Path, apply) -> Path:  # type: ignore[no-untyped-def]
    model = io.load_model(path)
    apply(model)
    io.save_model(model, out)
    return out


def renamed(path: Path, out: Path) -> tuple[Path, dict[str, str]]:
    """The graph with every input and output renamed to an opaque name; returns the old -> new map."""
    model = io.load_model(path)
    names = {}
    for i, value in enumerate([*model.graph.inputs, *model.graph.outputs]):
        names[value.name or ""] = value.name = f"t{i}"
    io.save_model(model, out)
    return out, names


def test_roles_come_from_structure_not_names(masked, tmp_path) -> None:
    _, path = masked
    roles = read_roles(path)
    assert (roles.input_ids, roles.attention_mask, roles.position_ids) == (
        "input_ids",
        "attention_mask",
        "position_ids",
    )
    assert [(c.name, c.present) for c in roles.caches] == list(
        zip(cache_names(2, "past_key_values"), cache_names(2, "present"), strict=True)
    )
    opaque, names = renamed(path, tmp_path / "opaque.onnx")
    found = read_roles(opaque)
    assert (found.input_ids, found.attention_mask, found.position_ids) == tuple(
        names[n] for n in ("input_ids", "attention_mask", "position_ids")
    )
    assert [(c.name, c.present) for c in found.caches] == [(names[c.name], names[c.present]) for c in roles.caches]
    assert all((c.heads, c.width, c.dtype) == (1, 16, np.float32) for c in found.caches)


def test_int32_mask_and_positions_are_fed_as_int32(masked, tmp_path) -> None:
    _, path = masked
    model = io.load_model(path)
    for name in ("attention_mask", "position_ids"):
        old = next(v for v in model.graph.inputs if v.name == name)
        new = ir.Value(name=f"{name}_32", shape=old.shape, type=ir.TensorType(ir.DataType.INT32))
        cast = ir.node("Cast", [new], {"to": ir.DataType.INT64})
        old.replace_all_uses_with(cast.outputs[0])
        model.graph.insert_before(model.graph.node(0), cast)
        model.graph.inputs[model.graph.inputs.index(old)] = new
    narrow = tmp_path / "int32.onnx"
    io.save_model(model, narrow)
    roles = read_roles(narrow)
    assert (roles.attention_mask, roles.position_ids) == ("attention_mask_32", "position_ids_32")
    assert roles.int32 == {"attention_mask_32", "position_ids_32"}
    check_padding(narrow, reference=path)


def test_roles_of_rotgraph_exports_and_stored_quantized_caches(tiny, tmp_path) -> None:
    _, plain = tiny("llama")
    assert read_roles(plain) == InputRoles("input_ids")
    _, past = tiny("llama", with_past=True)
    cached = transform(past, tmp_path / "kv4.onnx", lambda m: quantize_model(m, QuantOptions("w4a8kv4", group=16)))
    roles = read_roles(cached)
    assert roles.attention_mask is None and roles.position_ids is None
    stored = [(c.name, c.present, c.width, c.dtype) for c in roles.caches[:3]]
    assert stored == [
        ("past_key_values.0.key", "present.0.key", 8, np.uint8),  # 16 4-bit codes in 8 bytes
        ("past_key_values.0.key_scale", "present.0.key_scale", 1, np.float32),
        ("past_key_values.0.key_zero", "present.0.key_zero", 1, np.uint8),
    ]
    assert len(roles.caches) == 12


@pytest.mark.parametrize("name", ["optimum-llama", "genai-llama-fp32", "genai-llama-int4"])
def test_roles_of_other_exporters(name: str) -> None:
    path = FIXTURES / name / "model.onnx"
    roles = read_roles(path)
    assert roles.input_ids == "input_ids" and roles.attention_mask == "attention_mask"
    assert roles.position_ids == ("position_ids" if name.startswith("optimum") else None)
    assert sorted(c.name for c in roles.caches) == sorted(cache_names(2, "past_key_values"))
    assert all(c.present == "present" + c.name[len("past_key_values") :] for c in roles.caches)
    assert all((c.heads, c.width) == (2, 16) for c in roles.caches)  # the builder's width is symbolic
    # the builder's mask becomes GroupQueryAttention's seqlens_k, which onnxruntime reads as right padding
    assert roles.padding == ("left" if name.startswith("optimum") else "right")
    if roles.padding == "right":
        tokens, mask = left_padded([np.arange(3, 8), np.arange(3, 6)])
        with pytest.raises(RotgraphError, match="rows padded on the left are refused"):
            roles.feeds(tokens, mask)
        tokens, mask = right_padded([np.arange(3, 8), np.arange(3, 6)])
        past = {c.name: np.zeros((2, 2, 5, 16), np.float32) for c in roles.caches}
        with pytest.raises(RotgraphError, match="every new token must be real"):
            roles.feeds(tokens[:, :2], np.concatenate([mask, [[1, 1], [1, 0]]], axis=1), past)


def test_optimum_export_left_padded_and_fused(tmp_path) -> None:
    """optimum's graph (torch SDPA decomposition: Q and K^T scaled apart, a NaN guard after the Softmax)
    takes left-padded rows, eager and with GroupQueryAttention."""
    path = FIXTURES / "optimum-llama" / "model.onnx"
    check_padding(path)
    options = QuantOptions("w16a16", rotation="none", fmt="ort")
    fused = transform(path, tmp_path / "fused.onnx", lambda m: quantize_model(m, options))
    assert [n.op_type for n in io.load_model(fused).graph].count("GroupQueryAttention") == 2
    check_padding(fused, reference=path)


@pytest.mark.parametrize("name", ["optimum-llama", "genai-llama-fp32"])
def test_other_exporters_generate_like_the_hugging_face_model(name: str) -> None:
    path = FIXTURES / name / "model.onnx"
    run = generate(path, "The quick brown fox", 8, optimization="disable")
    assert run.new_tokens == hf_greedy(FIXTURES / "hf-llama", run.prompt_tokens, len(run.new_tokens))
    assert len(run.new_tokens) == 8 or run.stopped_at_eos


def hf_greedy(folder: Path, prompt: list[int], count: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=count, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()[:count]


@pytest.mark.parametrize(("name", "role"), [("attention_mask", "attention_mask"), ("position_ids", "position_ids")])
def test_an_input_that_reaches_nothing_is_taken_by_its_name_only_as_a_fallback(tiny, name: str, role: str) -> None:
    """An integer input whose data reaches no mask or RoPE (unused here) is the mask or the positions only
    under the Hugging Face name; under any other name it is refused."""
    _, past = tiny("llama", with_past=True)
    for label in (name, "extra"):
        model = io.load_model(past)
        shape = ir.Shape(["batch", "total" if role == "attention_mask" else "seq"])
        model.graph.inputs.append(ir.Value(name=label, shape=shape, type=ir.TensorType(ir.DataType.INT64)))
        if label == name:
            assert getattr(input_roles(model), role) == name
        else:
            with pytest.raises(UnknownInputError, match="'extra'"):
                input_roles(model)


def test_an_unknown_input_is_refused_before_any_work(masked, tmp_path, capsys, monkeypatch) -> None:
    _, path = masked
    model = io.load_model(path)
    extra = ir.Value(name="token_type_ids", shape=ir.Shape(["batch", "seq"]), type=ir.TensorType(ir.DataType.INT64))
    model.graph.inputs.append(extra)
    folder = tmp_path / "extra"
    folder.mkdir()
    io.save_model(model, folder / "model.onnx")
    with pytest.raises(UnknownInputError, match=r"'token_type_ids'.*token ids, attention mask, position ids"):
        input_roles(model)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started")

    monkeypatch.setattr("rotgraph.pipeline.rotate_model", no_work)
    monkeypatch.setattr("rotgraph.quantize.quantize_model", no_work)
    for command in ("rotate", "quantize"):
        assert main([command, str(folder / "model.onnx"), "-o", str(tmp_path / command / "m.onnx")]) == 1
        err = capsys.readouterr().err
        assert "'token_type_ids'" in err and "no role rotgraph knows" in err and "Traceback" not in err
        assert not (tmp_path / command).exists()


def per_row_reference(path: Path, rows: list[np.ndarray]) -> list[np.ndarray]:
    """Each row run alone, unpadded (mask all ones, positions 0..n-1), optimizations off."""
    session = make_session(path, "disable")
    return [run_logits(session, row[None])[0] for row in rows]


def padded_prefill_and_step(path: Path, rows: list[np.ndarray], nxt: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits of the padded batch of `rows` (on the side the graph takes, `InputRoles.pad`) at each row's
    real positions, then of one decode step feeding `nxt` [batch] with the prefill's present cache and the
    mask grown by one column."""
    session = make_session(path, "disable")
    assert isinstance(session, Session)
    roles = session.roles
    tokens, mask = roles.pad(rows)
    names = [o.name for o in session.get_outputs()]
    prefill = dict(zip(names, session.run(None, roles.feeds(tokens, mask)), strict=True))
    grown = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
    feeds = roles.feeds(nxt[:, None], grown, past=roles.next_past(prefill))
    step = dict(zip(names, session.run(None, feeds), strict=True))
    real = [logits[m.astype(bool)] for logits, m in zip(prefill[names[0]], mask, strict=True)]
    return real, step[names[0]][:, -1]


def check_padding(path: Path, reference: Path | None = None, atol: float = 1e-4) -> None:
    """A padded prefill and one decode step give each row's own logits at its real positions."""
    rng = np.random.default_rng(7)
    rows = [rng.integers(3, 384, n) for n in ROWS]
    nxt = rng.integers(3, 384, len(rows))
    logits, step = padded_prefill_and_step(path, rows, nxt)
    alone = per_row_reference(reference or path, [np.append(r, t) for r, t in zip(rows, nxt, strict=True)])
    for i in range(len(rows)):
        scale = np.abs(alone[i]).max()
        np.testing.assert_allclose(logits[i], alone[i][:-1], atol=atol * scale)
        np.testing.assert_allclose(step[i], alone[i][-1], atol=atol * scale)


def test_builder_graph_takes_right_padded_rows(tmp_path) -> None:
    """onnxruntime-genai's builder graph (mask -> seqlens_k inside the graph, RoPE positions from it): a
    right-padded batch, prefill and one decode step, gives each row's logits run alone, unrotated and
    rotated. The check can fail: the same rows padded on the left (fed past the refusal) come out wrong."""
    path = FIXTURES / "genai-llama-fp32" / "model.onnx"
    check_padding(path)
    rotated = transform(path, tmp_path / "rotated.onnx", lambda m: rotate_model(m, RotateOptions(seed=3)))
    check_padding(rotated, reference=path)
    session = make_session(path, "disable")
    rng = np.random.default_rng(7)
    rows = [rng.integers(3, 384, n) for n in ROWS]
    tokens, mask = left_padded(rows)
    wrong = session.run(None, replace(session.roles, padding="left").feeds(tokens, mask))[0]
    short = max(ROWS) - ROWS[1]
    assert np.abs(wrong[1, short:] - per_row_reference(path, rows)[1]).max() > 1e-2


def cache_into_attention(path: Path, out: Path) -> Path:
    """The graph with each ONNX Attention reading its cache itself: the new key and value, the past at its
    past_key/past_value operands (4, 5) and the presents from its outputs 1 and 2, instead of the exported
    Concat(past, new) -> present before the op (grouped-query heads: the op repeats them itself)."""
    model = io.load_model(path)
    graph = model.graph
    outputs = set(map(id, graph.outputs))
    caches = [n for n in graph if n.op_type == "Concat" and id(n.outputs[0]) in outputs]

    def concat_before(value: ir.Value) -> ir.Node:
        stack: list[ir.Value] = [value]
        while stack:
            producer = stack.pop().producer()
            if producer in caches:
                return producer
            stack += [i for i in (producer.inputs if producer is not None else []) if i is not None]
        raise AssertionError(f"no cache Concat before {value.name}")

    for node in [n for n in graph if n.op_type == "Attention"]:
        key, value = concat_before(node.inputs[1]), concat_before(node.inputs[2])  # type: ignore[arg-type]
        operands = [node.inputs[0], key.inputs[1], value.inputs[1], node.inputs[3], key.inputs[0], value.inputs[0]]
        fused = ir.node("Attention", operands, dict(node.attributes), num_outputs=3)
        graph.insert_after(node, fused)
        node.outputs[0].replace_all_uses_with(fused.outputs[0])
        for old, present in zip((key.outputs[0], value.outputs[0]), fused.outputs[1:], strict=True):
            present.shape, present.type, name = old.shape, old.type, old.name
            old.name = f"{name}_concat"
            present.name = name
            graph.outputs[graph.outputs.index(old)] = present
        graph.remove(node, safe=True)
    io.save_model(model, out)
    shutil.copy(path.parent / "tokenizer.json", out.parent / "tokenizer.json")
    return out


@pytest.mark.slow
def test_onnx_attention_takes_its_mask_and_cache_by_role(tmp_path) -> None:
    """torch's opset-23 export: ONNX Attention (its mask operand a boolean mask made from attention_mask) and
    ONNX RotaryEmbedding (positions operand 3): the roles are found, and a left-padded batch, prefill and one
    decode step, gives each row's own logits (the reference: each row alone through the eager export of the
    same model). Then the cache moved into the op's past/present slots: the same."""
    folder = make_tiny_model(tmp_path / "hf", "llama")
    eager = export_with_mask(folder, tmp_path / "eager" / "model.onnx")
    path = export_with_mask(folder, tmp_path / "attention" / "model.onnx", attention="sdpa", opset=23)
    ops = [(n.op_type, n.domain) for n in io.load_model(path).graph]
    assert ops.count(("Attention", "")) == 2 and ("RotaryEmbedding", "") in ops
    assert read_roles(path) == read_roles(eager)
    check_padding(path, reference=eager)
    (tmp_path / "inside").mkdir()
    inside = cache_into_attention(path, tmp_path / "inside" / "model.onnx")
    model = io.load_model(inside)
    assert all(o.producer().op_type == "Attention" for o in model.graph.outputs[1:])  # type: ignore[union-attr]
    assert read_roles(inside) == read_roles(eager)
    check_padding(inside, reference=eager)


@pytest.mark.slow
def test_onnx_attention_graphs_rotate_exactly(tmp_path) -> None:
    """torch's opset-23 export (ONNX Attention, RoPE outside it) is discovered by the inputs its projections
    reach: R1-R4 rotate it (R3 on Q and K after RoPE) and a left-padded batch, prefill and a decode step,
    gives each row's logits of the eager export of the same model; also with the cache inside the op."""
    folder = make_tiny_model(tmp_path / "hf", "llama")
    eager = export_with_mask(folder, tmp_path / "eager" / "model.onnx")
    path = export_with_mask(folder, tmp_path / "attention" / "model.onnx", attention="sdpa", opset=23)
    (tmp_path / "inside").mkdir()
    inside = cache_into_attention(path, tmp_path / "inside" / "model.onnx")
    for source in (path, inside):
        model = io.load_model(source)
        desc = rotate_model(model, RotateOptions(seed=3))
        assert "fused ai.onnx Attention (separate Q/K/V MatMuls, RoPE outside)" in summary(desc)
        counts = Counter(n.op_type for n in model.graph)
        assert counts["Attention"] == 2 and counts["Hadamard"] == 2 * (2 + 1)  # R3 on Q and K, R4
        rotated = tmp_path / f"rotated-{source.parent.name}.onnx"
        io.save_model(model, rotated)
        check_padding(rotated, reference=eager)


def test_the_masked_graph_matches_the_hugging_face_model(masked) -> None:
    folder, path = masked
    tokens = np.random.default_rng(3).integers(3, 384, (2, 11))
    np.testing.assert_allclose(
        run_logits(make_session(path, "disable"), tokens), torch_logits(folder, tokens), atol=1e-4
    )


def test_left_padding_float_graph(masked) -> None:
    check_padding(masked[1])


def test_left_padding_rotated_graph(masked, tmp_path) -> None:
    _, path = masked
    rotated = transform(path, tmp_path / "rot.onnx", lambda m: rotate_model(m, RotateOptions(seed=2)))
    check_padding(rotated, reference=path)  # the float graph's rows: rotation changes no logit
    check_padding(rotated)


@pytest.mark.parametrize("fmt", ["qdq", "ort"])  # ort: MatMulNBits and GroupQueryAttention
def test_left_padding_quantized_graph(masked, tmp_path, fmt: str) -> None:
    _, path = masked
    options = QuantOptions("w4a8", group=16, fmt=fmt)
    out = transform(path, tmp_path / "w4a8.onnx", lambda m: quantize_model(m, options))
    ops = [n.op_type for n in io.load_model(out).graph]
    assert ops.count("GroupQueryAttention") == (2 if fmt == "ort" else 0)
    check_padding(out)


def test_padding_moves_the_logits_when_the_mask_is_ignored(masked) -> None:
    """The padding check can fail: the same padded batch with an all-ones mask and plain positions."""
    _, path = masked
    rng = np.random.default_rng(7)
    rows = [rng.integers(3, 384, n) for n in ROWS]
    tokens, _ = left_padded(rows)
    unmasked = run_logits(make_session(path, "disable"), tokens)
    alone = per_row_reference(path, rows)
    assert np.abs(unmasked[1, max(ROWS) - ROWS[1] :] - alone[1]).max() > 1e-2


def test_group_query_attention_with_a_padding_mask_equals_eager(masked, tmp_path) -> None:
    _, path = masked
    options = QuantOptions("w16a16", rotation="none", fmt="ort")
    fused = transform(path, tmp_path / "fused.onnx", lambda m: quantize_model(m, options))
    eager = transform(
        path, tmp_path / "eager.onnx", lambda m: quantize_model(m, replace(options, fused_attention=False))
    )
    ops = [n.op_type for n in io.load_model(fused).graph]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    assert read_roles(fused) == read_roles(eager) == read_roles(path)
    check_padding(fused, reference=eager)
    check_padding(fused, reference=path)
    # without the mask as attention_bias (seqlens_k alone), a left-padded row is wrong
    model = io.load_model(fused)
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.replace_input_with(10, None)  # type: ignore[arg-type]  # RoPE's cos/sin caches (7, 8) stay
    biasless = tmp_path / "biasless.onnx"
    io.save_model(model, biasless)
    with pytest.raises(AssertionError):
        check_padding(biasless, reference=eager)
    # validation (rotate's and quantize's) includes a left-padded row, so it sees the difference too
    text = np.random.default_rng(5).integers(3, 384, (1, 32))
    assert max_logit_difference(eager, fused, text) < 1e-4
    assert max_logit_difference(eager, biasless, text) > 1e-2
    assert max_logit_difference(eager, biasless, np.random.default_rng(5).integers(3, 384, (1, 4))) < 1e-4


def test_every_command_feeds_the_masked_graph(masked, tmp_path, capsys) -> None:
    folder, path = masked
    rotated, quantized = tmp_path / "r" / "m.onnx", tmp_path / "q" / "m.onnx"
    assert main(["rotate", str(path), "-o", str(rotated)]) == 0, capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                str(path),
                "-o",
                str(quantized),
                "--scheme",
                "w4a8",
                "--group",
                "16",
                "--recipe",
                "plain",
                "--activations",
                "static",
            ]
        )
        == 0
    )
    assert main(["eval", str(path), str(rotated), "--windows", "2", "--seq-len", "16"]) == 0, capsys.readouterr().err
    assert main(["inspect", str(path), "--windows", "1", "--seq-len", "16"]) == 0, capsys.readouterr().err
    runs = [generate(p, "The quick brown fox", 8, optimization="disable") for p in (path, rotated)]
    assert runs[0].new_tokens == runs[1].new_tokens == hf_greedy(folder, runs[0].prompt_tokens, 8)
