"""The ONNX Runtime runtimes of MiniLM (encoder.runtime onnx / onnx-int8): the cached export,
the config, and (slow) agreement with the torch encoder."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from encoders.minilm import cached_folder, onnx_cache_key

# ---- fast: no model ---------------------------------------------------------------------------------


def test_runtime_config_defaults_to_onnx_int8_and_validates():
    from router.core.config import EncoderConfig, load_config
    from router.core.errors import ConfigError

    assert EncoderConfig().runtime == "onnx-int8"
    assert load_config(None, {"encoder.runtime": "onnx"}).encoder.runtime == "onnx"
    with pytest.raises((ConfigError, ValueError)):
        load_config(None, {"encoder.runtime": "tensorrt"})


def test_build_encoder_passes_runtime_and_models_dir(tmp_path, monkeypatch):
    from encoders import ENCODERS
    from router.core.config import load_config
    from router.serving import app

    seen = []
    monkeypatch.setattr(ENCODERS, "get", lambda kind: lambda *a, **kw: seen.append(kw) or "encoder")
    monkeypatch.setattr(app, "register_builtin_encoders", lambda: None)
    app.build_encoder(load_config(None, {"cache_dir": str(tmp_path), "encoder.runtime": "torch"}))
    assert "runtime" not in seen[-1] and "cache_dir" not in seen[-1]     # torch: the call as before
    app.build_encoder(load_config(None, {"cache_dir": str(tmp_path), "encoder.runtime": "onnx-int8"}))
    assert seen[-1]["runtime"] == "onnx-int8" and seen[-1]["cache_dir"] == tmp_path


def test_datastore_key_changes_for_int8_only():
    from router.core.config import load_config
    from router.serving.app import encoder_settings

    torch_key = encoder_settings(load_config(None, {"encoder.runtime": "torch"}))
    assert torch_key == "max_tokens=256"        # the key snapshots built before runtimes existed
    assert encoder_settings(load_config(None, {"encoder.runtime": "onnx"})) == torch_key   # same embeddings
    assert encoder_settings(load_config(None, {"encoder.runtime": "onnx-int8"})) != torch_key


def test_cache_key_follows_model_files_and_runtime(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    a = onnx_cache_key(tmp_path, "onnx-int8")
    assert a == onnx_cache_key(tmp_path, "onnx-int8")
    assert a != onnx_cache_key(tmp_path, "onnx")
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert a != onnx_cache_key(tmp_path, "onnx-int8")


def test_cached_folder_builds_once_and_atomically(tmp_path):
    out = tmp_path / "minilm-onnx-abc"
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        assert not out.exists()                 # readers never see a half-built folder
        (tmp / "model.onnx").write_bytes(b"graph")

    assert cached_folder(out, build) == out and (out / "model.onnx").read_bytes() == b"graph"
    assert cached_folder(out, build) == out and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]     # no temporary left


def test_cached_folder_failure_leaves_nothing(tmp_path):
    out = tmp_path / "minilm-onnx-abc"

    def broken(tmp: Path) -> None:
        (tmp / "fp32.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        cached_folder(out, broken)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="no model.onnx"):
        cached_folder(out, lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


def test_cached_folder_replaces_a_leftover_and_keeps_a_concurrent_winner(tmp_path):
    out = tmp_path / "minilm-onnx-abc"
    out.mkdir()
    (out / "junk").write_text("from a crash")
    cached_folder(out, lambda tmp: (tmp / "model.onnx").write_bytes(b"new"))
    assert sorted(os.listdir(out)) == ["model.onnx"]

    other = tmp_path / "minilm-onnx-def"

    def racing(tmp: Path) -> None:          # another process finishes first
        (tmp / "model.onnx").write_bytes(b"mine")
        other.mkdir()
        (other / "model.onnx").write_bytes(b"theirs")

    assert cached_folder(other, racing) == other
    assert (other / "model.onnx").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, other.name]


# ---- slow: the real model, exported --------------------------------------------------------------

PROMPTS = [
    "What is the capital of France?", "Write a haiku about rain.", "x", "Compute 15 + 27.",
    "Explain the difference between a process and a thread in operating systems.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n# what does this return for n=10?",
    "Translate to German: The weather is nice today, let's go for a walk in the park.",
    "Question: Which of the following is a prime number? Options: A) 21 B) 27 C) 29 D) 33. Answer:",
    "The committee discussed the annual budget in great detail. " * 60 + "What is the capital of Japan?",
    "Summarize the plot of Hamlet in two sentences.",
    "A farmer has 17 sheep; all but 9 run away. How many are left?",
    "¿Cuál es la montaña más alta del mundo?",
]


@pytest.fixture(scope="session")
def onnx_encoders(models_dir):
    from encoders.minilm import MiniLMEncoder

    return {r: MiniLMEncoder(runtime=r, cache_dir=models_dir) for r in ("onnx", "onnx-int8")}


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_onnx_contract_and_batched_equals_one_by_one(onnx_encoders, runtime):
    enc = onnx_encoders[runtime]
    together = enc.encode(PROMPTS)
    assert together.dtype == np.float32 and together.shape == (len(PROMPTS), 384) == (len(PROMPTS), enc.dim)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([enc.encode([t]) for t in PROMPTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@pytest.mark.slow
def test_onnx_fp32_matches_torch(onnx_encoders, encoder):
    np.testing.assert_allclose(onnx_encoders["onnx"].encode(PROMPTS), encoder.encode(PROMPTS), atol=1e-5)


@pytest.mark.slow
def test_onnx_int8_agrees_with_torch(onnx_encoders, encoder):
    # Per-token int8, measured on the 5,645 test prompts of the three routing sets: min 0.9916,
    # mean 0.9965; on these twelve: min 0.983 (the one-letter prompt "x"), mean 0.995 (ONNX Runtime's
    # per-batch quantize_dynamic: min 0.978, mean 0.992 on the routing sets).
    cos = (onnx_encoders["onnx-int8"].encode(PROMPTS) * encoder.encode(PROMPTS)).sum(1)
    assert cos.min() >= 0.98 and cos.mean() >= 0.993, cos
    a, b, c = onnx_encoders["onnx-int8"].encode(["What is 12 plus 30?", "Compute 15 + 27.",
                                                  "Write a love poem about the sea."])
    assert a @ b > a @ c


@pytest.mark.slow
def test_onnx_export_is_reused(onnx_encoders, models_dir, monkeypatch):
    from encoders import minilm

    monkeypatch.setattr(minilm, "export_onnx", lambda *a: pytest.fail("exported again"))
    again = minilm.MiniLMEncoder(runtime="onnx-int8", cache_dir=models_dir)
    np.testing.assert_array_equal(again.encode(PROMPTS[:3]), onnx_encoders["onnx-int8"].encode(PROMPTS[:3]))
