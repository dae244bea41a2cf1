"""Registrations of the Onboard RPC (Model-SAT): register a new backend, or update one registered
before, from its scores on aptitude prompts. No retraining, no candidate inference at routing time:

1. the results join the kNN datastore (so the new backend gets neighbour estimates at once);
2. where a trained capability encoder is served, the backend's vector (g, beta, h) is fitted to
   the results with the prompt side frozen (``router.prediction.onboarding``);
3. the backend is served route-only with the cost model the caller gave.

Durability: a registration is one record of the system of record's ``registry`` stream
(``datastore/storage.py``; ``backends.log``, a file log, before) holding the results and their
embeddings; it is acknowledged only once committed, and replayed at start-up, latest
registration per backend winning. The aptitude outcomes are put into
the datastore from this log (``Datastore.insert``), never logged twice, so a crash cannot leave a
registration without its outcomes or the reverse.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from datastore.log import decode_vector, encode_vector
from datastore.records import OutcomeRecord
from encoders.base import PromptEncoder
from router.core.config import CostModelConfig, builtin_data
from router.core.errors import InvalidArgument
from router.core.names import BACKEND_NAME_RULE, is_backend_name

MIN_RESULTS = 10
MAX_RESULTS = 5000


@dataclass(frozen=True)
class AptitudeResult:
    """One answered aptitude item: ``item_id`` of the server's suite, or the ``prompt`` itself."""

    score: float
    item_id: str = ""
    prompt: str = ""
    cost: float | None = None


@dataclass(frozen=True)
class OnboardSpec:
    backend: str
    results: Sequence[AptitudeResult]
    cost: dict[str, Any]              # a CostModelConfig as a mapping (validated here)
    description: str = ""


@dataclass(frozen=True)
class OnboardResult:
    backend: str
    created: bool                     # False: an earlier registration was replaced
    results: int
    mean_score: float
    capability_fitted: bool


@dataclass(frozen=True)
class Registration:
    """A validated registration, as logged: prompts resolved, cost model checked."""

    entry_id: str
    backend: str
    description: str
    cost: CostModelConfig
    prompts: tuple[str, ...]
    scores: tuple[float, ...]
    costs: tuple[float | None, ...]
    item_ids: tuple[str, ...]
    key: str = ""                  # the API key's name that registered it (provenance)

    def record_ids(self) -> list[str]:
        return [f"onboard-{self.entry_id}-{i}" for i in range(len(self.prompts))]

    def records(self) -> list[OutcomeRecord]:
        return [OutcomeRecord(id=rid, prompt=p, scores={self.backend: s},
                              cost={} if c is None else {self.backend: c}, source="onboard",
                              category=iid.rsplit("-", 1)[0] if iid else "")
                for rid, p, s, c, iid in zip(self.record_ids(), self.prompts, self.scores, self.costs, self.item_ids)]

    def to_entry(self, embedder: str, embeddings: npt.NDArray[np.float32]) -> dict[str, Any]:
        return {"op": "onboard", "id": self.entry_id, "ts": time.time(), "backend": self.backend,
                "description": self.description, "cost": self.cost.model_dump(),
                "results": [{"prompt": p, "score": s, **({"cost": c} if c is not None else {}),
                             **({"item_id": i} if i else {})}
                            for p, s, c, i in zip(self.prompts, self.scores, self.costs, self.item_ids)],
                "embedder": embedder, "embeddings": [encode_vector(e) for e in embeddings],
                **({"key": self.key} if self.key else {})}

    @classmethod
    def from_entry(cls, e: dict[str, Any]) -> Registration:
        res = e["results"]
        return cls(e["id"], e["backend"], e.get("description", ""), CostModelConfig(**e["cost"]),
                   tuple(r["prompt"] for r in res), tuple(float(r["score"]) for r in res),
                   tuple(r.get("cost") for r in res), tuple(r.get("item_id", "") for r in res), e.get("key", ""))


def validate(spec: OnboardSpec, suite: dict[str, str], *, max_prompt_chars: int) -> Registration:
    """Check a request and resolve item ids against the aptitude suite; errors say what to fix."""
    if not is_backend_name(spec.backend or ""):
        raise InvalidArgument(f"backend name {spec.backend!r} is not valid: use {BACKEND_NAME_RULE}")
    n = len(spec.results)
    if not MIN_RESULTS <= n <= MAX_RESULTS:
        raise InvalidArgument(f"onboarding needs between {MIN_RESULTS} and {MAX_RESULTS} aptitude results, got {n}")
    try:
        cost = CostModelConfig(**spec.cost)
    except ValidationError as e:
        raise InvalidArgument(f"invalid cost_model: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    if cost.kind == "compute" and not cost.active_parameters:
        raise InvalidArgument("cost_model kind 'compute' needs active_parameters > 0 for a backend caprouter "
                              "does not load")
    prompts, scores, costs, ids = [], [], [], []
    for i, r in enumerate(spec.results):
        if r.item_id and r.prompt:
            raise InvalidArgument(f"results[{i}]: set item_id or prompt, not both")
        if r.item_id:
            if r.item_id not in suite:
                raise InvalidArgument(f"results[{i}]: unknown aptitude item {r.item_id!r} (the server's suite has "
                                      f"{len(suite)} items; send the prompt instead for your own test)")
            prompt = suite[r.item_id]
        elif r.prompt and r.prompt.strip():
            prompt = r.prompt
        else:
            raise InvalidArgument(f"results[{i}]: needs an item_id or a non-empty prompt")
        if len(prompt) > max_prompt_chars:
            raise InvalidArgument(f"results[{i}]: prompt too long ({len(prompt)} > {max_prompt_chars} characters)")
        if isinstance(r.score, bool) or not math.isfinite(r.score) or not 0.0 <= r.score <= 1.0:
            raise InvalidArgument(f"results[{i}]: score must be in [0, 1], got {r.score}")
        if r.cost is not None and (not math.isfinite(r.cost) or r.cost < 0):
            raise InvalidArgument(f"results[{i}]: cost must be a finite number >= 0, got {r.cost}")
        prompts.append(prompt)
        scores.append(float(r.score))
        costs.append(None if r.cost is None else float(r.cost))
        ids.append(r.item_id)
    return Registration(uuid.uuid4().hex, spec.backend, spec.description, cost, tuple(prompts), tuple(scores),
                        tuple(costs), tuple(ids))


def latest(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest registration of each backend, in the order they were last registered."""
    last: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.get("op") == "onboard":
            last.pop(e["backend"], None)
            last[e["backend"]] = e
    return list(last.values())


def entry_embeddings(e: dict[str, Any], encoder: PromptEncoder) -> npt.NDArray[np.float32]:
    """The logged embeddings when they came from this embedder, else the prompts re-embedded."""
    if e.get("embedder") == encoder.model_id and len(e.get("embeddings", ())) == len(e["results"]):
        return np.stack([decode_vector(s, encoder.dim) for s in e["embeddings"]])
    return encoder.encode([r["prompt"] for r in e["results"]])


def log_path(state_dir: Path) -> Path:
    return Path(state_dir) / "backends.log"


def suite_path(configured: str | None) -> Path:
    """The aptitude suite Onboard resolves item ids against (None: the bundled one)."""
    return Path(configured) if configured else builtin_data("aptitude_suite.jsonl")


def load_suite(path: Path) -> list[dict[str, Any]]:
    """The suite's items: {"id", "kind", "prompt", ...} per line (router/offline/aptitude builds it)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_suite_prompts(path: Path) -> dict[str, str]:
    return {it["id"]: it["prompt"] for it in load_suite(path)}
