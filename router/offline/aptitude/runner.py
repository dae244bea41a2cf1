"""Run backends on the aptitude suite, score the answers, write outcomes in the datastore schema."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends.base import Backend, Finished, GenerationRequest, Status, TextChunk
from router.core.errors import Unavailable
from router.offline.aptitude.scorers import score

log = logging.getLogger(__name__)

SOURCE = "caprouter-aptitude-v1"


async def answer(backend: Backend, prompt: str, max_tokens: int) -> tuple[str, Finished]:
    parts: list[str] = []
    fin: Finished | None = None
    async for ev in backend.generate(GenerationRequest(messages=[("user", prompt)], max_tokens=max_tokens)):
        if isinstance(ev, TextChunk):
            parts.append(ev.text)
        else:
            fin = ev
    assert fin is not None
    return "".join(parts), fin


async def run_suite(backends: Sequence[Backend], items: Sequence[dict[str, Any]], out: Path, *,
                    max_tokens: int, progress: bool = True) -> dict[str, dict[str, float]]:
    """Answer every item with every backend; write one outcome record per item to ``out``.

    Returns {backend: {kind: accuracy, ..., "all": accuracy}}.
    """
    from tqdm import tqdm

    for b in backends:
        if b.status()[0] != Status.READY:
            raise Unavailable(f"backend {b.name!r} is not ready: {b.status()[1]}")
    rows: list[dict[str, Any]] = [
        {"id": it["id"], "source": SOURCE, "category": it["kind"], "prompt": it["prompt"],
         "scores": {}, "cost": {}, "latency_ms": {}, "meta": {"answers": {}}} for it in items]
    with tqdm(total=len(items) * len(backends), desc="aptitude", unit="answer", disable=not progress) as bar:
        for b in backends:
            bar.set_postfix_str(b.name)
            cm = b.cost_model()
            for row, it in zip(rows, items):
                t0 = time.perf_counter()
                text, fin = await answer(b, it["prompt"], max_tokens)
                row["scores"][b.name] = score(text, it)
                row["cost"][b.name] = round(cm.predict(len(it["prompt"]), output_tokens=fin.completion_tokens), 6)
                row["latency_ms"][b.name] = round((time.perf_counter() - t0) * 1000, 1)
                row["meta"]["answers"][b.name] = text
                bar.update(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return summarize(rows)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        for b, s in r["scores"].items():
            acc.setdefault(b, {}).setdefault(r["category"], []).append(s)
            acc[b].setdefault("all", []).append(s)
    return {b: {k: sum(v) / len(v) for k, v in kinds.items()} for b, kinds in acc.items()}
