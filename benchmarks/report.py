"""The visual report on the default model, and a check that its page renders in a headless browser.

    python benchmarks/report.py [--workdir rotgraph-demo/bench/dynamo] [--windows 4] [--docs docs]

Runs `rotgraph inspect MODEL --rotated ROTATED -o WORKDIR/report` (exporting and rotating the default
model first when WORKDIR lacks them), then loads report/index.html in headless Chromium (Debian's
`chromium` package: `apt-get install chromium`), takes a screenshot and checks that every plot was
drawn: the page is as tall as its three figures and the screenshot is not blank. Copies the outlier plot
and the screenshot to DOCS for the README. Prints the page size and what the screenshot holds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def screenshot(page: Path, out: Path, width: int = 1300, height: int = 2600) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no chromium: apt-get install chromium (Debian) to check the page renders")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("rotgraph-demo/bench/dynamo"))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args()
    rotgraph = str(Path(sys.executable).parent / "rotgraph")
    work = args.workdir
    model, rotated, report = work / "model.onnx", work / "rotated.onnx", work / "report"
    if not model.exists():
        subprocess.run([rotgraph, "export", "-o", str(model)], check=True)
    if not rotated.exists():
        subprocess.run([rotgraph, "rotate", str(model), "-o", str(rotated)], check=True)
    subprocess.run(
        [rotgraph, "inspect", str(model), "--rotated", str(rotated), "-o", str(report), "--windows", str(args.windows)],
        check=True,
    )
    shot = report.parent / "report-screenshot.png"
    screenshot(report / "index.html", shot)

    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    rows_drawn = np.flatnonzero((pixels < 0.9).any(axis=(1, 2)))  # rows with anything darker than near-white
    colored = ((pixels[..., 2] - pixels[..., 0]) > 0.3).sum()  # blue bars and lines (matplotlib's C0)
    orange = ((pixels[..., 0] - pixels[..., 2]) > 0.3).sum()  # the rotated model's C1
    print(
        f"screenshot {shot}: {pixels.shape[1]} x {pixels.shape[0]} px, content down to row {rows_drawn.max()}, "
        f"{colored} blue and {orange} orange pixels"
    )
    if rows_drawn.max() < 1500 or colored < 1000 or orange < 1000:
        raise SystemExit("the report page did not render its plots")
    args.docs.mkdir(exist_ok=True)
    shutil.copy(report / "outliers.png", args.docs / "outliers.png")
    print(f"copied the outlier plot to {args.docs / 'outliers.png'}")


if __name__ == "__main__":
    main()
