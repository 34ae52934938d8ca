"""rotgraph's onnxruntime-genai folders against the model builder's, all run by onnxruntime-genai.

    .venv/bin/python benchmarks/genai.py [--workdir build/bench-genai] [--reuse] [--rounds 3]
        [--recipe "--weights gptq"] [--windows 8] [--seq-len 512]

From one Hugging Face folder of the default model (build/bench-exporters/hf, made as benchmarks/exporters.py
makes it when missing): the onnxruntime-genai 0.18 model builder's int4 (`-p int4 -e cpu`, RTN block 32,
accuracy level 4) and fp32 folders (in the builder's pinned venv, scripts/make_exporter_fixtures.py), and
rotgraph's export of it (`rotgraph export --with-past`) quantized into `--format genai` folders: float
(`--scheme w16a16 --rotation none`), w4a16 and w4a8 (rotgraph's defaults plus the `--recipe` flags).

Speed: onnxruntime-genai's own generator loop, 2 intra-op threads, greedy; the models are loaded once and
run in turn in every round (the machine is shared), each round starting one model later than the one
before (a fixed order favoured the later models on a loaded machine: RESULTS, genai run 9), median over
rounds. Prefill: the first 512 tokens of
the evaluation text, to its logits. Decode: 128 new tokens after a 7-token prompt, after the 512-token
prompt, and after 896 tokens (context 1024); and `rotgraph generate`'s own loop (onnxruntime, 2 threads) from the 7-token prompt's
text. Quality: perplexity and KL / top-1 to the builder's fp32 graph on `--windows` windows of `--seq-len`
tokens of the evaluation split (`rotgraph.evaluate`, onnxruntime). Nodes per layer: all nodes of the graph
over its layers. Peak RSS: a fresh process per model that loads it and generates 128 tokens after the
512-token prompt. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_exporter_fixtures as fixtures  # noqa: E402

from rotgraph.evaluate import evaluate, windows  # noqa: E402
from rotgraph.genai import model_in  # noqa: E402
from rotgraph.generate import generate  # noqa: E402
from rotgraph.inputs import input_roles  # noqa: E402
from rotgraph.text import load_text  # noqa: E402
from rotgraph.tokenize import encode  # noqa: E402

BIN = Path(sys.executable).parent
THREADS = 2
SHORT_PROMPT = 7  # tokens: the first of the evaluation text
NEW_TOKENS = 128
PREFILL = 512
CONTEXT = 1024  # the longer decode: 128 new tokens after CONTEXT - 128 prompt tokens


@dataclass
class Entry:
    name: str
    folder: Path
    command: str
    prefill: list[float] = field(default_factory=list)  # tokens/s per round
    decode_short: list[float] = field(default_factory=list)
    decode_long: list[float] = field(default_factory=list)
    decode_context: list[float] = field(default_factory=list)  # at CONTEXT tokens
    rotgraph_decode: list[float] = field(default_factory=list)  # `rotgraph generate`'s own loop


def builder(hf: Path, out: Path, precision: str, reuse: bool) -> str:
    extra = ["--extra_options", "int4_accuracy_level=4", "int4_block_size=32"] if precision == "int4" else []
    command = ["-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu"]
    command += ["-c", str(out.parent / "cache"), *extra]
    if not (reuse and (out / "genai_config.json").is_file()):
        fixtures.ensure_venv(fixtures.GENAI, force=False)
        fixtures.run([str(fixtures.GENAI.python), *command], cwd=out.parent)
    return f"python -m onnxruntime_genai.models.builder -i HF -o OUT -p {precision} -e cpu {' '.join(extra)}".strip()


def rotgraph(*args: str) -> None:
    import subprocess

    done = subprocess.run([str(BIN / "rotgraph"), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"rotgraph {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def rotgraph_folders(hf: Path, workdir: Path, recipe: list[str], reuse: bool) -> list[tuple[str, Path, str]]:
    source = workdir / "rotgraph-export" / "model.onnx"
    if not (reuse and source.is_file()):
        rotgraph("export", str(hf), "-o", str(source), "--with-past")
    made = []
    for name, flags in (
        ("rotgraph float", ["--scheme", "w16a16", "--rotation", "none"]),
        ("rotgraph w4a16", ["--scheme", "w4a16", *recipe]),
        ("rotgraph w4a8", ["--scheme", "w4a8", *recipe]),
    ):
        suffix = "".join(recipe).replace("--", "-") if name != "rotgraph float" else ""
        folder = workdir / (name.split()[1] + suffix)  # one folder per recipe, so --reuse keeps each
        if not (reuse and (folder / "genai_config.json").is_file()):
            rotgraph("quantize", str(source), "-o", str(folder), "--format", "genai", *flags)
        made.append((name, folder, "rotgraph quantize EXPORT -o DIR --format genai " + " ".join(flags)))
    return made


def load(folder: Path):  # type: ignore[no-untyped-def]
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    return og.Model(config)


def run(model, prompt: list[int], new: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(prefill seconds, decode seconds for `new` tokens) in onnxruntime-genai's generator."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    count = 0
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    decode = time.perf_counter() - start
    if count != new:
        raise SystemExit(f"the generator made {count} tokens, {new} asked")
    return prefill, decode


RSS_CHILD = """
import json, sys
import numpy as np
import onnxruntime_genai as og
config = og.Config(sys.argv[1])
config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": 2}}}}))
model = og.Model(config)
params = og.GeneratorParams(model)
params.set_search_options(max_length=%d, min_length=%d, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.array(json.loads(sys.argv[2]), dtype=np.int32))
while not generator.is_done():
    generator.generate_next_token()
# VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_rss_mb(folder: Path, prompt: list[int]) -> float:
    """Peak RSS (MB) of a fresh process that loads the folder in onnxruntime-genai and generates 128 tokens
    after `prompt`: what one model costs in memory on its own."""
    import subprocess

    code = RSS_CHILD % (len(prompt) + NEW_TOKENS, len(prompt) + NEW_TOKENS)
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), json.dumps(prompt)], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1]) / 1024


def rotgraph_decode(folder: Path, prompt: str) -> float:
    """Decode tokens/s of `rotgraph generate` (onnxruntime, its own greedy loop) on the folder's model."""
    return generate(model_in(folder), prompt, NEW_TOKENS, threads=THREADS).decode_tokens_per_second


def structure(folder: Path) -> tuple[int, int, float, int]:
    """(nodes, layers, size on disk in MB of the model and its data, KV cache bytes per token)."""
    config = json.loads((folder / "genai_config.json").read_text())
    path = model_in(folder)
    graph = onnx.load(str(path), load_external_data=False).graph
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(path.name)) / 1e6
    roles = input_roles(ir.from_proto(onnx.load(str(path), load_external_data=False)))
    per_token = sum(c.heads * c.width * np.dtype(c.dtype).itemsize for c in roles.caches)
    return len(graph.node), config["model"]["decoder"]["num_hidden_layers"], size, per_token


def _ratio(values: list[float], reference: list[float]) -> str:
    """Median over rounds of this model's rate over the reference's in the same round."""
    if not values or len(values) != len(reference):
        return "-"
    return f"{statistics.median(v / r for v, r in zip(values, reference, strict=True)):.2f}x"


