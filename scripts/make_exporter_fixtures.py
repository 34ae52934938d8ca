"""Regenerate tests/fixtures/: tiny random-weight decoders as the exporters users run leave them.

Run from the project venv: `.venv/bin/python scripts/make_exporter_fixtures.py`. It makes the tiny Hugging
Face folders with `rotgraph.testing.make_tiny_model` (seeded), creates one venv per tool under
build/fixture-venvs/ (the tools pin libraries that conflict with the project's), exports each graph with the
tool's own command line, and writes tests/fixtures/README.md from the graphs it made (ops, inputs, outputs,
sizes), so the README cannot drift from the files. `--only NAME` remakes some fixtures, `--force-venvs`
reinstalls the tool venvs, `--venvs-only` only makes the venvs (tests/test_e2e_exporters.py runs the tools
from them; scripts/test.sh makes them when the e2e tests run). Nothing loads from a model hub (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("make_exporter_fixtures")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
VENVS = ROOT / "build" / "fixture-venvs"

# Sizes the onnxruntime-genai builder accepts and that keep every file small: head_dim 16, grouped-query
# attention (4 query heads on 2 KV heads), and widths that are multiples of the int4 block of 32.
SIZES: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 384,
    "max_position_embeddings": 256,
}


@dataclass(frozen=True)
class Tool:
    """A venv under build/fixture-venvs/ with exact pins, so that a rerun gives the same graphs."""

    name: str
    packages: tuple[str, ...]

    @property
    def python(self) -> Path:
        return VENVS / self.name / "bin" / "python"


# optimum-onnx does not pull onnxruntime; accelerate lets it deduplicate the tied embedding/lm_head.
OPTIMUM = Tool(
    "optimum",
    (
        "optimum-onnx==0.1.0",
        "optimum==2.1.0",
        "transformers==4.57.6",
        "accelerate==1.15.0",
        "onnxruntime==1.32.0",
        "onnx==1.23.2",
        "torch==2.13.0",
    ),
)
# The builder imports onnx_ir without declaring it; it reads transformers 5 folders as they are.
GENAI = Tool(
    "genai",
    (
        "onnxruntime-genai==0.18.0",
        "onnxruntime==1.32.0",
        "onnx==1.23.2",
        "onnx-ir==1.1.0",
        "transformers==5.24.0",
        "torch==2.13.0",
    ),
)

TOOLS = (OPTIMUM, GENAI)


@dataclass(frozen=True)
class Fixture:
    """One exported graph: the tool, its command (a program in the tool's venv; HF, OUT and CACHE stand for
    folders) and what it is."""

    name: str
    hf: str
    tool: Tool
    command: tuple[str, ...]
    about: str


HF_MODELS = {"hf-llama": ("llama", 0), "hf-qwen2": ("qwen2", 1)}

BUILDER = ("python", "-m", "onnxruntime_genai.models.builder", "-i", "HF", "-o", "OUT", "-e", "cpu", "-c", "CACHE")
FIXTURES_MADE = (
    Fixture(
        "optimum-llama",
        "hf-llama",
        OPTIMUM,
        ("optimum-cli", "export", "onnx", "--model", "HF", "--task", "text-generation-with-past", "OUT"),
        "optimum-onnx's export of the Llama: plain ONNX ops, opset 18, KV cache inputs and outputs.",
    ),
    Fixture(
        "genai-llama-fp32",
        "hf-llama",
        GENAI,
        (*BUILDER, "-p", "fp32"),
        "onnxruntime-genai model builder, float32: com.microsoft fused ops, runs in onnxruntime-genai.",
    ),
    Fixture(
        "genai-llama-int4",
        "hf-llama",
        GENAI,
        (*BUILDER, "-p", "int4", "--extra_options", "int4_accuracy_level=4", "int4_block_size=32"),
        "onnxruntime-genai model builder, int4 (RTN, block 32, accuracy level 4): MatMulNBits projections.",
    ),
    Fixture(
        "genai-qwen2-fp32",
        "hf-qwen2",
        GENAI,
        (*BUILDER, "-p", "fp32"),
        "onnxruntime-genai model builder, float32, Qwen2 (Q/K/V biases).",
    ),
)


def run(args: list[str], cwd: Path | None = None) -> str:
    # The builder stamps `git rev-parse HEAD` of whatever repository holds its venv (this one) into the
    # graph's producer_version; the ceiling makes it fall back to its own release commit.
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONHASHSEED": "0",
        "GIT_CEILING_DIRECTORIES": str(VENVS),
    }
    logger.info("$ %s", " ".join(args))
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}")
    return done.stdout


def _pins(tool: Tool) -> tuple[Path, str]:
    """(the stamp file a finished install writes, the pins it must hold)."""
    return VENVS / tool.name / "fixture-pins.txt", "\n".join(tool.packages) + "\n"


def venv_ready(tool: Tool) -> bool:
    """The tool's venv exists and was installed at its current pins."""
    stamp, wanted = _pins(tool)
    return stamp.exists() and stamp.read_text() == wanted and tool.python.exists()


