"""`caprouter train` chooses its router on held-out folds (router/offline/candidates.py): on
synthetic data (no encoder) whose structure decides which candidate should win."""
from __future__ import annotations

import numpy as np
import pytest

from datastore.records import OutcomeRecord
from encoders.capability import CapabilityConfig
from router.core.config import DatastoreConfig
from router.offline.candidates import (
    MIN_MODEL_PROMPTS,
    REFERENCE,
    category_fold_split,
    default_candidates,
    equal_costs,
    fold_split,
    select,
    selection_table,
    vouched_margin,
)
from router.offline.routing_data import RoutingData
from router.prediction.clusters import ClusterTable

QUICK = CapabilityConfig(max_epochs=8, patience=3, hidden=32, dim=8, codes=2)
# Enough training for the learned candidates to find a boundary (lr and batch for 400 prompts).
LEARN = CapabilityConfig(max_epochs=40, patience=5, hidden=32, dim=8, codes=2, lr=1e-2, batch_size=64)


def _data(n: int, *, costs=(1.0, 3.0), seed: int = 0, noise: float = 0.0) -> tuple[np.ndarray, RoutingData]:
    """n prompts on the unit sphere in 8-d; backend 1 answers prompts with x0 > 0, backend 0 the
    rest (flipped with probability ``noise``)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    good = (X[:, 0] > 0) ^ (rng.random(n) < noise)
    Y = np.stack([~good, good], 1).astype(np.float32)
    C = np.tile(np.asarray(costs, np.float32), (n, 1))
    backends = ["a", "b"]
    recs = [OutcomeRecord(id=str(i), prompt=f"p{i}", scores={b: float(Y[i, j]) for j, b in enumerate(backends)},
                          cost={b: float(C[i, j]) for j, b in enumerate(backends)}) for i in range(n)]
    return X, RoutingData([r.prompt for r in recs], [str(i) for i in range(n)], ["c"] * n, ["train"] * n, backends,
                          Y, C, "h", recs)


def test_folds_partition_the_rows_evenly_and_are_seeded():
    f = fold_split(101, 3, seed=4)
    assert sorted(np.bincount(f).tolist()) == [33, 34, 34]
    assert np.array_equal(f, fold_split(101, 3, seed=4)) and not np.array_equal(f, fold_split(101, 3, seed=5))


def test_the_chosen_candidate_beats_plain_knn_by_the_most_the_folds_vouch_for():
    X, data = _data(240, noise=0.1)
    tried = [c for c in default_candidates(QUICK) if c.kind == "datastore" or c.name == "matrix factorization"]
    rep = select(X, data, np.arange(240), DatastoreConfig(), tried, folds=3, seed=0)
    assert rep.metric == "aiq" and rep.folds == 3 and sum(rep.per_fold_n) == 240
    means = {n: rep.mean(n) for n in rep.scores}
    # RouterBench's kNN router (k=40, equal weights) is a candidate, and the served one's margin
    # over it, less a standard error of the per-fold margins, is the largest and never negative.
    assert REFERENCE in means

    def vouched(n):
        d = np.subtract(rep.scores[n], rep.scores[REFERENCE])
        return d.mean() - d.std(ddof=1) / np.sqrt(len(d))
    assert vouched(rep.chosen.name) == max(vouched(n) for n in means) >= 0.0
    assert vouched_margin([0.0, 0.0, 0.0]) == 0.0 and vouched_margin([0.02, 0.01, 0.03]) == pytest.approx(0.02 - 0.01 / 3 ** 0.5)
    # A mean gain that one fold contradicts is not vouched for: kNN itself (margin 0) beats it.
    assert vouched_margin([0.03, 0.03, -0.04]) < 0
    assert all(len(v) == 3 and 0 <= min(v) for v in rep.scores.values())
    j = rep.as_json()
    assert j["chosen"] == rep.chosen.name and len(j["candidates"]) == len(tried)
    table = selection_table(j)
    assert "<- served" in table and table.splitlines()[1].startswith(rep.chosen.name)


@pytest.mark.slow   # 18 learned fits
def test_a_linear_boundary_is_learned_where_the_datastore_only_averages_neighbours():
    """Quality decided by a half-space: the learned routers see the boundary, kNN blurs it."""
    X, data = _data(400, seed=1)
    rep = select(X, data, np.arange(400), DatastoreConfig(), default_candidates(LEARN), folds=3, seed=0)
    assert rep.chosen.kind == "capability", rep.as_json()
    assert rep.mean(rep.chosen.name) > rep.mean("datastore k=40 temperature=100")


def test_too_few_prompts_for_a_model_serve_the_datastore_and_say_so():
    X, data = _data(MIN_MODEL_PROMPTS - 1, seed=2)
    rep = select(X, data, np.arange(len(data)), DatastoreConfig(), default_candidates(QUICK), seed=0)
    assert rep.chosen.kind == "datastore" and all(n.startswith("datastore") for n in rep.scores)   # no ensemble
    assert f"fewer than the {MIN_MODEL_PROMPTS}" in rep.note


def test_equal_costs_are_chosen_on_accuracy():
    X, data = _data(240, costs=(2.0, 2.0), seed=3, noise=0.05)
    assert equal_costs(data.C) and not equal_costs(_data(10)[1].C)
    rep = select(X, data, np.arange(240), DatastoreConfig(), default_candidates(QUICK)[:3], seed=0)
    assert rep.metric == "accuracy"
    assert 0.5 < rep.mean(rep.chosen.name) <= 1.0


def test_a_fold_without_complete_rows_is_a_clear_error():
    X, data = _data(20, seed=4)
    data.Y[:, 1] = np.nan
    with pytest.raises(ValueError, match="no prompt scored for every backend"):
        select(X, data, np.arange(20), DatastoreConfig(), default_candidates(QUICK)[:1], seed=0)


def test_with_categories_the_choice_is_the_best_worse_vouched_margin_on_random_and_grouped_folds():
    X, data = _data(240, noise=0.1, seed=5)
    data.categories = [f"c{int((x[1] + 1) * 4) % 8}" for x in X]          # 8 categories, by a direction of X
    assert category_fold_split(data.categories, 3, 0) is not None
    assert category_fold_split(["a", "b", "c", "a"], 3, 0) is None        # too few categories to hold out
    tried = [c for c in default_candidates(QUICK) if c.kind == "datastore" or c.name == "matrix factorization"]
    rep = select(X, data, np.arange(240), DatastoreConfig(), tried, folds=3, seed=0)
    assert rep.grouped is not None and set(rep.grouped) == set(rep.scores)

    def worse_margin(n):
        return min(vouched_margin(np.subtract(k[n], k[REFERENCE])) for k in (rep.scores, rep.grouped))
    assert worse_margin(rep.chosen.name) == max(worse_margin(c.name) for c in tried) >= 0.0
    j = rep.as_json()
    assert all("category_held_out_mean" in c for c in j["candidates"])
    assert "categories held out" in selection_table(j).splitlines()[0]


def test_an_ensemble_scores_the_mean_of_its_members_each_fitted_once_per_fold(monkeypatch):
    from router.offline import candidates as cm

    X, data = _data(240, noise=0.1, seed=6)
    cands = default_candidates(QUICK)
    ens = [c for c in cands if c.kind == "ensemble"]
    assert [len(c.members) for c in ens] == [len(m) for m in cm.ENSEMBLES]
    assert all(any(m.kind == "capability" for m in c.members) for c in ens)
    assert cands[-len(ens):] == ens                       # the most complex last: ties go to simpler ones
    fits = []
    real = cm.train
    monkeypatch.setattr(cm, "train", lambda *a, **k: fits.append(1) or real(*a, **k))
    rows = np.arange(240)
    fold = fold_split(240, 3, 0)
    part = cm._Fold(X, data, rows[fold != 0], rows[fold == 0], DatastoreConfig(), [[40, 100.0], [100, 100.0]], 0, 0)
    q = part.quality(ens[0])                              # its members, fitted on demand
    assert len(fits) == 2                                 # the MLP and the blend; the neighbourhoods need none
    np.testing.assert_allclose(q, np.mean([part.quality(m) for m in ens[0].members], 0), atol=1e-6)
    part.quality(ens[1])
    assert len(fits) == 3                                 # only MF is new: the MLP and the blend are shared
    # With a cluster table: no new fit; the table is fitted on every training row of the fold.
    tabled = [c for c in ens if c.members[-1].kind == "clusters"]
    assert [c.members[:-1] for c in tabled] == [c.members for c in ens if c not in tabled]
    q = part.quality(tabled[0])
    assert len(fits) == 3
    table = ClusterTable.fit(X[rows[fold != 0]], data.Y[rows[fold != 0]], data.backends, clusters=cm.CLUSTERS)
    held = part.held
    np.testing.assert_allclose(q, np.mean([*(part.quality(m) for m in tabled[0].members[:-1]), table.predict(X[held])],
                                          0), atol=1e-6)
    # Through select, with no member among the candidates: scored all the same.
    rep = select(X, data, rows, DatastoreConfig(), [ens[1]], folds=3, seed=0)
    assert rep.chosen is ens[1] and len(rep.scores[ens[1].name]) == 3
