#!/usr/bin/env bash
# Install, then run the demo: tiny random MoE, 2 CPU ranks over gloo, live EP<->TP switches.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moebius demo "$@"
