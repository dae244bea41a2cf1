"""Served traffic back into training data: ``caprouter export --state-dir DIR --out FILE``.

A server's system of record holds every acknowledged Feedback: the text that was embedded for the
request, the backend it scores, the score, the cost when the app sent one, the decision it answers
(Feedback by decision id) and the API key that sent it; retractions withdraw records. This module
writes them in the outcome schema ``caprouter train`` reads (``datastore/records.py``), one row a
served decision (Feedback by decision id; several Feedbacks on one decision, for its backend or
others, join one row) or a prompt (Feedback by prompt), each score the weighted mean of those
given for it, followed by the offline outcomes the server was built from (its artifact's, or the
configured outcome files), so that the file retrains the router on both.

A backend missing from a served row was not tried on that prompt (the schema's rule): training
learns from the scores there are.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from datastore.records import read_outcomes
from router.core.config import AppConfig
from router.serving.app import open_system_of_record, outcome_files


@dataclass(frozen=True)
class ExportSummary:
    served_rows: int            # rows from Feedback
    feedback_records: int       # Feedback records they join (retracted ones left out)
    retracted: int
    offline_rows: int


def served_rows(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """The feedback stream's entries -> (outcome rows, records used, records retracted)."""
    gone = {rid for e in entries if e.get("op") == "retract" for rid in e["ids"]}
    rows: dict[str, dict[str, Any]] = {}
    sums: dict[str, dict[str, list[float]]] = {}
    used = 0
    for e in entries:
        if e.get("op") is not None or e.get("id") in gone:
            continue
        used += 1
        did = e.get("decision_id")
        key = f"decision:{did}" if did else "prompt:" + hashlib.sha256(e["prompt"].encode()).hexdigest()[:16]
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"id": f"served-{did}" if did else f"served-{key[7:]}", "prompt": e["prompt"],
                               "scores": {}, "source": "feedback",
                               "meta": {"decision_id": did, "keys": [], "first_ts": e.get("ts")}}
            sums[key] = {}
        w = float(e.get("weight", 1.0))
        for b, s in e["scores"].items():
            acc = sums[key].setdefault(b, [0.0, 0.0])
            acc[0] += w * float(s)
            acc[1] += w
        for b, c in (e.get("cost") or {}).items():
            row.setdefault("cost", {})[b] = float(c)          # the latest an app reported
        if e.get("key") and e["key"] not in row["meta"]["keys"]:
            row["meta"]["keys"].append(e["key"])
    for key, row in rows.items():
        row["scores"] = {b: s / w for b, (s, w) in sums[key].items() if w > 0}
        if not row["meta"]["decision_id"]:
            del row["meta"]["decision_id"]
    return [r for r in rows.values() if r["scores"]], used, len(gone)


def offline_files(config: AppConfig) -> list[Path]:
    """The outcomes the server's datastore was built from: its artifact's, or the outcome files."""
    if config.artifact:
        return [Path(config.artifact) / "outcomes.jsonl.gz"]
    return outcome_files(config)


def _open(path: Path, *, compressed: bool) -> IO[str]:
    return gzip.open(path, "wt", encoding="utf-8") if compressed else open(path, "w", encoding="utf-8")


def export(config: AppConfig, out: Path, *, offline: bool = True) -> ExportSummary:
    """Write the served feedback (and, with ``offline``, the offline outcomes) to ``out`` (JSON
    lines; gzip when it ends in .gz), atomically: a reader never sees half a file."""
    storage = open_system_of_record(config)
    try:
        served, used, gone = served_rows(storage.stream("feedback").replayed)
    finally:
        storage.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n_offline = 0
    with _open(tmp, compressed=out.suffix == ".gz") as f:
        for row in served:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if offline:
            for rec in _offline(config):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n_offline += 1
    tmp.replace(out)
    return ExportSummary(len(served), used, gone, n_offline)


def _offline(config: AppConfig) -> Iterator[dict[str, Any]]:
    for path in offline_files(config):
        for r in read_outcomes(path):
            yield r.to_json()
