"""rotgraph installed the way Python users install it: a wheel built from this source tree carries the
compiled kernels (setup.py runs scripts/build_kernels.sh), and the installed package finds them in its own
folder. Without a compiler the wheel still builds, without the library, and says why in one line.

Each test builds a wheel from the source tree (pip wheel, in-tree, without build isolation: setuptools
comes from this environment, and an up-to-date build/kernels/ is reused) and installs it with
`pip install --target` into a folder that a fresh interpreter imports rotgraph from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, RECORD, NOT_BUILT = (
    "rotgraph/kernels/librotgraph_ops.so",
    "rotgraph/kernels/librotgraph_ops.json",
    "rotgraph/kernels/NOT_BUILT",
)
NOT_BUILT_LINE = "rotgraph: compiled kernels not built"  # setup.py's one line


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROTGRAPH_KERNELS_LIBRARY", "ROTGRAPH_KERNELS")}
    return env | extra


def build_and_install(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path, str]:
    """(the wheel, the folder it is installed in, pip wheel's verbose output)."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rotgraph-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True)
    return wheel, site, built.stdout + built.stderr


def installed(site: Path, code: str, env: dict[str, str]) -> str:
    """Run `code` in a fresh interpreter that imports rotgraph from `site`, outside the source tree."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=site.parent,
        env=env | {"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_the_installed_package_finds_its_own_kernels(tmp_path) -> None:
    env = clean_env()
    wheel, site, log = build_and_install(tmp_path, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert LIBRARY in names and RECORD in names and NOT_BUILT not in names
    assert "-py3-none-" in wheel.name and not wheel.name.endswith("-any.whl")  # a platform wheel
    assert NOT_BUILT_LINE not in log
    out = installed(
        site,
        "import onnxruntime as ort, rotgraph.kernels as k\n"
        "library = k.library_path()\n"
        "assert k.unsupported_reason(library) is None\n"
        "ort.SessionOptions().register_custom_ops_library(str(library))\n"
        "print(k.__file__)\n"
        "print(library)\n",
        env,
    )
    package, library = (Path(line) for line in out.split())
    assert package.is_relative_to(site)
    assert library == package.parent / "librotgraph_ops.so"


@pytest.mark.slow
def test_without_a_compiler_the_install_succeeds_and_says_what_is_lost(tmp_path) -> None:
    env = clean_env(CXX="/bin/false")
    wheel, site, log = build_and_install(tmp_path, env)
    names = zipfile.ZipFile(wheel).namelist()
    assert LIBRARY not in names and RECORD not in names and NOT_BUILT in names
    lines = [line for line in log.splitlines() if NOT_BUILT_LINE in line]
    assert len(lines) == 1 and "CXX=/bin/false" in lines[0] and "Traceback" not in log
    out = installed(
        site,
        "import rotgraph.kernels as k\nprint(k.library_path())\nprint(k.hidden_or_missing())\n",
        env,
    )
    library, why = out.splitlines()
    assert library == "None"
    assert why.startswith("not built when rotgraph was installed") and "CXX=/bin/false" in why
