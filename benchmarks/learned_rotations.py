"""Learned rotations on the default model: QuaRot, SpinQuant (end to end, and learned with float weights
for GPTQ), the layer-wise learners (kurtosis with and without scaling, output error at w4a4kv4 and, for
GPTQ, at w16a4kv4); RTN and GPTQ weights.

    python benchmarks/learned_rotations.py --model MODEL.onnx --workdir DIR [--e2e-steps 8]
        [--layerwise-steps 60] [--learner-seeds 0 1 2] [--windows 16] [--act-clip search]
        [--act-asymmetric] [--center-keys] [--center-activations] [--calibration-windows 32]
        [--floor-rounds 2] [--floor-batch 4 --floor-seq 512]
        [--floor-steps w4a4kv4 w16a4kv4 w16a4kv4:keep w16a4kv4:nockpt] [--floor-threads 1]

The floor alone: `--seeds --learners --floor-rounds 3` (no learning, no scoring).

Learning runs (`rotgraph learn`, each a child process timed with its peak RSS) write DIR/learned/NAME
.safetensors (NAME@SEED for the layer-wise learners' `--learner-seeds` other than 0, learned with
`--seed SEED`) with NAME.cost.json beside it (a run started ahead of this script, marked NAME.running,
is waited for); quantized models go to DIR/models and scores to
DIR/results.jsonl. Whatever DIR already holds is reused, so an interrupted run continues where it
stopped (the tables say which learning runs came from an earlier invocation). Every quantized model is
built the same way (`quantize_model`, QDQ, groups of 32, 8-bit embedding and lm_head, and the
activations' clip ratio of `--act-clip`, which every row records and the tables print apart); GPTQ's
Hessians are measured once per rotation and shared by both schemes (they are taken on the float
rotated model).
Scores: perplexity, KL and top-1 agreement to float on windows of the evaluation split, which learning
never sees. Last, the floor: seconds per end-to-end learning step (TorchGraph, the learn defaults'
batch) against one forward+backward of the same batch through the Hugging Face model in plain torch,
each in its own child process, alternating round by round. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import measured

from rotgraph import io
from rotgraph.evaluate import evaluate, windows
from rotgraph.quantize import QuantOptions, calibration_tokens, quantize_model
from rotgraph.text import load_text
from rotgraph.tokenize import encode

SCHEMES = ("w4a4kv4", "w4a8")
# name -> (learn arguments, the weight quantizers it is scored with)
LEARNERS = {  # the default order of --learners
    "kurtosis": (["--objective", "kurtosis"], ("rtn", "gptq")),
    "spinquant-w16a4kv4": (["--scheme", "w16a4kv4", "--keep-products"], ("gptq",)),
    "kurtosis-scaling": (["--objective", "kurtosis", "--scaling"], ("rtn", "gptq")),
    "output-error": (["--objective", "output-error"], ("rtn", "gptq")),
    "output-error-w16": (["--objective", "output-error", "--scheme", "w16a4kv4"], ("gptq",)),
    "output-error-w16a8": (["--objective", "output-error", "--scheme", "w16a8"], ("gptq",)),
    "output-error-w16-scaling": (["--objective", "output-error", "--scheme", "w16a4kv4", "--scaling"], ("gptq",)),
    "spinquant-w4a4kv4": (["--scheme", "w4a4kv4"], ("rtn",)),
    "output-error-w16-deployed": (
        ["--objective", "output-error", "--scheme", "w16a4kv4", "--act-asymmetric", "--out-hadamard"],
        ("gptq",),
    ),
    "output-error-w16-centered": (
        ["--objective", "output-error", "--scheme", "w16a4kv4", "--center-activations"],
        ("gptq",),
    ),
}
LABELS = {
    "spinquant-w4a4kv4": "SpinQuant end to end (learned at w4a4kv4, RTN in the loop)",
    "spinquant-w16a4kv4": "SpinQuant (learned at w16a4kv4, float weights) + GPTQ",
    "kurtosis": "kurtosis, layer-wise",
    "kurtosis-scaling": "kurtosis, layer-wise, + scaling",
    "output-error": "output error, layer-wise (learned at w4a4kv4)",
    "output-error-w16": "output error, layer-wise (learned at w16a4kv4) + GPTQ",
    "output-error-w16a8": "output error, layer-wise (learned at w16a8) + GPTQ",
    "output-error-w16-scaling": "output error, layer-wise (learned at w16a4kv4), + scaling, + GPTQ",
    "output-error-w16-deployed": "output error, layer-wise (learned at w16a4kv4, asymmetric activations, "
    "Hadamard before o_proj) + GPTQ",
    "output-error-w16-centered": "output error, layer-wise (learned at w16a4kv4 for centered inputs) + GPTQ",
}


def learned(args: argparse.Namespace, source: Path, folder: Path, name: str) -> dict:
    """The rotation file `name` in `folder`, learned now unless it is there; its cost record. A run
    marked NAME.running (started separately, e.g. ahead of this script) is waited for."""
    out, cost, running = (folder / f"{name}{ext}" for ext in (".safetensors", ".cost.json", ".running"))
    while running.exists() and not cost.is_file():
        time.sleep(30)
    if not (out.is_file() and cost.is_file()):
        base, _, seed = name.partition("@")
        extra = LEARNERS[base][0] + (["--seed", seed] if seed else [])
        steps = args.e2e_steps if name.startswith("spinquant") else args.layerwise_steps
        cmd = [str(Path(sys.executable).parent / "rotgraph"), "learn", str(source), "-o", str(out), *extra]
        cmd += ["--steps", str(steps)]
        if not name.startswith("spinquant"):
            cmd += ["--windows", "8"] + (["--site-tokens", str(args.site_tokens)] if args.site_tokens else [])
        folder.mkdir(parents=True, exist_ok=True)
        done = measured(cmd)
        cost.write_text(json.dumps({"seconds": done["seconds"], "peak_rss_mb": done["peak_rss_mb"]}))
        print(f"learned {name} in {done['seconds']:.0f} s", file=sys.stderr)
    record = json.loads(cost.read_text())
    record["steps"] = int(_meta(out)["steps"])
    record["reused"] = out.stat().st_mtime < args.started
    return record


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}


def build(source: Path, out: Path, options: QuantOptions, calibration: np.ndarray | None, hessians: dict | None):  # type: ignore[no-untyped-def]
    """Quantize `source` into `out` (QDQ) as `rotgraph quantize --no-validate` does; the GPTQ Hessians."""
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.load_model(source)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        found = quantize_model(model, options, calibration, hessians=hessians, scratch=Path(scratch))
        io.save_model(model, out)
    shutil.copy(source.parent / "tokenizer.json", out.parent / "tokenizer.json")
    return found


def candidates(args: argparse.Namespace, folder: Path) -> list[tuple[str, str, QuantOptions]]:
    """(weights, name, options without scheme) in the order they are built: QuaRot's first seed, the
    first learners of `--learners`, QuaRot's other seeds, the other learners (the most wanted rows first
    on a slow machine)."""

    def quarot(seeds: list[int]) -> list[tuple[str, str, QuantOptions]]:
        return [
            (weights, f"quarot-{seed}", QuantOptions(rotation="quarot", seed=seed, weights=weights))
            for seed in seeds
            for weights in ("rtn", "gptq")
        ]

    def learned(names: list[str]) -> list[tuple[str, str, QuantOptions]]:
        out = []
        for base in names:
            for name in seeded(args, base):
                file = str(folder / f"{name}.safetensors")
                opts = [
                    (w, name, QuantOptions(rotation="spinquant", rotations=file, weights=w)) for w in LEARNERS[base][1]
                ]
                out += opts
        return out

    first = args.learners[: args.learners_first]
    return quarot(args.seeds[:1]) + learned(first) + quarot(args.seeds[1:]) + learned(args.learners[len(first) :])


def seeded(args: argparse.Namespace, base: str) -> list[str]:
    """The learning runs of learner `base`: NAME for seed 0, NAME@SEED for the others of `--learner-seeds`
    (end-to-end learners: seed 0 only)."""
    seeds = [0] if base.startswith("spinquant") else args.learner_seeds
    return [base if seed == 0 else f"{base}@{seed}" for seed in seeds]


def score_all(
    args: argparse.Namespace, source: Path, work: Path, tokens: np.ndarray, costs: dict[str, dict]
) -> list[dict]:
    """Build and score every candidate (learning the rotations each needs first, costs into `costs`);
    rows scored before are kept."""
    results_path = work / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    done = [r for r in done if _setting(r) == _setting(vars(args))]
    have = {(r["scheme"], r["weights"], r["name"]) for r in done}
    calibration = calibration_tokens(source, QuantOptions(calibration_windows=args.calibration_windows))
    for weights, name, base in candidates(args, work / "learned"):
        if weights not in args.weights:
            continue
        if name.partition("@")[0] in LEARNERS and name not in costs:
            costs[name] = learned(args, source, work / "learned", name)
        todo = [s for s in args.schemes if (s, weights, name) not in have]
        if not todo:
            continue
        hessians = None
        paths = {}
        for scheme in todo:
            options = dataclasses.replace(
                base,
                scheme=scheme,
                act_clip_search=args.act_clip == "search",
                act_clip=None if args.act_clip in (None, "search") else float(args.act_clip),
                out_hadamard={"auto": None, "on": True, "off": False}[args.out_hadamard],
                act_asymmetric=args.act_asymmetric,
                center_keys=args.center_keys,
                center_activations=args.center_activations,
                calibration_windows=args.calibration_windows,
            )
            out = work / "models" / f"{scheme}-{weights}-{name}-{_tag(args)}" / "model.onnx"
            start = time.perf_counter()
            if not out.is_file():  # else built by an interrupted run of this script
                needs_tokens = (
                    weights == "gptq" or args.act_clip == "search" or args.center_keys or args.center_activations
                )
                found = build(source, out, options, calibration if needs_tokens else None, hessians)
                hessians = found if weights == "gptq" else None
            print(f"built {out.parent.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            paths[scheme] = out
        scored = evaluate([source, *paths.values()], tokens, progress=False)
        with results_path.open("a") as f:
            for scheme, r in zip(paths, scored[1:], strict=True):
                row = {
                    "scheme": scheme,
                    "weights": weights,
                    "name": name,
                    "perplexity": r.perplexity,
                    "kl": r.kl_to_reference,
                    "top1": r.top1_agreement,
                    "float": scored[0].perplexity,
                    **_setting(vars(args)),
                }
                f.write(json.dumps(row) + "\n")
                done.append(row)
        for path in paths.values():
            shutil.rmtree(path.parent)  # 130 MB each; the scores are kept
        print(f"scored {weights} {name}", file=sys.stderr)
    return done


def _label(name: str) -> str:
    base, _, seed = name.partition("@")
    return f"{LABELS[base]}, seed {seed}" if seed else LABELS[base]


def _setting(values: dict) -> dict:
    """The run-wide quantize setting a row was built with (rows from before a setting existed: the value
    that run had, the default clip, no Hadamard before o_proj, uncentered keys and inputs, 32 GPTQ windows)."""
    return {
        "act_clip": values.get("act_clip") or "default",
        "out_hadamard": values.get("out_hadamard", "off"),
        "act_asymmetric": bool(values.get("act_asymmetric", False)),
        "center_keys": bool(values.get("center_keys", False)),
        "center_activations": bool(values.get("center_activations", False)),
        "calibration_windows": int(values.get("calibration_windows", 32)),
    }


def _tag(args: argparse.Namespace) -> str:
    setting = _setting(vars(args))
    grid = "-asym" if setting["act_asymmetric"] else ""
    keys = ("-ck" if setting["center_keys"] else "") + ("-ca" if setting["center_activations"] else "")
    return f"clip{setting['act_clip']}-o{setting['out_hadamard']}{grid}{keys}-cw{setting['calibration_windows']}"


STEP_CHILD = """
import sys, time, json, numpy as np, torch
which, model, batch, seq, steps, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
if threads:
    torch.set_num_threads(threads)
