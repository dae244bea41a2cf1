"""Durable appends with group commit against one fsync per append, in one run.

    .venv/bin/python benchmarks/log_append.py [--seconds 1.5] [--rounds 2] [--threads 1,16] [--dir DIR]

Each writer thread appends one Feedback-sized record (a prompt, a score, a 384-dim embedding as
base64: about 2.3 KB framed) at a time, as fast as appends are acknowledged, for --seconds, to a
fresh log in a temporary folder (--dir picks the file system: fsync cost is the disk's). Measured:
acknowledged appends/s and the p50 / p99 latency of an append, with 1 writer and with 16.
Reference in the same run: the previous ``AppendLog.append``, framing and write, flush and fsync
under one lock, so N writers queue for N fsyncs. The two alternate, --rounds times each; figures
are over all rounds. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT  # noqa: F401,I001 - puts the repository on sys.path

from datastore.log import AppendLog, _frame, encode_vector


def pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


class OneFsyncPerAppend:
    """The reference: what ``AppendLog.append`` did before group commit."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._f = open(path, "ab")
        self.syncs = 0

    def append(self, records: list[dict[str, Any]]) -> None:
        payload = b"".join(_frame(r) for r in records)
        with self._lock:
            self._f.write(payload)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.syncs += 1

    def close(self) -> None:
        self._f.close()


def record(rng: np.random.Generator) -> dict[str, Any]:
    v = rng.standard_normal(384).astype(np.float32)
    return {"prompt": "Summarise the attached quarterly report in three bullet points. " * 3,
            "scores": {"smollm2-135m": 0.75}, "source": "feedback", "ts": time.time(),
            "embedder": "sentence-transformers/all-MiniLM-L6-v2", "embedding": encode_vector(v / np.linalg.norm(v))}


def run(kind: str, writers: int, seconds: float, folder: Path, rec: dict[str, Any]) -> tuple[int, list[float], int]:
    """(acknowledged appends, latencies in ms, fsyncs) of ``writers`` threads for ``seconds``."""
    path = folder / f"{kind}-{writers}.log"
    path.unlink(missing_ok=True)
    log: AppendLog | OneFsyncPerAppend = AppendLog.open(path) if kind == "group" else OneFsyncPerAppend(path)
    lat: list[list[float]] = [[] for _ in range(writers)]
    start = threading.Barrier(writers + 1)
    deadline = [0.0]

    def writer(mine: list[float]) -> None:
        start.wait()
        while True:
            t = time.perf_counter()
            if t >= deadline[0]:
                return
            log.append([rec])
            mine.append((time.perf_counter() - t) * 1e3)

    threads = [threading.Thread(target=writer, args=(lat[i],)) for i in range(writers)]
    for th in threads:
        th.start()
    deadline[0] = time.perf_counter() + seconds
    start.wait()
    for th in threads:
        th.join()
    syncs = log.syncs
    log.close()
    flat = [x for per in lat for x in per]
    return len(flat), flat, syncs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default="1,16", help="writer thread counts, comma-separated")
    ap.add_argument("--dir", help="folder for the logs (default: a temporary folder)")
    args = ap.parse_args()
    counts = [int(x) for x in args.threads.split(",")]
    rec = record(np.random.default_rng(0))
    kinds = ["reference", "group"]
    acc: dict[tuple[str, int], list[Any]] = {(k, w): [0, [], 0] for k in kinds for w in counts}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="log-append-") as tmp:
        folder = Path(tmp)
        for r in range(args.rounds):
            for w in counts:
                for k in kinds if r % 2 == 0 else kinds[::-1]:
                    n, lat, syncs = run(k, w, args.seconds, folder, rec)
                    a = acc[(k, w)]
                    a[0] += n
                    a[1] += lat
                    a[2] += syncs
        where = folder.parent
    secs = args.seconds * args.rounds
    print(f"record: {len(_frame(rec))} bytes framed, one per append; {args.seconds:g} s x {args.rounds} rounds "
          f"per cell; logs under {where}")
    print(f"{'writers':<9}{'commit':<22}{'appends/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'appends/fsync':>15}")
    figs: dict[str, str] = {}
    for w in counts:
        for k in kinds:
            n, lat, syncs = acc[(k, w)]
            label = "one fsync per append" if k == "reference" else "group commit"
            rate, p50, p99 = n / secs, pct(lat, 0.5), pct(lat, 0.99)
            print(f"{w:<9}{label:<22}{rate:>11.0f}{p50:>9.2f}{p99:>9.2f}{n / max(syncs, 1):>15.1f}")
            tag = "ref" if k == "reference" else "gc"
            figs.update({f"{tag}_{w}w_aps": f"{rate:.0f}", f"{tag}_{w}w_p50_ms": f"{p50:.2f}",
                         f"{tag}_{w}w_p99_ms": f"{p99:.2f}"})
            if k == "group":
                figs[f"gc_{w}w_appends_per_fsync"] = f"{n / max(syncs, 1):.1f}"
        speedup = acc[("group", w)][0] / max(acc[("reference", w)][0], 1)
        print(f"{'':<9}group commit: {speedup:.2f}x the appends/s of one fsync per append")
        figs[f"speedup_{w}w"] = f"{speedup:.2f}"
    print(" ".join(f"{k}={v}" for k, v in figs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
