"""Which weight-quantization recipe beats the onnxruntime-genai builder's own int4 model on quality at its size.

    .venv/bin/python benchmarks/genai_quality.py [--workdir build/genai-quality] [--windows 8] [--reuse]

From one Hugging Face folder of SmolLM2-135M-Instruct (made as benchmarks/exporters.py makes it), the
onnxruntime-genai 0.18 model builder, in its pinned venv, writes the float32 graph (`-p fp32 -e cpu`) and
its int4 model (`-p int4 -e cpu`, symmetric RTN in blocks of 32, accuracy level 4, embedding and lm_head
one shared 4-bit table): the peer row. Every candidate is `rotgraph quantize` of the builder's float graph
with the command-line flags in its row (the flags are parsed by rotgraph's own parser), in the onnxruntime
format. All models are scored against the float graph on the same windows of the evaluation split
(which calibration never sees), the models interleaved window by window: perplexity, KL to float, top-1
agreement, size on disk (model + external data). GPTQ calibrates once per rotation setting (32 windows of
the calibration split) and every GPTQ candidate of that setting reuses the Hessians, kept in the work
folder (`--reuse` keeps them and the models already built, with the build times recorded when they were
built). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import size_mb
from exporters import hf_folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import make_exporter_fixtures as fixtures  # noqa: E402

from rotgraph import io  # noqa: E402
from rotgraph.calibrate import Site  # noqa: E402
from rotgraph.cli import parser  # noqa: E402
from rotgraph.commands import quant_config  # noqa: E402
from rotgraph.config import to_options  # noqa: E402
from rotgraph.evaluate import evaluate, windows  # noqa: E402
from rotgraph.options import QuantOptions  # noqa: E402
from rotgraph.quantize import calibration_tokens, quantize_model  # noqa: E402
from rotgraph.recipes import resolve  # noqa: E402
from rotgraph.text import load_text  # noqa: E402
from rotgraph.tokenize import encode  # noqa: E402

BUILDER = ("-m", "onnxruntime_genai.models.builder", "-e", "cpu")
BUILDER_INT4 = ("-p", "int4", "--extra_options", "int4_accuracy_level=4", "int4_block_size=32")

# name, `rotgraph quantize` flags (on top of --format ort --recipe plain: the defaults these rows were measured with)
CANDIDATES = (  # in the order they are built (a GPTQ build takes minutes on a busy machine)
    ("RTN, builder-like", "--scheme w4a8 --rotation none --set weights.head_bits=4 --set weights.shared_head=true"),
    ("QuaRot + RTN", "--scheme w4a8 --set weights.head_bits=4 --set weights.shared_head=true"),
    ("QuaRot + GPTQ", "--scheme w4a8 --weights gptq --set weights.head_bits=4 --set weights.shared_head=true"),
    ("GPTQ", "--scheme w4a8 --rotation none --weights gptq --set weights.head_bits=4 --set weights.shared_head=true"),
    (
        "QuaRot + GPTQ g64, 8-bit head",
        "--scheme w4a8 --weights gptq --group 64 --set weights.head_bits=8 --set weights.shared_head=true",
    ),
    (
        "QuaRot + GPTQ, full range",
        "--scheme w4a8 --weights gptq --set weights.full_range=true --set weights.head_bits=4 --set weights.shared_head=true",
    ),
    (
        "QuaRot + GPTQ g64, full range, 8-bit head",
        "--scheme w4a8 --weights gptq --set weights.full_range=true --group 64 --set weights.head_bits=8 --set weights.shared_head=true",
    ),
    (
        "RTN, full range",
        "--scheme w4a8 --rotation none --set weights.full_range=true --set weights.head_bits=4 --set weights.shared_head=true",
    ),
    ("QuaRot + RTN, 8-bit untied head (old default)", "--scheme w4a8"),
    (
        "QuaRot + GPTQ, asymmetric",
        "--scheme w4a8 --weights gptq --set weights.symmetric=false --set weights.head_bits=4 --set weights.shared_head=true",
    ),
    (
        "RTN, asymmetric",
        "--scheme w4a8 --rotation none --set weights.symmetric=false --set weights.head_bits=4 --set weights.shared_head=true",
    ),
    ("QuaRot + GPTQ w4a16", "--scheme w4a16 --weights gptq --set weights.head_bits=4 --set weights.shared_head=true"),
    (
        "QuaRot + GPTQ, 8-bit head",
        "--scheme w4a8 --weights gptq --set weights.head_bits=8 --set weights.shared_head=true",
    ),
    (
        "GPTQ, full range",
        "--scheme w4a8 --rotation none --weights gptq --set weights.full_range=true --set weights.head_bits=4 --set weights.shared_head=true",
    ),
)


def options_of(flags: str) -> QuantOptions:
    """The QuantOptions `rotgraph quantize IN -o OUT --format ort --recipe plain FLAGS` runs with (a model
    with calibration text)."""
    argv = ["quantize", "IN", "-o", "OUT", "--format", "ort", "--recipe", "plain", *shlex.split(flags)]
    return to_options(resolve(quant_config(parser().parse_args(argv)), True)[0])


def builder(hf: Path, out: Path, precision: tuple[str, ...], reuse: bool) -> Path:
    """The builder's model.onnx for `precision` (its own tool, in its pinned venv)."""
    model = out / "model.onnx"
    if reuse and model.is_file():
        return model
    shutil.rmtree(out, ignore_errors=True)
    fixtures.ensure_venv(fixtures.GENAI, force=False)
    cache = out.parent / "builder-cache"
    fixtures.run([str(fixtures.GENAI.python), *BUILDER, "-i", str(hf), "-o", str(out), "-c", str(cache), *precision])
    return model


