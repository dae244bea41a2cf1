#!/usr/bin/env bash
# Install into .venv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits 5 when it collected no test; set -e turns that into a failure.
exec .venv/bin/python -m pytest -q "$@"
