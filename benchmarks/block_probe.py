"""Calibration run whole or block by block: wall time and peak RSS of GPTQ's Hessians (`input_hessians`).

    .venv/bin/python benchmarks/block_probe.py MODEL.onnx [--windows 8] [--seq-len 512] [--rounds 2]

Each measurement is a child process that loads MODEL, canonicalizes it, and measures every projection
input's X^T X on the same seeded token windows, with `probe.probe` forced whole or block by block; the
two run alternately, round by round. The child checks nothing; tests/test_segments.py checks that both
ways give the same statistics. Prints a Markdown table (median seconds, peak RSS) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import measured

CHILD = """
import sys, tempfile
from pathlib import Path
import numpy as np
from rotgraph import io, probe
from rotgraph.calibrate import input_hessians
from rotgraph.pipeline import canonicalize
path, windows, seq, blockwise = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
probe.BLOCKWISE_BYTES = 0 if blockwise else 1 << 62
model = io.load_model(path)
canonicalize(model)
tokens = np.random.default_rng(0).integers(0, 1000, size=(windows, seq))
with tempfile.TemporaryDirectory() as scratch:
    hessians = input_hessians(model, tokens, Path(scratch))
print(len(hessians))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"whole": [], "block by block": []}
    for _ in range(args.rounds):
        for name, flag in (("whole", "0"), ("block by block", "1")):
            argv = [sys.executable, "-c", CHILD, str(args.model), str(args.windows), str(args.seq_len), flag]
            runs[name].append(measured(argv))
    print(f"\n### GPTQ Hessians of {args.model.name}: {args.windows} windows x {args.seq_len} tokens\n")
    print("| probe | seconds (median) | peak RSS MB |")
    print("|---|---|---|")
    median = {}
    for name, results in runs.items():
        median[name] = statistics.median(r["seconds"] for r in results)
        print(f"| {name} | {median[name]:.1f} | {max(r['peak_rss_mb'] for r in results):.0f} |")
    print(f"\nblock by block / whole: {median['block by block'] / median['whole']:.2f}x time")


if __name__ == "__main__":
    main()
