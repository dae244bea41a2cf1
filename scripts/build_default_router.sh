#!/usr/bin/env bash
# Rebuild the embedded default's router artifact (router/data/default-router) with the training
# pipeline, from the bundled aptitude outcomes of the local backends (`caprouter aptitude` writes
# them). tests/router/offline/test_default_router.py fails when the artifact is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/caprouter train --data router/data/aptitude_outcomes.jsonl --out router/data/default-router \
  --seed 0 --test-share 0 "$@"
