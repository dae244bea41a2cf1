"""FAISS kNN datastore: exact inner-product search over unit-norm prompt embeddings.

State on disk (one folder):

    snapshot/manifest.json   embedder, dim, source hash, record count, backends
    snapshot/index.faiss     the FAISS index of the base outcomes
    snapshot/records.jsonl   their scores and costs, row-aligned with the index
    snapshot/ann.faiss       the approximate index (HNSW or IVF) of those rows, where the store
                             has one; reused while the manifest's ``ann`` matches the settings

The snapshot is derived data, rebuilt whenever the outcome files or the embedder change. The
feedback (Feedback, new outcomes, with their embeddings) is the user's data: appended to a
RecordLog (the system of record's ``feedback`` stream, ``datastore/storage.py``; a file log,
``feedback.log``, for tools and tests), never rewritten, only replayed on top of the snapshot
(re-embedded if the embedder changed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from datastore.base import DATASTORES, BackendStats, Estimate
from datastore.log import AppendLog, decode_vector, encode_vector, fsync_dir
from datastore.records import OutcomeRecord, read_outcomes
from datastore.storage import RecordLog
from router.core.errors import ArtifactError, InvalidArgument

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1


def source_hash(paths: Sequence[Path], embedder_id: str, encoder_settings: str) -> str:
    h = hashlib.sha256(f"v{SNAPSHOT_FORMAT}|{embedder_id}|{encoder_settings}".encode())
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class _Columns:
    """Row- and column-growable observations: ``seen`` the observation's weight (1 for an outcome,
    a feedback key's weight for its feedback, 0 where unobserved) and ``val`` the weighted value
    (weight x value), both float32, kept apart so that a query needs no NaN handling, only two
    gathers and two matmuls: sum(w val) / sum(w seen) is the weighted mean."""

    def __init__(self) -> None:
        self.val = np.zeros((0, 0), dtype=np.float32)
        self.seen = np.zeros((0, 0), dtype=np.float32)

    def ensure(self, rows: int, cols: int) -> None:
        r, c = self.val.shape
        if rows <= r and cols <= c:
            return
        shape = (max(rows, 2 * r, 64) if rows > r else r, max(cols, c))
        for name in ("val", "seen"):
            new = np.zeros(shape, dtype=np.float32)
            new[:r, :c] = getattr(self, name)
            setattr(self, name, new)

    def set(self, row: int, col: int, v: float, weight: float = 1.0) -> None:
        self.val[row, col] = weight * v
        self.seen[row, col] = weight

    def get(self, row: int, col: int) -> tuple[float, float] | None:
        """(value, weight) of an observation, None where there is none."""
        w = float(self.seen[row, col])
        return (float(self.val[row, col]) / w, w) if w else None

    def unset(self, row: int, col: int) -> None:
        self.val[row, col] = 0.0
        self.seen[row, col] = 0.0


@dataclass(frozen=True)
class AnnSettings:
    """When and how the datastore searches approximately instead of exactly.

    kind "hnsw" (the default above ``min_size`` rows), "ivf", or "off" (always exact). Measured on
    synthetic 384-d embeddings shaped like the shared sets' (benchmarks/datastore_scale.py): at
    100k rows an exact search of one prompt took 7.4 ms, HNSW (M 32, efSearch 64) 0.40 ms at
    recall@32 0.985, IVF (632 lists, nprobe 32) 0.54 ms at 0.982; at 1M, see hnsw_ef_construction.
    """

    kind: str = "off"
    min_size: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    # None: 40 below 500k rows, 80 above. At 1M rows, efConstruction 40 capped recall@32 near
    # 0.87 whatever efSearch (0.80 at 128, 0.87 at 512); 80 gave 0.987 at efSearch 128 (1.1 ms)
    # for a build of 591 s against 332 s. At 100k, 40 already gives 0.985 and keeps the build,
    # and so a replica's start-up, at 16 s.
    hnsw_ef_construction: int | None = None
    ivf_nprobe: int = 32

    def __post_init__(self) -> None:
        if self.kind not in ("off", "hnsw", "ivf"):
            raise InvalidArgument(f"datastore ann must be off, hnsw or ivf, got {self.kind!r}")


# A stored prompt counts as the very prompt at cosine >= 0.9999 (a prompt and itself give 1.0 up to
# float error, or int8 activations' rounding), and at most this many copies of it are pooled.
_SAME_PROMPT = 0.9999
_MAX_DUPLICATES = 8


def _duplicates(backends: tuple[str, ...], sims: npt.NDArray[np.float32], valid: npt.NDArray[np.bool_],
                val: npt.NDArray[np.float32], seen: npt.NDArray[np.float32], cval: npt.NDArray[np.float32],
                cseen: npt.NDArray[np.float32]) -> Estimate:
    """``recorded``'s Estimate from one search's first neighbours: sims, valid (n, k); val, seen,
    cval, cseen (n, k, B) (val holds weight x value: the weighted mean is sum(val) / sum(seen))."""
    hit = (valid & (sims >= _SAME_PROMPT)).astype(np.float32)[:, :, None]              # (n, k, 1)
    n = (seen * hit).sum(1)
    cn = (cseen * hit).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        quality = np.where(n > 0, (hit * val).sum(1) / n, np.nan).astype(np.float32)
        cost = np.where(cn > 0, (hit * cval).sum(1) / cn, np.nan).astype(np.float32)
    return Estimate(backends, quality, n.astype(np.float32), cost)


@DATASTORES.register("faiss-knn")
class FaissKnnDatastore:
    """kNN quality estimate: similarity-weighted mean of neighbour scores, shrunk to a prior.

    For prompt q with neighbours i (cosine s_i, s_1 the largest) and backend b:
        w_i = exp((s_i - s_1) / T)
        quality_b = (sum_i w_i y_ib + a * prior_b) / (sum_i w_i [i scored b] + a)
    where prior_b is b's mean score over the whole store and a = prior_strength: a backend with
    few scored neighbours falls back towards its overall mean instead of trusting one neighbour.
    """

    def __init__(self, dim: int, embedder_id: str, *, k: int = 32, prior_strength: float = 2.0,
                 temperature: float = 0.05, ann: AnnSettings = AnnSettings()) -> None:
        self.dim = dim
        self.ann_settings = ann
        self.ann: Any = None          # the approximate index, once the store reaches ann.min_size
        self._ann_building = False
        self.embedder_id = embedder_id
        self.k = k
        self.prior_strength = prior_strength
        self.temperature = temperature
        self.index = faiss.IndexFlatIP(dim)
        self._omp_threads = faiss.omp_get_max_threads()
        self.backends: list[str] = []
        self._col: dict[str, int] = {}
        self._scores = _Columns()
        self._cost = _Columns()
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._sum = np.zeros(0, dtype=np.float64)     # weighted sum of each backend's scores
        self._wcnt = np.zeros(0, dtype=np.float64)    # their summed weights
        self._cnt = np.zeros(0, dtype=np.int64)       # how many there are
        self._prior = np.zeros(0, dtype=np.float32)
        self._lock = threading.RLock()
        self._log: RecordLog | None = None
        self.state_dir: Path | None = None
        # Rows with a score (a retracted or superseded row keeps its place in the index but must
        # not take a neighbour's slot: searches skip dead rows with a bitmap selector).
        self._alive = np.zeros(0, dtype=bool)
        self._dead = 0
        self._bits: npt.NDArray[np.uint8] | None = None     # packed _alive, cached for searches
        # Logged feedback by API key name: (record id, when) of each, for retract_feedback.
        self._by_key: dict[str, list[tuple[str, float]]] = {}

    # ---- in-memory core ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def _column(self, backend: str) -> int:
        c = self._col.get(backend)
        if c is None:
            c = self._col[backend] = len(self.backends)
            self.backends.append(backend)
            self._sum = np.append(self._sum, 0.0)
            self._wcnt = np.append(self._wcnt, 0.0)
            self._cnt = np.append(self._cnt, 0)
        return c

    def _insert(self, embeddings: npt.NDArray[np.float32], ids: Sequence[str],
                scores: Sequence[dict[str, float]], costs: Sequence[dict[str, float]],
                weights: Sequence[float] | None = None) -> None:
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim or emb.shape[0] != len(ids):
            raise InvalidArgument(f"embeddings must be ({len(ids)}, {self.dim}), got {emb.shape}")
        with self._lock:
            for s, c in zip(scores, costs):
                for b in (*s, *c):
                    self._column(b)
            n0, n = len(self._ids), len(ids)
            for m in (self._scores, self._cost):
                m.ensure(n0 + n, len(self.backends))
            for j, (s, c) in enumerate(zip(scores, costs)):
                # As stored (float32), so that withdrawing it later subtracts exactly what was added.
                w = 1.0 if weights is None else float(np.float32(weights[j]))
                for b, v in s.items():
                    col = self._col[b]
                    self._scores.set(n0 + j, col, v, w)
                    self._sum[col] += w * v
                    self._wcnt[col] += w
                    self._cnt[col] += 1
                for b, v in c.items():
                    self._cost.set(n0 + j, self._col[b], v, w)
            self.index.add(emb)
            if self.ann is not None:
                self.ann.add(emb)
            alive = np.array([bool(sc) or bool(c) for sc, c in zip(scores, costs)], dtype=bool)
            self._alive = np.concatenate([self._alive[:n0], alive])
            self._dead += int((~alive).sum())
            self._bits = None
            self._ids.extend(ids)
            self._row.update((rid, n0 + j) for j, rid in enumerate(ids))
            self._update_prior()
            if (self.ann is None and not self._ann_building and self.ann_settings.kind != "off"
                    and len(self._ids) >= self.ann_settings.min_size):
                if self._log is None:           # loading: build now, the store serves once it is done
                    self.ann = self._build_ann(self.index.reconstruct_n(0, self.index.ntotal))
                else:                           # serving: build aside, searches stay exact meanwhile
                    self._ann_building = True
                    threading.Thread(target=self._build_ann_aside, name="ann-build", daemon=True).start()

    def _build_ann_aside(self) -> None:
        """Build the approximate index without holding the lock (a 100k-row HNSW takes ~20 s on 2
        cores: Routes must not wait for it), then add the rows that arrived meanwhile and swap
        it in."""
        try:
            with self._lock:
                n = self.index.ntotal
                vectors = self.index.reconstruct_n(0, n)
            ann = self._build_ann(vectors)
            with self._lock:
                extra = self.index.ntotal - n
                if extra:
                    ann.add(self.index.reconstruct_n(n, extra))
                self.ann = ann
        except Exception:
            log.exception("datastore: building the approximate index failed; searches stay exact")
        finally:
            self._ann_building = False

    def _ann_shape(self, n: int) -> tuple[str, int]:
        """How an approximate index of n rows is built: (kind, HNSW's efConstruction or IVF's
        number of lists); with hnsw_m, the key under which a saved one is reused."""
        a = self.ann_settings
        if a.kind == "hnsw":
            return "hnsw", a.hnsw_ef_construction or (40 if n < 500_000 else 80)
        return a.kind, int(max(64, min(16384, 2 * np.sqrt(n))))

    def _ann_key(self, n: int) -> str:
        kind, size = self._ann_shape(n)
        return f"{kind}|m={self.ann_settings.hnsw_m}|{size}|{self.dim}" if kind == "hnsw" else f"{kind}|{size}|{self.dim}"

    def _build_ann(self, vectors: npt.NDArray[np.float32]) -> Any:
        """An approximate index of ``vectors`` (rows in order). The exact index stays (snapshots
        are written from it)."""
        a, n, t0 = self.ann_settings, len(vectors), time.perf_counter()
        kind, size = self._ann_shape(n)
        ann: Any
        if kind == "hnsw":
            ann = faiss.IndexHNSWFlat(self.dim, a.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            ann.hnsw.efConstruction = size
        else:
            ann = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, size, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            ann.train(vectors[rng.choice(n, min(n, 40 * size), replace=False)])
        ann.add(vectors)
        log.info("datastore: %s index of %d rows built in %.1f s", a.kind, n, time.perf_counter() - t0)
        return ann

    def _update_prior(self) -> None:
        total = self._sum.sum() / self._wcnt.sum() if self._cnt.sum() > 0 and self._wcnt.sum() > 0 else 0.5
        has = (self._cnt > 0) & (self._wcnt > 0)
        self._prior = np.where(has, self._sum / np.maximum(self._wcnt, 1e-12), total).astype(np.float32)

    def insert(self, embeddings: npt.NDArray[np.float32], records: Sequence[OutcomeRecord]) -> None:
        """Make outcomes visible to estimates without logging them: for outcomes whose durability
        another log owns (onboarded backends' aptitude results live in the backend registry's log
        and are replayed from there). embeddings: float32 (len(records), d), unit rows."""
        self._insert_records(embeddings, records)

    def retract(self, ids: Sequence[str], backend: str) -> int:
        """Withdraw ``backend``'s scores and costs on the records ``ids`` (an onboarded backend's
        superseded aptitude results); their rows stay for the other backends. Returns how many
        scores were withdrawn."""
        with self._lock:
            col = self._col.get(backend)
            if col is None:
                return 0
            n = 0
            for rid in ids:
                row = self._row.get(rid)
                if row is None:
                    continue
                n += self._unset(row, col)
            self._update_prior()
            return n

    def _unset(self, row: int, col: int) -> int:
        """Withdraw one observation (with its cost); 1 if there was a score (call holding the lock)."""
        self._cost.unset(row, col)
        got = self._scores.get(row, col)
        if got is None:
            return 0
        v, w = got
        self._scores.unset(row, col)
        self._sum[col] -= w * v
        self._wcnt[col] -= w
        self._cnt[col] -= 1
        if self._cnt[col] == 0:           # no rounding residue may pose as a prior
            self._sum[col] = self._wcnt[col] = 0.0
        if self._alive[row] and not self._scores.seen[row].any() and not self._cost.seen[row].any():
            self._alive[row] = False
            self._dead += 1
            self._bits = None
        return 1

    def _search(self, q: npt.NDArray[np.float32], k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The index's search, skipping dead rows (call holding the lock). Without the skip,
        four retracted duplicates of a prompt took four of its eight neighbour slots and moved
        its estimate from 0.70 to 0.51 after the retraction (tests/router/serving/test_replicas.py)."""
        a = self.ann_settings
        if self.ann is None:
            index, params = self.index, faiss.SearchParameters()
        elif a.kind == "hnsw":
            index, params = self.ann, faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in the stubs
            params.efSearch = max(a.hnsw_ef_search, k)
        else:
            index, params = self.ann, faiss.SearchParametersIVF()
            params.nprobe = a.ivf_nprobe
        if self._dead:
            if self._bits is None:
                self._bits = np.packbits(self._alive, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(len(self._alive), faiss.swig_ptr(self._bits))
            k = min(k, len(self._alive) - self._dead)
            if k <= 0:
                n = q.shape[0]
                return np.zeros((n, 0), dtype=np.float32), np.zeros((n, 0), dtype=np.int64)
        return index.search(q, k, params=params)

    def _insert_records(self, embeddings: npt.NDArray[np.float32], records: Sequence[OutcomeRecord]) -> None:
        self._insert(embeddings, [r.id for r in records], [r.scores for r in records], [r.cost for r in records])

    def priors(self) -> npt.NDArray[np.float32]:
        """float32 (B,): each backend's mean score; the global mean for a backend with none."""
        return self._prior

    def estimate(self, embeddings: npt.NDArray[np.float32], *, k: int | None = None,
                 temperature: float | None = None) -> Estimate:
        """embeddings: float32 (n, d), unit rows -> Estimate over all known backends. k and
        temperature override the store's (a broader neighbourhood for a second opinion)."""
        return self.estimate_many(embeddings, [(k or 0, temperature or 0.0)])[0]

    def estimate_many(self, embeddings: npt.NDArray[np.float32], scales: Sequence[tuple[float, float]], *,
                      recorded: bool = False) -> list[Estimate]:
        """One Estimate per neighbourhood (k, temperature) (0: the store's own), from a single
        search for the largest k: the capability encoder takes several per request. With
        ``recorded``, one more at the end: ``recorded``'s, from the same search (a second search
        cost a one-prompt prediction 0.89 ms on a 10k-row store: docs/datastore.md)."""
        q = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self.dim)
        ks = [int(k) or self.k for k, _ in scales]
        temps = [float(t) or self.temperature for _, t in scales]
        with self._lock:
            B, n = len(self.backends), q.shape[0]
            prior = self._prior
            backends = tuple(self.backends)
            if len(self._ids) == 0 or B == 0:
                z = np.zeros((n, B), dtype=np.float32)
                return [Estimate(backends, z + prior, z, z + np.nan) for _ in scales] + \
                    ([Estimate(backends, z + np.nan, z, z + np.nan)] if recorded else [])
            # A few queries: search on the calling thread. FAISS's OpenMP team would otherwise
            # wake up next to torch's spinning one and, on a small CPU, double the search time.
            faiss.omp_set_num_threads(1 if n <= 64 else self._omp_threads)
            # At least _MAX_DUPLICATES whether or not ``recorded`` is asked for: FAISS orders tied
            # neighbours (copies of one prompt) differently for different k, and the estimates must
            # not depend on whether repeats are pooled.
            sims, idx = self._search(q, min(max([*ks, _MAX_DUPLICATES]), len(self._ids)))
            valid = idx >= 0
            idx = np.maximum(idx, 0)
            val_s, seen_s = self._scores.val[idx], self._scores.seen[idx]              # (n, kmax, B)
            val_c, seen_c = self._cost.val[idx], self._cost.seen[idx]
        out = []
        a = self.prior_strength
        for k, temperature in zip(ks, temps):
            w = np.exp((sims[:, :k] - sims[:, :1]) / temperature).astype(np.float32)  # (n, k)
            w[~valid[:, :k]] = 0.0
            wk = w[:, None, :]                                                         # (n, 1, k)
            num = (wk @ val_s[:, :k])[:, 0]                                            # (n, B)
            den = (wk @ seen_s[:, :k])[:, 0]
            cnum = (wk @ val_c[:, :k])[:, 0]
            cden = (wk @ seen_c[:, :k])[:, 0]
            quality = (num + a * prior) / np.maximum(den + a, 1e-12) if a > 0 else \
                np.where(den > 0, num / np.maximum(den, 1e-12), prior)
            with np.errstate(invalid="ignore", divide="ignore"):
                cost = np.where(cden > 0, cnum / cden, np.nan)
            out.append(Estimate(backends, np.clip(quality, 0, 1, dtype=np.float32), den, cost.astype(np.float32)))
        if recorded:
            d = min(_MAX_DUPLICATES, sims.shape[1])
            out.append(_duplicates(backends, sims[:, :d], valid[:, :d], val_s[:, :d], seen_s[:, :d], val_c[:, :d],
                                   seen_c[:, :d]))
        return out

    def recorded(self, embeddings: npt.NDArray[np.float32]) -> Estimate:
        """The outcomes stored for these very prompts: for each row of embeddings (n, d), each
        backend's mean score over the stored copies of that prompt (cosine >= ``_SAME_PROMPT``; up
        to ``_MAX_DUPLICATES`` of them; feedback weighted by its key's weight), NaN where none is
        stored or none has a score for that backend. quality (n, B), support (n, B) the (weighted)
        number of copies scored, cost (n, B)."""
        return self.estimate_many(embeddings, [], recorded=True)[-1]

    def stats(self) -> dict[str, BackendStats]:
        with self._lock:
            return {b: BackendStats(int(self._cnt[i]), float(self._sum[i] / self._wcnt[i])
                                    if self._cnt[i] > 0 and self._wcnt[i] > 0 else float("nan"))
                    for i, b in enumerate(self.backends)}

    # ---- durable appends -------------------------------------------------------------------------
    def add(self, embeddings: npt.NDArray[np.float32], records: Sequence[dict[str, Any]]) -> list[str]:
        """Append outcomes durably, then make them visible to estimates.

        records[i]: {"prompt": str, "scores": {backend: score}, "cost"?: {backend: cost},
        "weight"?: w in (0, 1] (a feedback key's weight: its records count w times an outcome),
        ...extra}. Returns the new record ids. Raises if the store has no log (opened read-only).
        """
        if self._log is None:
            raise ArtifactError("this datastore was not opened with a state folder; cannot persist")
        emb = np.asarray(embeddings, dtype=np.float32).reshape(len(records), self.dim)
        entries = []
        for e, r in zip(emb, records):
            entry = dict(r)
            entry.setdefault("id", uuid.uuid4().hex)
            entry["ts"] = time.time()
            entry["embedder"] = self.embedder_id
            entry["embedding"] = encode_vector(e)
            entries.append(entry)
        self._log.append(entries)  # durable from here on
        self._insert_entries(emb, entries)
        return [e["id"] for e in entries]

    def _insert_entries(self, emb: npt.NDArray[np.float32], entries: Sequence[dict[str, Any]]) -> None:
        """Logged feedback records (with their weights and keys) into the index; emb: (n, d)."""
        self._insert(emb, [e["id"] for e in entries], [e["scores"] for e in entries],
                     [e.get("cost") or {} for e in entries], [float(e.get("weight", 1.0)) for e in entries])
        self._note_keys(entries)

    def _note_keys(self, entries: Sequence[dict[str, Any]]) -> None:
        """Index feedback by its key's name and by its key's id (names cannot look like ids: a
        name may be reused after a revocation, an id never is)."""
        with self._lock:
            for e in entries:
                for ref in {e.get("key"), e.get("key_id")} - {None, ""}:
                    self._by_key.setdefault(str(ref), []).append((e["id"], float(e.get("ts", 0.0))))

    def _withdraw(self, ids: Sequence[str]) -> int:
        """Every backend's score and cost on the records ``ids`` (their rows stay, scoreless)."""
        n = 0
        with self._lock:
            for rid in ids:
                row = self._row.get(rid)
                if row is None:
                    continue
                for col in self._col.values():
                    n += self._unset(row, col)
            self._update_prior()
        return n

    def retract_feedback(self, key: str, since: float | None = None) -> int:
        """Withdraw the logged feedback API key ``key`` (a name, or a key id) sent (at or after ``since``, a unix time),
        durably: the log gets one retraction record naming the records, which a replay honours;
        the records themselves are not rewritten. Returns how many records were withdrawn."""
        if self._log is None:
            raise ArtifactError("this datastore was not opened with a state folder; cannot persist")
        with self._lock:
            ids = [rid for rid, ts in self._by_key.get(key, []) if since is None or ts >= since]
        if not ids:
            return 0
        self._log.append([{"op": "retract", "key": key, "since": since, "ids": ids, "ts": time.time()}])
        self._forget(ids)
        return len(ids)

    def _forget(self, ids: Sequence[str]) -> None:
        """Retracted feedback: its scores withdrawn, and no longer listed under its key."""
        self._withdraw(ids)
        gone = set(ids)
        with self._lock:
            for ref, sent in list(self._by_key.items()):
                self._by_key[ref] = [x for x in sent if x[0] not in gone]

    # ---- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_records(cls, embeddings: npt.NDArray[np.float32], records: Sequence[OutcomeRecord], *,
                     embedder_id: str = "", k: int = 32, prior_strength: float = 2.0,
                     temperature: float = 0.05, ann: AnnSettings = AnnSettings()) -> FaissKnnDatastore:
        """An in-memory store (no state folder, ``add`` refused): for evaluation and tests.

        embeddings: float32 (len(records), d), unit rows.
        """
        store = cls(int(embeddings.shape[1]), embedder_id, k=k, prior_strength=prior_strength, temperature=temperature,
                    ann=ann)
        store._insert_records(embeddings, records)
        return store

    @classmethod
    def open(cls, state_dir: str | Path, encoder: Any, outcome_files: Sequence[str | Path], *,
             k: int = 32, prior_strength: float = 2.0, temperature: float = 0.05,
             encoder_settings: str = "", progress: bool = True,
             base: tuple[npt.NDArray[np.float32], Sequence[OutcomeRecord], str] | None = None,
             feedback_log: RecordLog | None = None, ann: AnnSettings = AnnSettings()) -> FaissKnnDatastore:
        """Load (or build) the snapshot of ``outcome_files`` and replay the feedback log.

        encoder: a PromptEncoder, used for building and for re-embedding logged prompts whose
        embedder differs from the current one. base: (embeddings, records, hash) of outcomes
        already embedded (a trained artifact's), used instead of ``outcome_files``. feedback_log:
        where feedback is recorded (the system of record's ``feedback`` stream); None: a file log,
        ``feedback.log`` in the state folder (tools and tests).
        """
        state = Path(state_dir)
        state.mkdir(parents=True, exist_ok=True)
        files = [Path(p) for p in outcome_files]
        digest = (hashlib.sha256(f"base|{base[2]}|{encoder.model_id}".encode()).hexdigest() if base
                  else source_hash(files, encoder.model_id, encoder_settings))
        store = cls(encoder.dim, encoder.model_id, k=k, prior_strength=prior_strength, temperature=temperature, ann=ann)
        store.state_dir = state
        snap = state / "snapshot"
        manifest = _read_manifest(snap)
        if manifest and manifest.get("source_hash") == digest and manifest.get("dim") == encoder.dim:
            reused = store._load_snapshot(snap, manifest)
            log.info("datastore: loaded snapshot of %d outcomes from %s", len(store), snap)
            if store.ann is not None and not reused:
                store._save_ann(snap, manifest)      # built on this load: the next start reads it
        else:
            if base:
                store._insert_records(base[0], base[1])
            else:
                store._build(files, encoder, progress=progress)
            store._write_snapshot(snap, digest, [str(p) for p in files])
            log.info("datastore: built snapshot of %d outcomes in %s", len(store), snap)
        store._log = feedback_log if feedback_log is not None else AppendLog.open(state / "feedback.log")
        store._replay(store._log.replayed, encoder)
        return store

    def _build(self, files: Sequence[Path], encoder: Any, *, progress: bool) -> None:
        records: list[OutcomeRecord] = [r for p in files for r in read_outcomes(p)]
        emb = _encode_all(encoder, [r.prompt for r in records], progress=progress, what="embedding outcomes")
        self._insert_records(emb, records)

    def _write_snapshot(self, snap: Path, digest: str, sources: list[str]) -> None:
        tmp = snap.with_name(f"snapshot.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        faiss.write_index(self.index, str(tmp / "index.faiss"))
        with open(tmp / "records.jsonl", "w") as f:
            for i, rid in enumerate(self._ids):
                # The snapshot holds outcome files' records only (weight 1); feedback is replayed from its log.
                scores = {b: self._scores.get(i, c) for b, c in self._col.items()}
                costs = {b: self._cost.get(i, c) for b, c in self._col.items()}
                f.write(json.dumps({"id": rid, "scores": {b: v[0] for b, v in scores.items() if v is not None},
                                    "cost": {b: v[0] for b, v in costs.items() if v is not None}}) + "\n")
        manifest = {"format": SNAPSHOT_FORMAT, "embedder": self.embedder_id, "dim": self.dim,
                    "source_hash": digest, "sources": sources, "records": len(self),
                    "backends": self.backends, "created_unix": time.time()}
        if self.ann is not None and self.ann.ntotal == len(self):
            faiss.write_index(self.ann, str(tmp / "ann.faiss"))
            manifest["ann"] = self._ann_key(len(self))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = snap.with_name("snapshot.old")
        shutil.rmtree(old, ignore_errors=True)
        if snap.exists():
            snap.rename(old)
        tmp.rename(snap)
        fsync_dir(snap.parent)
        shutil.rmtree(old, ignore_errors=True)

    def _load_snapshot(self, snap: Path, manifest: dict[str, Any]) -> bool:
        """Load the snapshot's rows, and its approximate index where the settings still build that
        one (an HNSW index of 100k rows took 16 s to build on 2 cores, of 1M 332 s: every start
        of every replica). Returns whether the saved approximate index was reused."""
        index = faiss.read_index(str(snap / "index.faiss"))
        rows = [json.loads(line) for line in open(snap / "records.jsonl")]
        if index.ntotal != len(rows) or index.d != self.dim:
            raise ArtifactError(f"snapshot {snap} is inconsistent: {index.ntotal} vectors, {len(rows)} records")
        emb = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, self.dim), np.float32)
        saved = self._read_ann(snap, manifest, len(rows))
        # With a saved index, none is built while the rows go in (the flag that keeps a second
        # build from starting); it is attached once they are in.
        self._ann_building = saved is not None
        try:
            self._insert(emb, [r["id"] for r in rows], [r["scores"] for r in rows],
                         [r.get("cost") or {} for r in rows])
        finally:
            self._ann_building = False
        if saved is not None:
            self.ann = saved
        return saved is not None

    def _read_ann(self, snap: Path, manifest: dict[str, Any], n: int) -> Any:
        """The snapshot's approximate index, if it was built as these settings would build one for
        its n rows; None otherwise (the store builds one if it needs it)."""
        a = self.ann_settings
        if a.kind == "off" or n < a.min_size or manifest.get("ann") != self._ann_key(n):
            return None
        try:
            ann = faiss.read_index(str(snap / "ann.faiss"))
        except RuntimeError:          # FAISS reports a missing or truncated file so
            log.warning("datastore: the saved approximate index in %s is unreadable; rebuilding it", snap)
            return None
        if ann.ntotal != n or ann.d != self.dim:
            log.warning("datastore: the saved approximate index in %s does not match its snapshot; rebuilding it", snap)
            return None
        log.info("datastore: reused the saved %s index of %d rows", a.kind, n)
        return ann

    def _save_ann(self, snap: Path, manifest: dict[str, Any]) -> None:
        """Add the approximate index built on this load to the snapshot: the file first, then the
        manifest that names it (a crash between them leaves a manifest without it: rebuilt)."""
        try:
            tmp = snap / f"ann.faiss.tmp-{os.getpid()}"
            faiss.write_index(self.ann, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, snap / "ann.faiss")
            mtmp = snap / f"manifest.json.tmp-{os.getpid()}"
            mtmp.write_text(json.dumps({**manifest, "ann": self._ann_key(self.ann.ntotal)}, indent=2))
            with open(mtmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(mtmp, snap / "manifest.json")
            fsync_dir(snap)
        except (OSError, RuntimeError) as e:      # a read-only state folder: it is rebuilt next time
            log.warning("datastore: could not save the approximate index in %s: %s", snap, e)

    def _replay(self, entries: list[dict[str, Any]], encoder: Any) -> None:
        n, gone = self._apply(entries, encoder)
        if n or gone:
            log.info("datastore: replayed %d feedback records (%d retracted left out)", n, gone)

    def _apply(self, entries: list[dict[str, Any]], encoder: Any) -> tuple[int, int]:
        """Logged entries in order: records join the index, retractions withdraw theirs (from
        the batch, and from the index when an earlier batch brought them). Returns (records
        added, records retracted)."""
        retracted = [rid for e in entries if e.get("op") == "retract" for rid in e["ids"]]
        gone = set(retracted)
        entries = [e for e in entries if e.get("op") is None and e["id"] not in gone]
        same = [e for e in entries if e.get("embedder") == self.embedder_id and "embedding" in e]
        other = [e for e in entries if not (e.get("embedder") == self.embedder_id and "embedding" in e)]
        if same:
            self._insert_entries(np.stack([decode_vector(e["embedding"], self.dim) for e in same]), same)
        if other:
            log.info("datastore: re-embedding %d logged outcomes for embedder %s", len(other), self.embedder_id)
            self._insert_entries(_encode_all(encoder, [e["prompt"] for e in other], progress=False,
                                             what="re-embedding"), other)
        if gone:
            self._forget(retracted)
        return len(entries), len(gone)

    def follow(self, encoder: Any) -> int:
        """Apply what other replicas appended to the feedback log since the last call (records
        and retractions); returns how many entries arrived."""
        if self._log is None:
            return 0
        entries = self._log.follow()
        if entries:
            self._apply(entries, encoder)
        return len(entries)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _read_manifest(snap: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((snap / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _encode_all(encoder: Any, texts: Iterable[str], *, progress: bool, what: str) -> npt.NDArray[np.float32]:
    from tqdm import tqdm

    texts = list(texts)
    step = 256
    parts = []
    with tqdm(total=len(texts), desc=what, unit="prompt", disable=not progress or len(texts) < step) as bar:
        for s in range(0, len(texts), step):
            parts.append(encoder.encode(texts[s:s + step]))
            bar.update(min(step, len(texts) - s))
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float32)
