#!/usr/bin/env bash
# Install, lint, then run the whole test suite (GPU tests skip without CUDA).
# pytest's exit code 5 (no tests collected) fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check moebius tests
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
