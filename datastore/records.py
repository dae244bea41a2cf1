"""Outcome records and the reader for outcome files.

Schema (one JSON object a line, optionally gzip-compressed), shared with ../shared/data/routing:

    {"id": str, "prompt": str, "scores": {backend: float in [0, 1]},
     "category"?: str, "source"?: str, "split"?: "train" | "test",
     "cost"?: {backend: float}, "latency_ms"?: {backend: float}, "meta"?: {...}}

A backend missing from ``scores`` was not run on that prompt.
"""
from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.core.errors import InvalidArgument


@dataclass(frozen=True)
class OutcomeRecord:
    id: str
    prompt: str
    scores: dict[str, float]
    category: str = ""
    source: str = ""
    split: str = ""
    cost: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "scores": self.scores}
        for k in ("category", "source", "split"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.cost:
            d["cost"] = self.cost
        if self.latency_ms:
            d["latency_ms"] = self.latency_ms
        return d


def _float_map(obj: Any, what: str, where: str, *, unit: bool, clipped: list[str] | None = None) -> dict[str, float]:
    """``clipped``: a list to note scores clipped into [0, 1] in (None: such a score is an error)."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: {what} must be an object of backend -> number")
    out: dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidArgument(f"{where}: {what}[{k!r}] must be a finite number, got {v!r}")
        if unit and not 0.0 <= v <= 1.0:
            if clipped is None:
                raise InvalidArgument(f"{where}: {what}[{k!r}] = {v} is outside [0, 1] (rescale the scores, or pass "
                                      "--clip-scores to `caprouter train` to clip them into [0, 1])")
            clipped.append(f"{where}: {what}[{k!r}] = {v}")
            v = min(1.0, max(0.0, float(v)))
        if not unit and v < 0:
            raise InvalidArgument(f"{where}: {what}[{k!r}] = {v} is negative")
        out[str(k)] = float(v)
    return out


def parse_record(obj: Any, where: str, *, clipped: list[str] | None = None) -> OutcomeRecord:
    """Validate one decoded JSON object; ``where`` (file:line) prefixes every error message.
    ``clipped``: clip scores outside [0, 1] and note each here (None: refuse them)."""
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: expected a JSON object")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgument(f"{where}: 'prompt' must be a non-empty string")
    scores = _float_map(obj.get("scores"), "scores", where, unit=True, clipped=clipped)
    if not scores:
        raise InvalidArgument(f"{where}: 'scores' must name at least one backend")
    return OutcomeRecord(
        id=str(obj.get("id") or where),
        prompt=prompt,
        scores=scores,
        category=str(obj.get("category") or ""),
        source=str(obj.get("source") or ""),
        split=str(obj.get("split") or ""),
        cost=_float_map(obj.get("cost"), "cost", where, unit=False),
        latency_ms=_float_map(obj.get("latency_ms"), "latency_ms", where, unit=False),
    )


def read_outcomes(path: str | Path, *, clipped: list[str] | None = None) -> Iterator[OutcomeRecord]:
    """Yield the records of a .jsonl or .jsonl.gz file; blank lines are skipped. ``clipped``: see
    ``parse_record``."""
    p = Path(path)
    if not p.exists():
        raise InvalidArgument(f"outcomes file not found: {p}")
    raw = gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p.name}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{where}: not valid JSON ({e.msg})") from None
            yield parse_record(obj, where, clipped=clipped)
