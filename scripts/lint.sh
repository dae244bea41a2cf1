#!/usr/bin/env bash
# The checks CI runs before the tests: lint (ruff: pyflakes, isort, bugbear, pyupgrade), types
# (mypy; strict on the kernel, the policy and the datastore), the layering contract
# (import-linter, contracts in pyproject.toml) and declared imports (deptry).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
echo "== ruff";         .venv/bin/ruff check .
echo "== mypy";         .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports
echo "== deptry";       .venv/bin/deptry .