def _median(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=str(ROOT / "build" / "bench-genai"))
    ap.add_argument(
        "--hf", default=str(ROOT / "build" / "bench-exporters" / "hf"), help="Hugging Face folder of the default model"
    )
    ap.add_argument("--reuse", action="store_true", help="keep the folders already in the work folder")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipe", default="", help="extra `rotgraph quantize` flags for w4a16 and w4a8")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="more onnxruntime-genai folders as rows: NAME=FOLDER (e.g. an older build)",
    )
    ap.add_argument("--only-extra", action="store_true", help="rows: builder int4 and the --extra folders only")
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    hf = Path(args.hf).resolve()
    if not (hf / "config.json").is_file():
        from exporters import hf_folder

        hf = hf_folder(hf.parent, reuse=False)
    entries = [
        Entry("builder fp32", workdir / "builder-fp32", builder(hf, workdir / "builder-fp32", "fp32", args.reuse)),
        Entry("builder int4", workdir / "builder-int4", builder(hf, workdir / "builder-int4", "int4", args.reuse)),
    ]
    if args.only_extra:  # the builder's fp32 graph stays, untimed, as the reference of KL
        entries[0].command += " (reference only)"
    else:
        entries += [Entry(*made) for made in rotgraph_folders(hf, workdir, args.recipe.split(), args.reuse)]
    for extra in args.extra:
        name, _, folder = extra.partition("=")
        entries.append(Entry(name, Path(folder).resolve(), "(given folder)"))
    text_ids = encode(hf / "tokenizer.json", load_text("evaluation"))
    long_prompt = list(map(int, text_ids[:PREFILL]))
    context_prompt = list(map(int, text_ids[: CONTEXT - NEW_TOKENS]))
    timed = entries[1:] if args.only_extra else entries
    models = [load(e.folder) for e in timed]
    short_text = Tokenizer.from_file(str(hf / "tokenizer.json")).decode(long_prompt[:SHORT_PROMPT])
    pairs = list(zip(timed, models, strict=True))
    for round_index in range(args.rounds):
        # each round starts one model later: a load that changes within a round favours no model's place
        shift = round_index % len(pairs)
        for entry, model in pairs[shift:] + pairs[:shift]:
            _, short = run(model, long_prompt[:SHORT_PROMPT], NEW_TOKENS)
            prefill, long = run(model, long_prompt, NEW_TOKENS)
            entry.prefill.append(PREFILL / prefill)
            entry.decode_short.append(NEW_TOKENS / short)
            entry.decode_long.append(NEW_TOKENS / long)
            entry.decode_context.append(NEW_TOKENS / run(model, context_prompt, NEW_TOKENS)[1])
            entry.rotgraph_decode.append(rotgraph_decode(entry.folder, short_text))
            print(
                f"round {round_index}: {entry.name}: prefill {entry.prefill[-1]:.0f} tok/s, decode "
                f"{entry.decode_short[-1]:.1f} / {entry.decode_long[-1]:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    del models
    rss = {e.name: peak_rss_mb(e.folder, long_prompt) for e in timed}
    tokens = windows(text_ids, args.windows, args.seq_len)
    scores = evaluate([model_in(e.folder) for e in entries], tokens, progress=False)
    print(
        f"\n### onnxruntime-genai {THREADS} threads, greedy; median of {args.rounds} interleaved rounds; quality on "
        f"{args.windows} x {args.seq_len} tokens, KL to builder fp32\n"
    )
    print(
        f"| model | nodes | nodes/layer | size MB | KV bytes/token | peak RSS MB | prefill tok/s (512) | decode tok/s "
        f"({SHORT_PROMPT} + 128) | decode tok/s (512 + 128) | decode tok/s ({CONTEXT - NEW_TOKENS} + 128) | decode vs "
        f"builder int4 (the three, median of per-round ratios) | rotgraph generate decode tok/s | perplexity | KL | "
        "top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = next(e for e in entries if e.name == "builder int4")
    for entry, score in zip(entries, scores, strict=True):
        nodes, layers, size, per_token = structure(entry.folder)
        kl = f"{score.kl_to_reference:.4f}" if score.kl_to_reference is not None else "-"
        top1 = f"{score.top1_agreement:.3f}" if score.top1_agreement is not None else "-"
        ratios = " / ".join(
            _ratio(getattr(entry, f), getattr(base, f)) for f in ("decode_short", "decode_long", "decode_context")
        )
        memory = f"{rss[entry.name]:.0f}" if entry.name in rss else "-"
        print(
            f"| {entry.name} | {nodes} | {nodes / layers:.1f} | {size:.0f} | {per_token} | {memory} | "
            f"{_median(entry.prefill, 0)} | {_median(entry.decode_short)} | {_median(entry.decode_long)} | "
            f"{_median(entry.decode_context)} | {ratios} | "
            f"{_median(entry.rotgraph_decode)} | {score.perplexity:.2f} | {kl} | {top1} |"
        )
    print("\nCommands:\n")
    for entry in entries:
        print(f"- {entry.name}: `{entry.command}`")


if __name__ == "__main__":
    main()
