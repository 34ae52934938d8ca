"""Every command in every examples/*/README.md runs and succeeds, so the examples never rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each example runs the command line end to end

READMES = sorted((ROOT / "examples").glob("*/README.md"))


def commands(readme: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.name)
def test_example_readme_commands(readme: Path, tmp_path: Path) -> None:
    cmds = commands(readme)
    assert cmds, f"{readme} has no bash block"
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "WORK": str(tmp_path), "PATH": bindir + os.pathsep + os.environ["PATH"]}
    for cmd in cmds:
        done = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
