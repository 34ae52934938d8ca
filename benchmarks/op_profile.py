"""Where onnxruntime-genai spends a decode step: kernel time per op type, from onnxruntime's profiler.

    .venv/bin/python benchmarks/op_profile.py --folder "NAME=DIR" [--folder ...] [--prompt 512]
        [--steps 64] [--rounds 3] [--library NAME]

Each folder is loaded by onnxruntime-genai 0.18 (2 intra-op threads, greedy, as benchmarks/genai.py runs
it) with the session's profiler on (`enable_profiling` in the config's session options), fed the first
`--prompt` tokens of the evaluation text, and asked for `--steps` more tokens. The profile's `model_run`
events are the session runs: the first is the prefill, the others one-token decode steps. Each kernel
event (category `Node`) is assigned to the run it lies in; the table gives, per op type, the median over
rounds of the kernel milliseconds per decode step. Ops inlined from an ONNX function body (a rotgraph op
run without rotgraph's kernel library) are counted under the function's name plus ` (body)`, read from
the node name onnxruntime gives inlined nodes. `--library NAME` also registers rotgraph's kernel
library (build/kernels/) in folder NAME's session, whether or not its genai_config names one (`NAME +
library` rows). The folders are profiled in turn in every round (the machine is shared). Prints a
markdown table: op type x model, ms per step, and each model's kernel total and step wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rotgraph import kernels as rotgraph_kernels  # noqa: E402
from rotgraph.text import load_text  # noqa: E402
from rotgraph.tokenize import encode  # noqa: E402

THREADS = 2
WALL = "step wall (model_run)"
TOTAL = "kernel total"


@dataclass
class Row:
    name: str
    folder: Path
    library: bool
    steps: list[dict[str, float]] = field(default_factory=list)  # per round: op -> ms per decode step


def profile(folder: Path, library: bool, prompt: list[int], steps: int, where: Path) -> dict[str, float]:
    """Kernel ms per decode step by op type (plus WALL and TOTAL) of one profiled generation."""
    import onnxruntime_genai as og

    options: dict[str, object] = {
        "intra_op_num_threads": THREADS,
        "enable_profiling": str(where / "profile"),
    }
    if library:
        options["custom_ops_library"] = str(rotgraph_kernels.library_path())
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, min_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    del generator, params, model  # the session writes its profile when it ends
    files = sorted(where.glob("profile*.json"))
    if len(files) != 1:
        raise SystemExit(f"expected one profile in {where}, found {[f.name for f in files]}")
    events = json.loads(files[0].read_text())
    files[0].unlink()
    return per_step(events)


def per_step(events: list[dict]) -> dict[str, float]:  # type: ignore[type-arg]
    """Kernel ms per decode step by op type: every run after the first (the prefill) is a decode step."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    decode = runs[1:]
    if not decode:
        raise SystemExit("the profile holds no decode step")
    starts = [start for start, _ in decode]
    totals: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        index = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if index < 0 or event["ts"] > decode[index][1]:
            continue  # the prefill's
        totals[op_label(event)] += event["dur"]
    result = {op: us / 1000 / len(decode) for op, us in totals.items()}
    result[TOTAL] = sum(totals.values()) / 1000 / len(decode)
    result[WALL] = sum(end - start for start, end in decode) / 1000 / len(decode)
    return result


def op_label(event: dict) -> str:  # type: ignore[type-arg]
    """The op type, or `FUNCTION (body)` for a node onnxruntime inlined from a function body (its node
    names start with `_inlfunc_<function>_`)."""
    name, op = event["name"].removesuffix("_kernel_time"), event["args"].get("op_name", "?")
    if name.startswith("_inlfunc_"):
        function = name.removeprefix("_inlfunc_").split("_")[0]
        return f"{function} (body)"
    return op


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", action="append", required=True, help="NAME=DIR, an onnxruntime-genai folder")
    ap.add_argument("--library", action="append", default=[], help="NAME of a folder to profile with the library")
    ap.add_argument("--tokenizer", default=str(ROOT / "build" / "bench-exporters" / "hf" / "tokenizer.json"))
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens before the decode steps")
    ap.add_argument("--steps", type=int, default=64, help="decode steps")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    folders = dict(f.partition("=")[::2] for f in args.folder)
    unknown = [n for n in args.library if n not in folders]
    if unknown:
        raise SystemExit(f"--library names no --folder: {unknown}")
    if args.library and rotgraph_kernels.library_path() is None:
        raise SystemExit(f"--library: rotgraph's kernels are not built ({rotgraph_kernels.BUILD_HINT})")
    rows = [Row(name, Path(folder).resolve(), False) for name, folder in folders.items()]
    rows += [Row(f"{name} + library", Path(folders[name]).resolve(), True) for name in args.library]
    prompt = list(map(int, encode(Path(args.tokenizer), load_text("evaluation"))[: args.prompt]))
    with tempfile.TemporaryDirectory() as where:
        for round_index in range(args.rounds):
            for row in rows:
                row.steps.append(profile(row.folder, row.library, prompt, args.steps, Path(where)))
                print(f"round {round_index}: {row.name}: {row.steps[-1][WALL]:.2f} ms/step", file=sys.stderr)
    ops = sorted({op for row in rows for step in row.steps for op in step} - {WALL, TOTAL})
    median = {(row.name, op): statistics.median(step.get(op, 0.0) for step in row.steps) for row in rows for op in ops}
    ops.sort(key=lambda op: -max(median[(row.name, op)] for row in rows))
    print(
        f"\n### Kernel ms per decode step after a {args.prompt}-token prompt ({args.steps} steps, onnxruntime-genai, "
        f"{THREADS} threads, median of {args.rounds} rounds)\n"
    )
    print("| op type | " + " | ".join(row.name for row in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{median[(row.name, op)]:.3f}" for row in rows) + " |")
    for key in (TOTAL, WALL):
        cells = [f"{statistics.median(step[key] for step in row.steps):.3f}" for row in rows]
        print(f"| **{key}** | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
