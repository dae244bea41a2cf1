#!/usr/bin/env bash
# Install into .venv and run the test suite (what CI runs).
#   ./scripts/test.sh            everything (about 10 minutes on 2 cores)
#   ./scripts/test.sh --fast     only the tests that need no model and no server (under a minute)
# Any other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# pytest exits 5 when it collected no test; set -e turns that into a failure.
exec .venv/bin/python -m pytest -q "$@"
