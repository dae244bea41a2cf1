#!/usr/bin/env bash
# Install into .venv and start the server on the embedded default (all local, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/caprouter serve "$@"
