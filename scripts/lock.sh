#!/usr/bin/env bash
# Refresh constraints.txt, the pinned versions scripts/install.sh installs, from a fresh
# environment that resolves pyproject.toml's ranges anew. Run it when a dependency changes;
# commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q "torch==2.13.0"
"$tmp/venv/bin/pip" install -q -e ".[dev,ray]"
{
  echo "# Pinned versions of every package caprouter installs (scripts/lock.sh writes this file;"
  echo "# scripts/install.sh installs with it as pip constraints)."
  "$tmp/venv/bin/pip" freeze --exclude-editable | sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