def ensure_venv(tool: Tool, force: bool) -> None:
    stamp, wanted = _pins(tool)
    if not force and venv_ready(tool):
        return
    if force:
        shutil.rmtree(VENVS / tool.name, ignore_errors=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "venv", str(VENVS / tool.name)])
    # --no-compile: no byte-compiling of all of torch and transformers up front (a tool's modules compile on
    # import); timings with and without it are in benchmarks/RESULTS.md (exporters, e2e cost)
    pip = [str(tool.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    run([*pip, *tool.packages])
    stamp.write_text(wanted)


def make_hf(name: str, model_type: str, seed: int) -> Path:
    """The tiny model as a Hugging Face folder that transformers 4.x tools also read."""
    from rotgraph.testing import make_tiny_model

    folder = FIXTURES / name
    shutil.rmtree(folder, ignore_errors=True)
    make_tiny_model(folder, model_type, seed=seed, **SIZES)
    adapt_for_transformers4(folder)
    return folder


def adapt_for_transformers4(folder: Path) -> None:
    """Make a folder saved by transformers 5 readable by transformers 4.x tools, in place: transformers 5
    keeps rope_theta inside rope_parameters and names its tokenizer class TokenizersBackend;
    transformers 4.57 (optimum-onnx, the builder) reads neither."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok.pop("backend", None)
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def export(fixture: Fixture) -> None:
    out = FIXTURES / fixture.name
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        subst = {"HF": str(FIXTURES / fixture.hf), "OUT": str(out), "CACHE": str(Path(tmp) / "cache")}
        program = str(fixture.tool.python.parent / fixture.command[0])
        run([program, *(subst.get(a, a) for a in fixture.command[1:])], cwd=Path(tmp))


def tool_versions(tool: Tool) -> dict[str, str]:
    names = [p.split("==")[0] for p in tool.packages]
    code = "import importlib.metadata as m, sys; print('\\n'.join(n + '==' + m.version(n) for n in sys.argv[1:]))"
    lines = run([str(tool.python), "-c", code, *names]).split()
    return dict(line.split("==") for line in lines)


# ---------------------------------------------------------------------------------------------- README


def describe_graph(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ops = collections.Counter((n.domain or "ai.onnx", n.op_type) for n in graph.node)

    def shape(vi: onnx.ValueInfoProto) -> str:
        t = vi.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
        return f"{onnx.TensorProto.DataType.Name(t.elem_type).lower()}[{', '.join(dims)}]"

    def io(values: list[onnx.ValueInfoProto]) -> list[str]:
        return [f"`{vi.name}` {shape(vi)}" for vi in values]

    opsets = ", ".join(f"{d.domain or 'ai.onnx'} {d.version}" for d in model.opset_import)
    lines = [
        f"- opsets: {opsets}; IR version {model.ir_version}; {len(graph.node)} nodes, "
        f"{len(graph.initializer)} initializers, {len(graph.value_info)} value_info",
        "- inputs: " + "; ".join(io(list(graph.input))),
        "- outputs: " + "; ".join(io(list(graph.output))),
        "- ops: " + ", ".join(f"{op}{'' if d == 'ai.onnx' else f' ({d})'} x{c}" for (d, op), c in sorted(ops.items())),
    ]
    seen: set[str] = set()
    for node in graph.node:
        if node.domain == "com.microsoft" and node.op_type not in seen:
            seen.add(node.op_type)
            attrs = ", ".join(f"{a.name}={onnx.helper.get_attribute_value(a)!r}" for a in node.attribute)
            wiring = ", ".join(i or "''" for i in node.input)
            lines.append(f"- first `{node.op_type}`: attributes {attrs or 'none'}; inputs ({wiring})")
    return lines


README_HEAD = """\
# Exporter fixtures

Tiny random-weight decoders as the tools users run leave them, so the default tests read real exporter
graphs with nothing beyond the project's venv. **Generated by `scripts/make_exporter_fixtures.py`; do
not edit this file or the fixtures by hand.** Regenerate (about a minute; the first run also creates
the tool venvs under `build/fixture-venvs/`):

    .venv/bin/python scripts/make_exporter_fixtures.py            # everything
    .venv/bin/python scripts/make_exporter_fixtures.py --only genai-llama-int4

`tests/test_fixtures.py` checks each graph against its Hugging Face folder (`torch_logits` in
`tests/conftest.py`) and the op inventory below.

## The Hugging Face models

Written by `rotgraph.testing.make_tiny_model` (project venv) with {sizes}: random weights, random RMSNorm
weights, three planted outlier channels in the embedding, tied embedding and lm_head, a byte-level BPE
tokenizer trained on a sample text. For transformers 4.x tools the script adds `rope_theta` at the top
level of `config.json` and names the tokenizer class `PreTrainedTokenizerFast` (transformers 5 wrote
`rope_parameters` only and `TokenizersBackend`).

{hf_rows}
"""

NOTES = """\
## What to know about these graphs

Facts seen in the files above (each is checked in `tests/test_fixtures.py` where a test can check it):

- **Numerics.** On 2 x 24 random token ids, prefill from an empty cache, onnxruntime CPU (optimizations
  off or on alike) against the Hugging Face model in float32: optimum-llama differs by at most about
  3e-6 in the logits, genai-llama-fp32 about 6e-6, genai-qwen2-fp32 about 4e-6 (logits of magnitude up
  to about 15). genai-llama-int4 is the builder's RTN int4, not a float graph: max difference about 1.3,
  mean KL about 0.013 nats, top-1 agreement about 0.92.
- **optimum-llama**: opset 18, IR version 8, no `value_info` at all, 221 `Constant` nodes. The
  projections are anonymous pre-transposed `[in, out]` initializers (`onnx::MatMul_732`...); their module
  paths survive only in node names (`/model/layers.0/self_attn/q_proj/MatMul`). RMSNorm is decomposed as
  Cast, Pow, ReduceMean, Add(eps), Sqrt, Div(1, .), Mul, Cast, Mul(weight) (the weight is the *first*
  Mul input). Rotary is computed in the graph from `position_ids` (inv_freq MatMul, one Cos and one Sin
  shared by the layers, rotate_half as Slice/Neg/Concat); grouped-query heads are repeated with
  Expand/Reshape; attention is MatMul, Add(mask), Softmax, Where(IsNaN), MatMul with the causal and
  padding mask built from `attention_mask`. The tied lm_head is a MatMul on
  `model.embed_tokens.weight_transposed`, made by a Transpose node appended as the last-but-one node
  (optimum's deduplication with accelerate installed; without accelerate it stores a second copy).
  `position_ids` is a required input: feed `arange(sequence_length)` per row.
- **genai-*-fp32**: opset 22 plus com.microsoft, IR version 10, with `value_info` for every
  intermediate. The embedding and lm_head share one initializer, `lm_head.MatMul.weight` `[hidden,
  vocab]`: the lm_head is a MatMul on it and the embedding is a Gather on a Transpose of it. Q, K and V
  are one packed MatMul `[hidden, (heads + 2 kv_heads) * head_dim]` (`attn.qkv_proj`; for Qwen2 followed
  by one Add of the packed bias). The residual stream runs through `SkipSimplifiedLayerNormalization`:
  the first layer's input norm is a plain `SimplifiedLayerNormalization` (registered by onnxruntime in
  the *default* ONNX domain, so `onnx.checker` does not know it), every later norm is a Skip one whose
  output 3 is the residual sum (input + skip) fed to the next Skip norm, and the final norm is a Skip
  norm with one output. The MLP is MatMul, Sigmoid, Mul (SiLU), Mul(up), MatMul.
- **GroupQueryAttention wiring** (builder): input 0 is the packed QKV (inputs 1 and 2, key and value,
  are empty), 3 and 4 the past key/value, 5 `seqlens_k` = ReduceSum(attention_mask, axis 1) - 1 as
  int32, 6 `total_sequence_length` = Shape(attention_mask)[1] as int32, 7 and 8 `cos_cache` /
  `sin_cache` initializers `[max_position_embeddings, head_dim / 2]`; `do_rotary=1`,
  `rotary_interleaved=0`, `scale` = 1/sqrt(head_dim). Positions enter only through the mask: there is
  no `position_ids` input, and the kernel derives each row's positions from `seqlens_k`. Outputs are
  the attention output and `present.N.key|value`.
- **Cache order**: optimum interleaves the cache per layer (`past_key_values.0.key`, `.0.value`,
  `.1.key`...); the builder lists all keys, then all values (`past_key_values.0.key`, `.1.key`,
  `.0.value`, `.1.value`), for inputs and `present.*` outputs alike. Feed by name.
- **Cache shapes** (builder): `past_key_values.N.key|value` are `float[batch_size, kv_heads,
  past_sequence_length, kv_cache_dim]`, the head size is the *symbolic* dimension `kv_cache_dim`, not
  16; `rotgraph.evaluate.empty_cache` refuses that, so take the head size from `genai_config.json`
  (`model.decoder.head_size`) or from the graph's `cos_cache`. `attention_mask` is `[batch_size,
  total_sequence_length]`; `genai_config.json` sets `past_present_share_buffer: true`.
- **genai-llama-int4**: all eleven projections including the lm_head are `MatMulNBits` (bits 4, block
  32, accuracy_level 4, symmetric: no zero-point input, so the default zero point 8), with `uint8`
  weights `[N, K / 32, 16]` (low nibble first) and float scales `[N, K / 32]`. The scales are *signed*:
  each block's largest-magnitude weight lands exactly on code 0 (-8), so the other end of the block may
  clip at code 15 (+7) with an error up to one step; everywhere else the error is at most half a step
  (`tests/test_fixtures.py` checks this against the Hugging Face weights). The embedding is int4 too
  and still shared: a
  `GatherBlockQuantized` (block 32, quantize_axis 1) on a Reshape of the lm_head's `weight_Q4` to
  `[vocab, hidden / 2]`, with the lm_head's scales.
- The Hugging Face folders are the reference for all graphs (`torch_logits(folder, tokens)`); the
  builder and optimum outputs also carry their own copies of the tokenizer.
"""


def folder_size(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return ", ".join(f"`{p.relative_to(folder)}` {p.stat().st_size / 1024:.0f} KB" for p in files)


def write_readme(versions: dict[str, dict[str, str]], notes: str) -> None:
    hf_rows = "\n".join(
        f"- `{name}/`: `{kind}`, seed {seed}; {folder_size(FIXTURES / name)}"
        for name, (kind, seed) in HF_MODELS.items()
    )
    sizes = ", ".join(f"{k}={v}" for k, v in SIZES.items())
    parts = [README_HEAD.format(sizes=sizes, hf_rows=hf_rows)]
    for fixture in FIXTURES_MADE:
        out = FIXTURES / fixture.name
        tool = ", ".join(f"{k} {v}" for k, v in versions[fixture.tool.name].items())
        subst = {"HF": f"tests/fixtures/{fixture.hf}", "OUT": f"tests/fixtures/{fixture.name}", "CACHE": "TMP"}
        command = " ".join(subst.get(a, a) for a in fixture.command)
        parts.append(f"## `{fixture.name}/`\n\n{fixture.about}\n")
        parts.append(f"- tool: {tool} (venv `build/fixture-venvs/{fixture.tool.name}`)")
        parts.append(f"- command: `{command}`")
        parts.append(f"- files: {folder_size(out)}")
        parts.extend(describe_graph(out / "model.onnx"))
        parts.append("")
    parts.append(notes)
    (FIXTURES / "README.md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="fixture names to remake (default: all)")
    parser.add_argument("--force-venvs", action="store_true", help="reinstall the tool venvs")
    parser.add_argument(
        "--venvs-only", action="store_true", help="only create the tool venvs (what the e2e exporter tests run)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.venvs_only:
        for tool in TOOLS:
            ensure_venv(tool, args.force_venvs)
        return
    only = set(args.only or [])
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, (kind, seed) in HF_MODELS.items():
        if not only or name in only:
            make_hf(name, kind, seed)
    versions = {}
    for tool in TOOLS:
        ensure_venv(tool, args.force_venvs)
        versions[tool.name] = tool_versions(tool)
    for fixture in FIXTURES_MADE:
        if not only or fixture.name in only or fixture.hf in only:
            export(fixture)
    write_readme(versions, NOTES)


if __name__ == "__main__":
    main()
