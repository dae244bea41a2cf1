"""Answer cache: the same request asked twice is answered from memory the second time.

Two lookups, both after routing (the chosen backend is part of what an answer means):

- exact: the tenant, the backend, the messages and every generation parameter (max_tokens,
  temperature, stop, seed, pass-through parameters) hash to one key. Cached only where a second
  generation would give the same answer: at temperature 0, or with a seed.
- semantic (optional): the routing embedding of the prompt, already computed, against those of
  cached answers of the same tenant, backend and generation parameters; a cosine at or above
  ``semantic_threshold`` is a hit. Only at temperature 0 (a paraphrase asks for "the" answer).

Never across tenants: with API keys, a key's answers are its own (the tenant is the key id; an
open server has one tenant). Bounded by ``max_entries`` (least recently used out first) and
``ttl_s``. Off by default (``cache.enabled``); a request opts out with ``cache: false``.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from router.core.config import CacheConfig


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    tool_calls: tuple[Mapping[str, Any], ...]
    finish_reason: str                      # backends.base.FinishReason value
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Hit:
    answer: CachedAnswer
    kind: str                               # "exact" | "semantic"
    similarity: float                       # 1.0 for exact


@dataclass
class _Entry:
    answer: CachedAnswer
    expires: float
    row: int                                # its row of the embedding matrix (-1: none)


def request_key(tenant: str, backend: str, messages: Any, params: Mapping[str, Any]) -> tuple[str, str]:
    """(exact key, scope): the scope is everything but the messages, which a semantic hit may
    vary."""
    scope = json.dumps([tenant, backend, params], sort_keys=True, default=str)
    exact = hashlib.sha256((scope + json.dumps(messages, sort_keys=True, default=str)).encode()).hexdigest()
    return exact, hashlib.sha256(scope.encode()).hexdigest()


class AnswerCache:
    def __init__(self, cfg: CacheConfig, dim: int) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Semantic lookups: one row per cached answer (unit embeddings), its scope beside it.
        self._emb = np.zeros((cfg.max_entries if cfg.semantic else 0, dim), np.float32)
        self._row_scope: list[str | None] = [None] * len(self._emb)
        self._row_key: list[str | None] = [None] * len(self._emb)
        self._free = list(range(len(self._emb) - 1, -1, -1))

    @staticmethod
    def cacheable(temperature: float, seed: int | None) -> bool:
        return temperature == 0 or seed is not None

    def get(self, exact: str, scope: str, embedding: npt.NDArray[np.float32] | None, *,
            semantic: bool) -> Hit | None:
        """The exact answer, else (``semantic``) the nearest one of the same scope above the threshold."""
        now = time.monotonic()
        with self._lock:
            e = self._entries.get(exact)
            if e is not None and e.expires > now:
                self._entries.move_to_end(exact)
                return Hit(e.answer, "exact", 1.0)
            if not (semantic and self.cfg.semantic and embedding is not None and len(self._entries)):
                return None
            sims = self._emb @ embedding.astype(np.float32)
            ok = np.fromiter((s == scope for s in self._row_scope), bool, len(self._row_scope))
            if not ok.any():
                return None
            sims = np.where(ok, sims, -np.inf)
            best = int(np.argmax(sims))
            key = self._row_key[best]
            e2 = self._entries.get(key) if key is not None else None
            if float(sims[best]) < self.cfg.semantic_threshold or e2 is None or e2.expires <= now:
                return None
            self._entries.move_to_end(key)  # type: ignore[arg-type]
            return Hit(e2.answer, "semantic", float(sims[best]))

    def put(self, exact: str, scope: str, embedding: npt.NDArray[np.float32] | None, answer: CachedAnswer) -> None:
        if len(answer.text) > self.cfg.max_answer_chars:
            return
        with self._lock:
            old = self._entries.pop(exact, None)
            if old is not None:
                self._release(old)
            while len(self._entries) >= self.cfg.max_entries:
                _, evicted = self._entries.popitem(last=False)
                self._release(evicted)
            row = -1
            if self.cfg.semantic and embedding is not None and self._free:
                row = self._free.pop()
                self._emb[row] = embedding
                self._row_scope[row], self._row_key[row] = scope, exact
            self._entries[exact] = _Entry(answer, time.monotonic() + self.cfg.ttl_s, row)

    def _release(self, e: _Entry) -> None:
        if e.row >= 0:
            self._emb[e.row] = 0.0
            self._row_scope[e.row] = self._row_key[e.row] = None
            self._free.append(e.row)

    def __len__(self) -> int:
        return len(self._entries)


def params_of(max_tokens: int, temperature: float, stop: Sequence[str], seed: int | None,
              extra: Mapping[str, Any]) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": temperature, "stop": list(stop), "seed": seed,
            "extra": dict(extra)}
