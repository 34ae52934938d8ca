"""Helpers shared by the benchmark scripts (run them as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "out": done.stdout[-4000:], "err": done.stderr[-8000:]}))
"""


def measured(cmd: list[str]) -> dict:
    """Run `cmd` in a child process; its wall time and peak RSS (exits on failure)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result['err']}")
    return result


def size_mb(path: Path) -> float:
    """A model's size on disk with its external data."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6
