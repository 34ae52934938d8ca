"""Build rotgraph's compiled onnxruntime kernels when the package is built (`pip install`, a wheel).

pyproject.toml holds the metadata; this file only adds that step. scripts/build_kernels.sh is the one
place that knows how to build the library: `build_py` runs it (it writes build/kernels/ of the source
tree, skipping a library that is up to date) and copies the library and its JSON record into the
package, rotgraph/kernels/, where rotgraph.kernels looks first. An editable install finds them in
build/kernels/ instead. Where the build fails (no compiler, no onnxruntime headers, not Linux), the
install still succeeds without kernels: one line says so (pip shows a build's output with -v), and
rotgraph/kernels/NOT_BUILT keeps the reason for rotgraph.kernels to report at run time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SCRIPT = ROOT / "scripts" / "build_kernels.sh"
BUILT = ROOT / "build" / "kernels"
FILES = ("librotgraph_ops.so", "librotgraph_ops.json")
NOT_BUILT = "NOT_BUILT"  # rotgraph.kernels.NOT_BUILT names the same file


def build_kernels() -> str | None:
    """Run scripts/build_kernels.sh; None when the library is built, else why not (one line)."""
    if shutil.which("bash") is None:
        return "no bash to run scripts/build_kernels.sh"
    try:
        done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, check=False)
    except OSError as e:
        return f"scripts/build_kernels.sh could not run ({e})"
    print(done.stdout + done.stderr, end="")  # shown by pip -v
    if done.returncode == 0:
        return None
    # The script's own messages start with its name; the last one says what failed.
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    named = [line for line in lines if line.startswith("build_kernels.sh:")]
    return (named or lines or [f"scripts/build_kernels.sh exited with status {done.returncode}"])[-1].rstrip(".")


class BuildPyWithKernels(build_py):
    """build_py, then the kernels into the built package (an editable install: into build/kernels/)."""

    def run(self) -> None:
        super().run()
        reason = build_kernels()
        line = f"rotgraph: compiled kernels not built ({reason}); models will run on their slower ONNX function bodies"
        if reason is not None:
            print(line, file=sys.stderr)
        if self.editable_mode:
            return  # rotgraph.kernels finds build/kernels/ of the source tree
        package = Path(self.build_lib) / "rotgraph" / "kernels"
        for name in (*FILES, NOT_BUILT):  # nothing from an earlier build may outlive this one
            (package / name).unlink(missing_ok=True)
        if reason is None:
            for name in FILES:
                shutil.copyfile(BUILT / name, package / name)
        else:
            (package / NOT_BUILT).write_text(reason + "\n")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        package = Path(self.build_lib) / "rotgraph" / "kernels"
        extra = [str(package / name) for name in (*FILES, NOT_BUILT) if (package / name).is_file()]
        return [*super().get_outputs(include_bytecode), *extra]


class PlatformDistribution(Distribution):
    """The package holds a library compiled for this platform: installed as platform files (platlib)."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):
    """The library is compiled for this platform, not for one Python: the wheel is py3-none-<platform>."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(distclass=PlatformDistribution, cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": PlatformWheel})