ids = torch.from_numpy(np.random.default_rng(0).integers(0, 49152, size=(batch, seq)))
if which == "torch":
    from rotgraph.export import default_source, load
    net, _ = load(default_source())
    net.train()
    def step():
        net.zero_grad()
        net(input_ids=ids, labels=ids).loss.backward()
else:
    from rotgraph import io
    from rotgraph.learning.end_to_end import RotatedNetwork, learning_graph
    from rotgraph.options import Scheme
    from rotgraph.learning.stiefel import CayleySGD
    m = io.load_model(model)
    scheme = Scheme.parse(which.split(":")[0])
    learning_graph(m, scheme)
    net = RotatedNetwork(
        m, scheme, 32, 16, 0, checkpointing=":nockpt" not in which, keep_products=":keep" in which,
        compile_quantizer=":compile" in which,
    )
    opt = CayleySGD(net.parameters(), lr=0.1)
    def step():
        opt.zero_grad()
        net.loss(ids).backward()
        opt.step()
times = []
for _ in range(steps + 1):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps(times[1:]))
"""


def floor(args: argparse.Namespace, source: Path) -> list[tuple[str, list[float]]]:
    """Seconds per step: plain torch forward+backward of the HF model vs TorchGraph learning steps
    (`--floor-steps`: schemes; SCHEME:nockpt without checkpointing, SCHEME:keep with --keep-products,
    SCHEME:compile with --compile),
    one child process each, alternating over rounds; one warm-up step each."""
    runs: dict[str, list[float]] = {"torch": [], **{which: [] for which in args.floor_steps}}
    for _ in range(args.floor_rounds):
        for which in runs:
            shape = [str(args.floor_batch), str(args.floor_seq), "1", str(args.floor_threads)]
            cmd = [sys.executable, "-c", STEP_CHILD, which, str(source), *shape]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[which] += json.loads(out.stdout.strip().splitlines()[-1])
            print(f"step {which}: {runs[which][-1]:.1f} s", file=sys.stderr)
    return list(runs.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="QuaRot seeds (none: learned rows only)")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    ap.add_argument("--learners", nargs="*", choices=list(LEARNERS), default=list(LEARNERS))
    ap.add_argument("--weights", nargs="+", choices=["rtn", "gptq"], default=["rtn", "gptq"])
    ap.add_argument("--learners-first", type=int, default=2, help="learners scored before QuaRot's other seeds")
    ap.add_argument("--e2e-steps", type=int, default=8)
    ap.add_argument("--layerwise-steps", "--kurtosis-steps", type=int, default=60)
    ap.add_argument(
        "--learner-seeds", nargs="+", type=int, default=[0], help="layer-wise learners: `learn --seed` of each run"
    )
    ap.add_argument("--site-tokens", type=int, help="layer-wise learners (default: learn's, per objective)")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    ap.add_argument("--floor-rounds", type=int, default=2)
    ap.add_argument(
        "--floor-steps",
        nargs="*",
        default=["w4a4kv4", "w16a4kv4"],
        help="SCHEME, SCHEME:nockpt, SCHEME:keep or SCHEME:compile",
    )
    ap.add_argument("--floor-batch", type=int, default=4, help="windows per timed step (learn's default)")
    ap.add_argument("--floor-seq", type=int, default=512)
    ap.add_argument("--floor-threads", type=int, default=0, help="torch threads in the timed steps (0: default)")
    ap.add_argument("--calibration-windows", type=int, default=32, help="GPTQ: 512-token calibration windows")
    ap.add_argument(
        "--act-clip", help="activations' clip ratio for every model, or `search` (quantize's; default: its default)"
    )
    ap.add_argument(
        "--out-hadamard", choices=["auto", "on", "off"], default="auto", help="quantize's (auto: at 4-bit activations)"
    )
    ap.add_argument("--act-asymmetric", action="store_true", help="quantize's (dynamic activations)")
    ap.add_argument("--center-keys", action="store_true", help="quantize's (kv schemes)")
    ap.add_argument("--center-activations", action="store_true", help="quantize's (dynamic activations)")
    args = ap.parse_args()
    args.started = time.time()
    source, work = Path(args.model), Path(args.workdir)
    tokens = windows(encode(source.parent / "tokenizer.json", load_text("evaluation")), args.windows, 512)
    costs: dict[str, dict] = {}
    rows = score_all(args, source, work, tokens, costs)
    steps = floor(args, source) if args.floor_rounds else []
    report(args, rows, costs, steps)


def report(args: argparse.Namespace, rows: list[dict], costs: dict[str, dict], steps: list) -> None:
    if rows:
        scores(args, rows, costs)
    if costs:
        print("\n### Learning cost (`rotgraph learn`, child process, 2 shared CPU cores)\n")
        print("| learner | steps | wall s | peak RSS MB | run |")
        print("|---|---|---|---|---|")
        for name, c in costs.items():
            run = "earlier invocation, same workdir" if c["reused"] else "this invocation"
            print(f"| {_label(name)} | {c['steps']} | {c['seconds']:.0f} | {c['peak_rss_mb']:.0f} | {run} |")
    if steps:
        shape = f"batch {args.floor_batch} x {args.floor_seq}, {args.floor_threads or 'default'} threads"
        print(f"\n### Seconds per end-to-end step against the plain-torch floor ({shape}, alternating rounds)\n")
        print("| step | seconds per round | median | x floor |")
        print("|---|---|---|---|")
        base = statistics.median(dict(steps)["torch"])
        for which, times in steps:
            label = (
                "plain torch forward+backward (HF LlamaForCausalLM, eager)"
                if which == "torch"
                else "TorchGraph learning step, "
                + which.replace(":nockpt", ", no checkpointing").replace(":keep", ", --keep-products")
            )
            print(
                f"| {label} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.median(times):.1f} | "
                f"{statistics.median(times) / base:.2f} |"
            )


def scores(args: argparse.Namespace, rows: list[dict], costs: dict[str, dict]) -> None:
    float_ppl = rows[0]["float"]
    setting = _setting(vars(args))
    print(
        f"\n### Learned rotations ({args.windows} evaluation windows x 512 tokens, groups of 32, activations' "
        f"clip ratio {setting['act_clip']}, Hadamard before o_proj {setting['out_hadamard']}, "
        f"{'asymmetric' if setting['act_asymmetric'] else 'symmetric'} per-token grid, keys "
        f"{'centered' if setting['center_keys'] else 'uncentered'}, projection inputs "
        f"{'centered' if setting['center_activations'] else 'uncentered'}, {setting['calibration_windows']} GPTQ "
        "windows)\n"
    )
    print(
        f"Float perplexity {float_ppl:.2f}. Gap closed: the fraction of QuaRot's mean perplexity gap to float "
        "removed (same scheme and weight quantizer).\n"
    )
    print("| scheme | weights | rotation | learning steps | perplexity | x float | KL to float | top-1 | gap closed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scheme in args.schemes:
        for weights in ("rtn", "gptq"):
            group = {r["name"]: r for r in rows if r["scheme"] == scheme and r["weights"] == weights}
            quarot = [group[f"quarot-{s}"]["perplexity"] for s in args.seeds if f"quarot-{s}" in group]
            if not quarot:
                continue
            mean = statistics.mean(quarot)
            std = statistics.stdev(quarot) if len(quarot) > 1 else 0.0
            kl = statistics.mean(group[f"quarot-{s}"]["kl"] for s in args.seeds if f"quarot-{s}" in group)
            top = statistics.mean(group[f"quarot-{s}"]["top1"] for s in args.seeds if f"quarot-{s}" in group)
            print(
                f"| {scheme} | {weights.upper()} | QuaRot, mean ± std over seeds {args.seeds} | | "
                f"{mean:.2f} ± {std:.2f} | {mean / float_ppl:.2f} | {kl:.3f} | {top:.3f} | |"
            )
            for base in LEARNERS:
                # rows scored by an invocation with other --learners are left out
                names = [n for n in seeded(args, base) if n in group and n in costs]
                for name in names:
                    r = group[name]
                    closed = (mean - r["perplexity"]) / (mean - float_ppl)
                    print(
                        f"| {scheme} | {weights.upper()} | {_label(name)} | {costs[name]['steps']} | "
                        f"{r['perplexity']:.2f} | {r['perplexity'] / float_ppl:.2f} | {r['kl']:.3f} | {r['top1']:.3f} | "
                        f"{100 * closed:.0f}% |"
                    )
                if len(names) > 1:
                    ppl = [group[n]["perplexity"] for n in names]
                    m, sd = statistics.mean(ppl), statistics.stdev(ppl)
                    kl, top = (statistics.mean(group[n][k] for n in names) for k in ("kl", "top1"))
                    print(
                        f"| {scheme} | {weights.upper()} | {LABELS[base]}, mean ± std over {len(names)} seeds | | "
                        f"{m:.2f} ± {sd:.2f} | {m / float_ppl:.2f} | {kl:.3f} | {top:.3f} | "
                        f"{100 * (mean - m) / (mean - float_ppl):.0f}% |"
                    )


if __name__ == "__main__":
    main()
