"""Which static activation sites cost perplexity: per-tensor uint8 Q/DQ at one kind of site at a time.

    python benchmarks/static_sites.py --model build/bench-exporters/rotgraph/model.onnx [--windows 4]

Rotates the float model with QuaRot and quantizes its weights (int8 per channel, activations float),
measures every projection input on the calibration windows (minmax range over all positions and
without each window's first 1 or 4 positions, the median token's max |x|, where the max is), then
inserts uint8 minmax Q/DQ (`insert_qdq`, the scales `StaticSpec` gives) only at chosen sites and scores
each variant against the float model on the evaluation split: every site, each kind alone (q/k/v,
o_proj, gate/up, down_proj inputs), each layer of --kind alone, every site but the N widest spreads
(those --wide-ratio would give 16 bits), and every site with ranges that leave out the first positions
(the attention-sink hypothesis). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from rotgraph import io
from rotgraph.calibrate import Site
from rotgraph.evaluate import evaluate, windows
from rotgraph.passes.quantization.static_activations import StaticSpec, insert_qdq, static_sites
from rotgraph.probe import probe
from rotgraph.quantize import QuantOptions, calibration_tokens, quantize_model
from rotgraph.text import load_text
from rotgraph.tokenize import encode

SKIPS = (0, 1, 4)  # leading positions of each window left out of a range
SPEC = StaticSpec(8, symmetric=False)  # what static_qdq.py's rows use: uint8 + zero point, minmax


def measure(base: Path, calibration: np.ndarray, scratch: Path) -> dict[Site, dict]:
    """Per projection input: (lo, hi) without the first k positions for k in SKIPS, the median token's
    max |x|, and the position of the max."""
    model = io.load_model(base)
    sites = static_sites(model, kv=False)
    keys = list(sites)
    tokens: dict[Site, list[np.ndarray]] = {k: [] for k in keys}  # [window][position, features]
    for outs in probe(model, [sites[k] for k in keys], calibration, scratch=scratch, optimization="basic"):
        for key, x in zip(keys, outs, strict=True):
            tokens[key].append(x.reshape(-1, x.shape[-1]))
    found = {}
    for key, xs in tokens.items():
        x = np.stack(xs)  # [windows, positions, features]
        token_max = np.abs(x).max(axis=-1)
        found[key] = {
            "ranges": {k: (float(x[:, k:].min()), float(x[:, k:].max())) for k in SKIPS},
            "median_token": float(np.median(token_max)),
            "position": int(np.unravel_index(token_max.argmax(), token_max.shape)[1]),
        }
    return found


def build(base: Path, out: Path, stats: dict[Site, dict], chosen: list[Site], skip: int) -> Path:
    """The base model with uint8 minmax Q/DQ on `chosen` (ranges without the first `skip` positions)."""
    model = io.load_model(base)
    sites = static_sites(model, kv=False)
    for key in chosen:
        lo, hi = stats[key]["ranges"][skip]
        scale, zero = SPEC.params(np.asarray(lo), np.asarray(hi))
        insert_qdq(model, sites[key], SPEC, scale, zero, f"layers.{key[0]}.{key[1]}")
    io.save_model(model, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="rotgraph-demo/bench/dynamo/model.onnx")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calibration-windows", type=int, default=4)
    ap.add_argument("--kind", default="down", help="the site kind scanned layer by layer")
    ap.add_argument("--widest", type=int, nargs="+", default=[1, 2, 3], help="leave the N widest spreads float")
    args = ap.parse_args()
    source = Path(args.model)
    tokens = windows(encode(source.parent / "tokenizer.json", load_text("evaluation")), args.windows, 512)
    options = QuantOptions(scheme="w8a16", rotation="quarot", group=0, calibration_windows=args.calibration_windows)
    calibration = calibration_tokens(source, options)
    with tempfile.TemporaryDirectory(dir=source.parent) as tmp:
        work = Path(tmp)
        base = work / "base.onnx"
        (work / "scratch").mkdir()  # weights computed in memory go here
        model = io.load_model(source)
        quantize_model(model, options, calibration, scratch=work / "scratch")
        io.save_model(model, base)
        del model
        stats = measure(base, calibration, work / "probe")
        shutil.rmtree(work / "scratch", ignore_errors=True)
        keys = list(stats)

        def spread(key: Site) -> float:
            lo, hi = stats[key]["ranges"][0]
            return max(-lo, hi) / stats[key]["median_token"]

        widest = sorted(keys, key=spread, reverse=True)
        print(f"\n### Projection inputs by spread (QuaRot, {args.calibration_windows} calibration windows)\n")
        print("| site | max \\|x\\| | at position | from position 1 | from position 4 | median token max | spread |")
        print("|---|---|---|---|---|---|---|")
        for key in widest[:8]:
            s = stats[key]
            r = {k: max(-lo, hi) for k, (lo, hi) in s["ranges"].items()}
            print(
                f"| {key[0]} {key[1]} | {r[0]:.2f} | {s['position']} | {r[1]:.2f} | {r[4]:.2f} | "
                f"{s['median_token']:.3f} | {spread(key):.1f} |"
            )
        kinds = sorted({k[1] for k in keys})
        configs: list[tuple[str, list[Site], int]] = [("none (w8 weights only)", [], 0), ("all", keys, 0)]
        configs += [(f"{kind} inputs", [k for k in keys if k[1] == kind], 0) for kind in kinds]
        configs += [(f"{args.kind} input of layer {k[0]} only", [k], 0) for k in keys if k[1] == args.kind]
        for n in args.widest:
            configs.append(
                (f"all but the {n} widest ({', '.join(f'{k[0]} {k[1]}' for k in widest[:n])})", widest[n:], 0)
            )
        configs += [(f"all, ranges without the first {k} positions", keys, k) for k in SKIPS[1:]]
        print(f"\n### uint8 minmax Q/DQ at some sites ({args.windows} windows x 512 tokens)\n")
        print("| quantized sites (the rest float) | perplexity | / float | KL to float | top-1 |")
        print("|---|---|---|---|---|")
        for start in range(0, len(configs), 4):  # a few sessions at a time (memory)
            group = configs[start : start + 4]
            paths = [build(base, work / f"v{start + i}.onnx", stats, c, s) for i, (_, c, s) in enumerate(group)]
            results = evaluate([source, *paths], tokens, progress=False)
            for (name, _, _), r in zip(group, results[1:], strict=True):
                print(
                    f"| {name} | {r.perplexity:.2f} | {r.perplexity / results[0].perplexity:.3f}x | "
                    f"{r.kl_to_reference:.4f} | {r.top1_agreement:.3f} |",
                    flush=True,
                )
            for p in paths:
                p.unlink()
                Path(f"{p}.data").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