def load_hessians(path: Path) -> dict[Site, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {(int(k.split(":")[0]), k.split(":")[1]): data[k] for k in data.files}


def save_hessians(path: Path, hessians: dict[Site, np.ndarray]) -> None:
    np.savez(path, **{f"{block}:{site}": h for (block, site), h in hessians.items()})


def build(source: Path, flags: str, out: Path, workdir: Path, calibration: np.ndarray) -> float:
    """Quantize `source` into `out` with `flags`; GPTQ Hessians come from (and go to) the work folder."""
    options = options_of(flags)
    cache = workdir / f"hessians-{options.rotation}-{'online' if options.online else 'offline'}.npz"
    hessians = load_hessians(cache) if options.weights == "gptq" else None
    start = time.perf_counter()
    model = io.load_model(source)
    scratch = workdir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        with io.staged_output(out) as staged:
            found = quantize_model(model, options, calibration, hessians, scratch=scratch)
            io.save_model(model, staged)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if found is not None and hessians is None:
        save_hessians(cache, found)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="build/genai-quality")
    ap.add_argument("--hf", default="build/bench-exporters", help="folder holding (or to receive) the hf/ folder")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reuse", action="store_true", help="keep the builder's models, Hessians and candidates built")
    ap.add_argument("--only", nargs="*", help="candidate names to build and score (default: all)")
    args = ap.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    hf = hf_folder(Path(args.hf).resolve(), reuse=True)
    source = builder(hf, workdir / "builder-fp32", ("-p", "fp32"), args.reuse)
    peer = builder(hf, workdir / "builder-int4", BUILDER_INT4, args.reuse)
    calibration = calibration_tokens(source, QuantOptions())
    rows: list[tuple[str, str, Path, str]] = [
        ("float (builder fp32)", "-", source, "-"),
        ("onnxruntime-genai builder int4", " ".join(BUILDER_INT4), peer, "-"),
    ]
    for i, (name, flags) in enumerate(CANDIDATES):
        if args.only and name not in args.only:
            continue
        out = workdir / "candidates" / f"c{i:02d}" / "model.onnx"
        record = out.parent / "build-seconds.txt"  # kept for --reuse, as exporters.py keeps export times
        if not (args.reuse and out.is_file()):
            record.unlink(missing_ok=True)
            seconds = f"{build(source, flags, out, workdir, calibration):.0f}"
            record.write_text(seconds + "\n")
            print(f"built {name} in {seconds} s", file=sys.stderr, flush=True)
        seconds = record.read_text().strip() if record.is_file() else "-"
        rows.append((name, flags, out, seconds))
    tokens = windows(encode(hf / "tokenizer.json", load_text("evaluation")), args.windows, args.seq_len)
    results = evaluate([path for _, _, path, _ in rows], tokens, progress=False)
    peer_mb = size_mb(peer)
    print(
        f"\n### Weight recipes vs the onnxruntime-genai builder's int4 ({args.windows} windows x {args.seq_len} "
        "tokens, evaluation split; rotgraph rows: `rotgraph quantize --format ort` + the flags shown)\n"
    )
    print("| model | flags | size MB | size / builder int4 | perplexity | KL to float | top-1 | build s |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, flags, path, seconds), r in zip(rows, results, strict=True):
        kl = "-" if r.kl_to_reference is None else f"{r.kl_to_reference:.4f}"
        top = "-" if r.top1_agreement is None else f"{r.top1_agreement:.3f}"
        mb = size_mb(path)
        print(
            f"| {name} | `{flags}` | {mb:.1f} | {mb / peer_mb:.2f}x | {r.perplexity:.2f} | {kl} | {top} | {seconds} |"
        )


if __name__ == "__main__":
    main()
