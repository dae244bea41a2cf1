"""Session-wide fixtures: real models are loaded once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "routing"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Converted/pruned weights are cached across sessions (conversion takes ~20 s)."""
    from router.config import caprouter_home

    d = caprouter_home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def encoder():
    from encoders.minilm import MiniLMEncoder

    return MiniLMEncoder()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "llmrouter.jsonl.gz").exists():
        pytest.skip("../shared/data/routing is not present")
    return SHARED
