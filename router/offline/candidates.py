"""Which router `caprouter train` serves: every candidate measured on held-out folds of the
training data, the best one kept.

Why: a learned model beats the plain datastore on the data sets it was developed on, but on a
user's own data (often hundreds of prompts, few backends) it can lose to a plain kNN average, and
a router that ships must at least match the simplest baseline on that data. So nothing is assumed:
the candidates are

- the datastore alone, at several neighbourhoods (k, temperature), a near-plain average among
  them (RouterBench's kNN router);
- the capability encoder blended with the datastore, with each loss variant (full objective and
  its ablations);
- a learned router without the datastore: an MLP, and RouteLLM's matrix factorization (a linear
  prompt map, one vector per backend);
- ensembles: the mean of several of the above's predicted quality, two fixed sets of members,
  each also with a cluster table (per-region mean scores, router/prediction/clusters.py; see
  ``ENSEMBLES``).

Each is scored on ``folds`` held-out folds of the rows that are not test data (and, where the
data has categories, on folds that hold out whole categories: see ``select``), trained on the
others exactly as it would be for serving (early stopping on a tenth of them, the datastore's
estimates for its own training prompts out of fold), with the metric that fits the data: AIQ
when the backends' costs differ, accuracy of the chosen backend when they are all equal. What
wins is the largest margin over plain kNN that the folds vouch for: the mean per-fold margin less
one standard error, and with categories the worse of that on random and on category folds
(see ``select``); a tie goes to the simpler candidate (list order), so kNN itself is served
unless something beats it by more than the folds' noise. Below ``min_model_prompts`` rows only
the datastore is tried, and the report says so.

Everything here is what serving computes: a datastore candidate is the served Predictor without
a capability model, a learned one the served blend (``knn_blend=False`` for the plain routers).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from datastore.base import Datastore, Estimate
from datastore.records import OutcomeRecord
from encoders.capability import CANDIDATE_WEIGHTS, CapabilityConfig, predict, train
from router.core.config import DatastoreConfig
from router.offline.evaluation import evaluate
from router.offline.routing_data import RoutingData
from router.prediction.clusters import CLUSTERS, ClusterTable
from router.prediction.predictor import knn_estimates, knn_quality, knn_store, pool_repeats

# Below this many prompts a learned model is not tried: measured on the shared data sets'
# subsets, the blend's fold-to-fold spread at 100-200 prompts exceeds its margin over the datastore.
MIN_MODEL_PROMPTS = 200

# Datastore neighbourhoods tried, as (k, temperature); (0, 0) is the configured one. A large
# temperature weighs the k neighbours equally: RouterBench's kNN router (k=40) is among them.
DATASTORE_SCALES: tuple[tuple[int, float], ...] = ((0, 0.0), (10, 0.05), (100, 0.05), (10, 100.0), (40, 100.0),
                                                   (100, 100.0))


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: Literal["datastore", "capability", "clusters", "ensemble"]
    scale: tuple[int, float] = (0, 0.0)            # datastore: (k, temperature); 0: the configured value
    clusters: int = 0                              # clusters: how many regions (an ensemble member only)
    capability: CapabilityConfig | None = None     # capability: how to train it
    members: tuple[Candidate, ...] = ()            # ensemble: whose predicted quality it averages


# The ensembles tried: averages of diverse candidates' predicted quality, which differ in how they
# err (neighbours' means, a prompt map fitted to all rows, the blend between them), so the mean
# has less variance than any of them. Only these two are tried, fixed in advance: choosing the
# best of the 2^n subsets on the same folds would flatter the winner. Measured (seed 0, 3 random +
# 3 category folds of the shared sets' training rows, the rule of ``select``) against the best
# single candidate's vouched margin over kNN: the first is LLMRouter +0.0027 (single best: kNN
# itself, 0), RouteLLM +0.0018 (+0.0007); the second MMLU-Pro +0.0153 (+0.0123, MF). The best of
# the 50 subsets of two to four of six candidates was within 0.0004 of these on each set. Each is
# also tried with a cluster table as one more member (router/prediction/clusters.py, measured
# there): on the folds it gained on some sets and kinds of folds and lost on others, by about a
# thousandth, so the folds choose per data set; the members' fits are shared, the table costs a
# k-means.
CLUSTER_TABLE = f"cluster table {CLUSTERS} regions"
_PLAIN_ENSEMBLES = (
    ("datastore k=40 temperature=100", "datastore k=100 temperature=100", "MLP", "blend w_con=0 w_ot=0"),
    ("matrix factorization", "MLP", "blend w_con=0 w_ot=0"),
)
ENSEMBLES: tuple[tuple[str, ...], ...] = (*_PLAIN_ENSEMBLES, *((*e, CLUSTER_TABLE) for e in _PLAIN_ENSEMBLES))


def ensemble_name(members: Sequence[str]) -> str:
    return "ensemble: " + " + ".join(members)


def default_candidates(base: CapabilityConfig) -> list[Candidate]:
    """The candidates in order of simplicity (ties go to the earlier one)."""
    out = [Candidate("datastore (configured k, temperature)" if k == 0 else f"datastore k={k} temperature={t:g}",
                     "datastore", (k, t)) for k, t in DATASTORE_SCALES]
    plain = replace(base, w_con=0.0, w_ot=0.0, codes=1, knn_blend=False, knn_scales=None)
    out.append(Candidate("matrix factorization", "capability", capability=replace(plain, hidden=0)))
    out.append(Candidate("MLP", "capability", capability=plain))
    out += [Candidate(f"blend w_con={a:g} w_ot={b:g}", "capability", capability=replace(base, w_con=a, w_ot=b))
            for a, b in CANDIDATE_WEIGHTS]
    # A cluster table is served only inside an ensemble (``Ensemble`` needs a learned member).
    by_name = {c.name: c for c in out} | {CLUSTER_TABLE: Candidate(CLUSTER_TABLE, "clusters", clusters=CLUSTERS)}
    out += [Candidate(ensemble_name(m), "ensemble", members=tuple(by_name[n] for n in m)) for m in ENSEMBLES]
    return out


# The simplest baseline a served router must match: RouterBench's kNN router, as a candidate.
REFERENCE = "datastore k=40 temperature=100"


@dataclass
class SelectionReport:
    metric: str                                    # "aiq" or "accuracy"
    folds: int
    scores: dict[str, list[float]]                 # candidate -> its metric on each random fold
    chosen: Candidate
    note: str = ""
    per_fold_n: list[int] = field(default_factory=list)
    # candidate -> its metric on each category-held-out fold (None: the data has too few categories)
    grouped: dict[str, list[float]] | None = None

    def mean(self, name: str) -> float:
        return float(np.mean(self.scores[name]))

    def grouped_mean(self, name: str) -> float | None:
        return None if self.grouped is None else float(np.mean(self.grouped[name]))

    def merit(self, name: str) -> float:
        """What the choice maximizes: the worse vouched margin over the reference across the
        kinds of folds (see ``select``); the random-fold mean without the reference."""
        if REFERENCE not in self.scores:
            return self.mean(name)
        kinds = [self.scores] if self.grouped is None else [self.scores, self.grouped]
        return min(vouched_margin(np.subtract(k[name], k[REFERENCE])) for k in kinds)

    def as_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "folds": self.folds, "held_out_prompts_per_fold": self.per_fold_n,
                "chosen": self.chosen.name, "note": self.note, "reference": REFERENCE,
                "candidates": [{"name": n, "mean": self.mean(n), "std": float(np.std(v)), "per_fold": v,
                                **({"merit": self.merit(n)} if REFERENCE in self.scores else {}),
                                **({"category_held_out_mean": self.grouped_mean(n),
                                    "category_held_out_per_fold": self.grouped[n]} if self.grouped else {})}
                               for n, v in self.scores.items()]}



def selection_table(sel: dict[str, Any]) -> str:
    """The manifest's ``metrics.selection`` as a plain-text table, in the order of the choice."""
    rows = sorted(sel["candidates"], key=lambda c: -c.get("merit", c["mean"]))
    w = max(len(c["name"]) for c in rows)
    grouped = "category_held_out_mean" in rows[0]
    head = f"{sel['metric']}, mean of {sel['folds']} held-out folds"
    lines = [f"{'candidate':<{w}}  {head:>34}  {'sd':>6}" + ("  categories held out" if grouped else "")
             + "  margin over kNN, less 1 SE"]
    for c in rows:
        mark = "  <- served" if c["name"] == sel["chosen"] else ""
        g = f"  {c['category_held_out_mean']:>20.4f}" if grouped else ""
        lines.append(f"{c['name']:<{w}}  {c['mean']:>34.4f}  {c['std']:>6.4f}{g}  {c.get('merit', float('nan')):>+27.4f}"
                     f"{mark}")
    if sel.get("note"):
        lines.append(sel["note"])
    return "\n".join(lines)


