#!/usr/bin/env bash
# Install everything, lint, type-check and run the tests (extra arguments go to pytest,
# e.g. -m "not e2e" to skip the end-to-end suite on the real model, -m "not e2e and not slow" for the
# quick loop); the slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check rotgraph tests benchmarks examples setup.py
.venv/bin/ruff format --check rotgraph tests benchmarks examples setup.py
.venv/bin/mypy rotgraph setup.py
# The e2e exporter tests (tests/test_e2e_exporters.py) run optimum-onnx and the onnxruntime-genai builder from
# pinned venvs under build/fixture-venvs/ (their pins conflict with the project's): made here from the
# package registries (a no-op when current) unless the e2e tests are deselected.
case " $* " in
  *"not e2e"*) ;;
  *) .venv/bin/python scripts/make_exporter_fixtures.py --venvs-only ;;
esac
.venv/bin/python -m pytest -q --durations=15 "$@"
