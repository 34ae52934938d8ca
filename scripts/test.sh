#!/usr/bin/env bash
# Install everything, lint, type-check and run the tests (extra arguments go to pytest,
# e.g. -m "not e2e" to skip the end-to-end suite on the real model, -m "not e2e and not slow" for the
# quick loop); the slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check rotgraph tests benchmarks examples
.venv/bin/ruff format --check rotgraph tests benchmarks examples
.venv/bin/mypy rotgraph
.venv/bin/python -m pytest -q --durations=15 "$@"