def equal_costs(C: npt.NDArray[np.floating[Any]]) -> bool:
    """True when every backend costs the same on average (quality-only routing)."""
    m = np.nanmean(C, 0)
    return bool(np.nanmax(m) - np.nanmin(m) <= 1e-9 * max(1.0, float(np.nanmax(np.abs(m)))))


def fold_split(n: int, folds: int, seed: int) -> npt.NDArray[np.int64]:
    """(n,) fold of each row: a seeded shuffle dealt round-robin (sizes differ by at most one)."""
    return (np.random.default_rng(seed).permutation(n) % folds).astype(np.int64)


def inner_split(rows: npt.NDArray[np.int64], seed: int, share: float = 0.1
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(train, validation) of ``rows``: a seeded ``share`` for early stopping, at least one row."""
    perm = np.random.default_rng(seed).permutation(rows)
    nv = max(1, int(round(share * len(rows))))
    return np.sort(perm[nv:]), np.sort(perm[:nv])


def out_of_fold_knn(X: npt.NDArray[np.float32], records: Sequence[OutcomeRecord], backends: list[str],
                    ds_cfg: DatastoreConfig, *, folds: int = 5, seed: int = 0,
                    scales: list[list[float]] | None = None) -> npt.NDArray[np.float32]:
    """kNN estimates for training prompts from stores that do not hold them (k-fold), so the
    encoder learns how far to trust the datastore on prompts it has not memorized. (n, B), or
    (n, B, S) at the neighbourhoods ``scales``."""
    fold = np.random.default_rng(seed).permutation(len(X)) % folds
    out = np.zeros((len(X), len(backends), *([len(scales)] if scales else [])), np.float32)
    for f in range(folds):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        store = knn_store(X[tr], [records[i] for i in tr], ds_cfg)
        out[te] = knn_quality(store, X[te], backends, scales)
    return out


def knn_training_inputs(X, records, backends, ds: DatastoreConfig, tr, va, cfg: CapabilityConfig, seed: int, *,
                        store: Datastore | None = None):
    """What the blend trains on: out-of-fold kNN estimates for its training rows and the
    training rows' store's estimates for its validation rows, at the model's neighbourhoods.
    ``store``: that store, when the caller has built it already."""
    K = out_of_fold_knn(X[tr], [records[i] for i in tr], backends, ds, seed=seed, scales=cfg.knn_scales)
    if store is None:
        store = knn_store(X[tr], [records[i] for i in tr], ds)
    return K, knn_quality(store, X[va], backends, cfg.knn_scales)


def shared_knn_inputs(cache: dict[str, Any], X, data: RoutingData, ds: DatastoreConfig, tr, va,
                      cfg: CapabilityConfig, seed: int, *, store: Datastore | None = None) -> tuple[Any, Any]:
    """``knn_training_inputs`` for a model of ``cfg``, computed once per set of neighbourhoods in
    ``cache`` (models that take the same datastore inputs share them); (None, None) for a model
    that takes none."""
    if not cfg.knn_blend:
        return None, None
    key = repr(cfg.knn_scales)
    if key not in cache:
        cache[key] = knn_training_inputs(X, data.records, data.backends, ds, tr, va, cfg, seed, store=store)
    return cache[key]


def vouched_margin(margins: npt.ArrayLike) -> float:
    """Mean of per-fold margins less one standard error of that mean (0 for all-zero margins)."""
    d = np.asarray(margins, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) - se


def category_fold_split(categories: Sequence[str], folds: int, seed: int) -> npt.NDArray[np.int64] | None:
    """(n,) fold of each row with whole categories dealt (seeded) into ``folds`` groups, or None
    when there are fewer than 2 x ``folds`` categories (too few to hold any out fairly)."""
    cats = sorted(set(categories) - {""})
    if len(cats) < 2 * folds or "" in set(categories):
        return None
    order = np.random.default_rng(seed).permutation(len(cats))
    group = {cats[j]: i % folds for i, j in enumerate(order)}
    return np.array([group[c] for c in categories], dtype=np.int64)


class _Fold:
    """One fold's predictions: each candidate trained on ``train_rows`` as for serving, its
    quality for the complete rows of ``held``; computed once per candidate (an ensemble's members
    too, whether or not they are candidates themselves)."""

    def __init__(self, X, data: RoutingData, train_rows, held, ds: DatastoreConfig, scales: list[list[float]],
                 seed: int, inner_seed: int) -> None:
        self.X, self.data, self.ds, self.scales, self.seed = X, data, ds, scales, seed
        self.held = held
        self.fallback = np.nanmean(data.C[train_rows], 0)
        self.train_rows = train_rows
        self.store = knn_store(X[train_rows], [data.records[i] for i in train_rows], ds)
        self.Qds, self.Chat = knn_estimates(self.store, X[held], data.backends, self.fallback, scales=scales or None)
        self.tr, self.va = inner_split(train_rows, inner_seed)
        self.knn_inputs: dict[str, Any] = {}
        self.preds: dict[str, npt.NDArray[np.float32]] = {}
        self.recorded: Estimate | None = None

    def quality(self, c: Candidate) -> npt.NDArray[np.float32]:
        """(len(held), B) predicted quality of candidate ``c``, as the Predictor serves it (with
        the held prompts' repeats in the store pooled in, where the datastore config says so; an
        ensemble's members are pooled already, and pooling is linear)."""
        if c.name not in self.preds:
            q = self._predict(c)
            if self.ds.repeats and c.kind != "ensemble":
                if self.recorded is None:
                    self.recorded = self.store.recorded(self.X[self.held])
                q = pool_repeats(q, self.recorded, self.data.backends)
            self.preds[c.name] = q
        return self.preds[c.name]

    def _predict(self, c: Candidate) -> npt.NDArray[np.float32]:
        if c.kind == "datastore":
            return self.Qds[..., self.scales.index(list(c.scale))]
        if c.kind == "ensemble":
            return np.mean([self.quality(m) for m in c.members], 0).astype(np.float32)
        if c.kind == "clusters":    # on every training row, as the datastore: nothing to stop early
            rows = self.train_rows
            table = ClusterTable.fit(self.X[rows], self.data.Y[rows], self.data.backends, clusters=c.clusters,
                                     seed=self.seed)
            return table.predict(self.X[self.held])
        assert c.capability is not None
        X, data, tr, va = self.X, self.data, self.tr, self.va
        # Patience 10 instead of 20 while choosing: the ranking, not the last 0.001 of each fit,
        # is what this needs (it halves the time of the slowest fits).
        cfg = replace(c.capability, patience=min(c.capability.patience, 10))
        K, Kv = shared_knn_inputs(self.knn_inputs, X, data, self.ds, tr, va, cfg, self.seed)
        model = train(X[tr], data.Y[tr], X[va], data.Y[va], cfg, K=K, Kv=Kv).model
        Kh = knn_estimates(self.store, X[self.held], data.backends, self.fallback, scales=cfg.knn_scales)[0] \
            if cfg.knn_blend else None
        return predict(model, X[self.held], Kh)


def _score(X, data: RoutingData, rows, fold, folds: int, ds: DatastoreConfig, cands: Sequence[Candidate],
           metric: str, seed: int, bar: Any) -> tuple[dict[str, list[float]], list[int]]:
    """Each candidate's metric on each fold of ``rows`` (``fold``: (len(rows),) fold ids), trained
    on the other folds as for serving."""
    complete = data.complete_rows()
    scores: dict[str, list[float]] = {c.name: [] for c in cands}
    per_fold_n = []
    scales = list({tuple(m.scale): list(m.scale) for c in cands for m in (*c.members, c)
                   if m.kind == "datastore"}.values())
    for f in range(folds):
        held = rows[fold == f]
        held = held[complete[held]]
        per_fold_n.append(int(len(held)))
        if not len(held):
            raise ValueError("a fold holds no prompt scored for every backend: too few complete rows to choose")
        part = _Fold(X, data, rows[fold != f], held, ds, scales, seed, seed + f)
        Y, C = data.Y[held], data.C[held]
        for c in cands:
            scores[c.name].append(float(evaluate(part.quality(c), part.Chat, Y, C)[metric]))
            bar.update(1)
    return scores, per_fold_n


def select(X: npt.NDArray[np.float32], data: RoutingData, rows: npt.NDArray[np.int64], ds: DatastoreConfig,
           candidates: Sequence[Candidate], *, folds: int = 3, seed: int = 0,
           min_model_prompts: int = MIN_MODEL_PROMPTS, progress: bool = False) -> SelectionReport:
    """Score ``candidates`` on ``folds`` held-out folds of ``rows`` (indices into ``data``; never
    test rows) and return the report with the chosen one. X: (n, d) embeddings of all of data.

    Where the rows carry categories (at least 2 x ``folds`` of them), every candidate is also
    scored on folds that hold out whole categories, the traffic a router meets when users bring
    new kinds of prompts.

    The chosen candidate has the largest *vouched-for* margin over the reference (plain kNN,
    k=40): per kind of folds, its mean per-fold margin less one standard error of it (Breiman's
    one-standard-error rule, against the simplest baseline instead of the best), and the worse
    of the two kinds. The reference's own is 0, so a candidate is served only when it beats kNN by
    more than the folds' noise, in distribution and on unseen categories. Measured on LLMRouter's
    category-held-out splits: choosing on random folds alone served a blend below kNN on each of
    the three (0.4207, 0.7724, 0.5413 against 0.4264, 0.7736, 0.5424); the worse of the two
    kinds' mean margins still left one split 0.005 below kNN, among candidates within 0.005 of
    each other. Without the reference among the candidates (``--router learned``), the best
    random-fold mean wins."""
    from tqdm import tqdm

    metric = "accuracy" if equal_costs(data.C[rows]) else "aiq"
    note = ""
    cands = list(candidates)
    if len(rows) < min_model_prompts:
        cands = [c for c in cands if c.kind == "datastore"]
        note = (f"{len(rows)} prompts: fewer than the {min_model_prompts} a learned router needs here, so only the "
                "datastore was tried")
    folds = max(2, min(folds, len(rows) // 2))
    by_cat = category_fold_split([data.categories[i] for i in rows], folds, seed) if data.categories else None
    bar = tqdm(total=folds * len(cands) * (1 if by_cat is None else 2), desc="choosing the router", unit="fit",
               disable=not progress)
    scores, per_fold_n = _score(X, data, rows, fold_split(len(rows), folds, seed), folds, ds, cands, metric, seed, bar)
    grouped = None
    if by_cat is not None:
        grouped, _ = _score(X, data, rows, by_cat, folds, ds, cands, metric, seed, bar)
    bar.close()

    report = SelectionReport(metric, folds, scores, cands[0], note, per_fold_n, grouped)
    report.chosen = max(cands, key=lambda c: report.merit(c.name))   # the first of equals: the simpler one
    return report
