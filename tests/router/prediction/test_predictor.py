"""Prediction in one place: the column-filling rule, the cost fallback, the capability blend, and
batched == one by one (what Route and RouteBatch rely on)."""
from __future__ import annotations

import numpy as np
import pytest

from datastore.base import Estimate
from datastore.records import OutcomeRecord
from encoders.capability import CapabilityConfig, build_model
from router.core.config import DatastoreConfig
from router.prediction.clusters import ClusterTable
from router.prediction.predictor import (
    OWN,
    Capability,
    Ensemble,
    Predictor,
    columns,
    knn_estimates,
    knn_quality,
    knn_store,
)


def _unit(rows) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _store(dim: int = 8, n: int = 40, seed: int = 0):
    """Two clusters: "a" is good on the first, "b" on the second; "b" records costs, "a" none."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(2, dim)))
    X = _unit(centres[np.arange(n) % 2] + 0.1 * rng.normal(size=(n, dim)))
    recs = [OutcomeRecord(id=str(i), prompt="", scores={"a": float(i % 2 == 0), "b": float(i % 2 == 1)},
                          cost={"b": 2.0 + i % 2}) for i in range(n)]
    return knn_store(X, recs, DatastoreConfig(k=8, prior_strength=2.0, temperature=0.05)), X, centres


def test_columns_follow_the_callers_order_and_fill_an_unseen_backend_with_the_row_mean():
    est = Estimate(("a", "b"), quality=np.array([[0.2, 0.6], [1.0, 0.0]], np.float32),
                   support=np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                   cost=np.array([[np.nan, 5.0], [1.0, 2.0]], np.float32))
    q, c, s = columns(est, ["b", "new", "a"])
    np.testing.assert_allclose(q, [[0.6, 0.4, 0.2], [0.0, 0.5, 1.0]])
    np.testing.assert_allclose(s, [[2.0, 0.0, 1.0], [4.0, 0.0, 3.0]])
    assert c[0, 0] == 5.0 and np.isnan(c[0, 1]) and np.isnan(c[0, 2]) and c[1, 2] == 1.0
    empty = Estimate((), np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32))
    np.testing.assert_allclose(columns(empty, ["x"])[0], [[0.5], [0.5]])


def test_knn_estimates_price_what_no_neighbour_recorded_and_stack_the_neighbourhoods():
    store, X, centres = _store()
    q, c = knn_estimates(store, centres, ["a", "b", "new"], np.array([7.0, 8.0, 9.0]))
    assert q.shape == (2, 3) and q[0, 0] > 0.8 > q[0, 1] and q[1, 1] > 0.8 > q[1, 0]
    assert (c[:, 0] == 7.0).all() and (c[:, 2] == 9.0).all()                    # "a" and "new": no costs
    assert 2.0 <= c[0, 1] <= 3.0 and c[0, 1] < c[1, 1]                          # "b": its neighbours' costs
    qs = knn_quality(store, centres, ["a", "b"], [[0, 0], [30, 1.0]])
    assert qs.shape == (2, 2, 2)
    np.testing.assert_allclose(qs[..., 0], q[:, :2], atol=1e-6)
    broad = store.estimate(centres, k=30, temperature=1.0)
    np.testing.assert_allclose(qs[..., 1], broad.quality[:, [broad.column("a"), broad.column("b")]], atol=1e-6)


def test_the_predictor_blends_only_the_backends_the_capability_model_knows():
    store, X, centres = _store()
    cfg = CapabilityConfig(dim=4, hidden=8, codes=2, knn_scales=[[0, 0], [30, 1.0]])
    model = build_model(X.shape[1], 1, cfg).eval()
    plain = Predictor(store).predict(X, ["a", "b"], np.zeros(2))
    blended = Predictor(store, Capability(model, ["a"])).predict(X, ["a", "b"], np.zeros(2))
    np.testing.assert_array_equal(blended.quality[:, 1], plain.quality[:, 1])      # "b": the datastore's
    assert np.abs(blended.quality[:, 0] - plain.quality[:, 0]).max() > 1e-3        # "a": the model's
    np.testing.assert_array_equal(blended.cost, plain.cost)
    np.testing.assert_array_equal(blended.support, plain.support)
    assert ((blended.quality >= 0) & (blended.quality <= 1)).all() and np.isfinite(blended.cost).all()


def _ensemble(dim: int) -> Ensemble:
    """A blend taking two neighbourhoods, a plain model (no datastore input), one neighbourhood of
    the ensemble's own and a cluster table of _store's prompts."""
    blend = CapabilityConfig(dim=4, hidden=8, codes=2, knn_scales=[[0, 0], [30, 1.0]])
    plain = CapabilityConfig(dim=4, hidden=8, codes=1, knn_blend=False, knn_scales=None, seed=1)
    _, X, _ = _store(dim)
    Y = np.stack([np.arange(len(X)) % 2 == 0, np.arange(len(X)) % 2 == 1], 1).astype(np.float32)
    return Ensemble([Capability(build_model(dim, 2, blend).eval(), ["a", "b"]),
                     Capability(build_model(dim, 2, plain).eval(), ["a", "b"])], [(20, 100.0)],
                    [ClusterTable.fit(X, Y, ["a", "b"], clusters=2)])


def test_an_ensemble_predicts_the_mean_of_its_members_neighbourhoods_and_tables():
    store, X, _ = _store()
    ens = _ensemble(X.shape[1])
    assert ens.scales == [OWN, (30.0, 1.0), (20.0, 100.0)]        # each neighbourhood searched once
    by = store.estimate_many(X, ens.scales)
    by = dict(zip(ens.scales, by))
    parts = [m.predict(X, by) for m in ens.members] + [columns(by[(20.0, 100.0)], ["a", "b"])[0]] \
        + [ens.tables[0].predict(X)]
    got = Predictor(store, ens, repeats=False).predict(X, ["a", "b"], np.zeros(2)).quality   # X: stored prompts
    np.testing.assert_allclose(got, np.mean(parts, 0), atol=1e-6)
    assert all(np.abs(got - p).max() > 1e-3 for p in parts)        # every member moves the mean
    with pytest.raises(ValueError, match="same backends"):
        Ensemble([ens.members[0], Capability(ens.members[1].model, ["a", "c"])])
    with pytest.raises(ValueError, match="same backends"):
        Ensemble(ens.members, (), [ens.tables[0].with_backend("c", X, np.ones(len(X)))])
    with pytest.raises(ValueError, match="at least one trained member"):
        Ensemble([], [(40, 100.0)])


@pytest.mark.parametrize("with_capability", [False, True, "ensemble"])
def test_batched_equals_one_by_one(with_capability):
    store, X, _ = _store(n=60)
    cap: Capability | Ensemble | None = None
    if with_capability == "ensemble":
        cap = _ensemble(X.shape[1])
    elif with_capability:
        cap = Capability(build_model(X.shape[1], 2, CapabilityConfig(dim=4, hidden=8, codes=2)).eval(), ["a", "b"])
    p = Predictor(store, cap)
    fallback = np.arange(60 * 3, dtype=np.float64).reshape(60, 3)
    batch = p.predict(X, ["b", "a", "c"], fallback)
    for i in range(0, 60, 7):
        one = p.predict(X[i:i + 1], ["b", "a", "c"], fallback[i])
        np.testing.assert_allclose(one.quality[0], batch.quality[i], atol=1e-6)
        np.testing.assert_allclose(one.cost[0], batch.cost[i], atol=1e-5)
        np.testing.assert_allclose(one.support[0], batch.support[i], atol=1e-5)


def test_the_store_is_searched_once_whatever_the_model_asks_for():
    """The own neighbourhood once, the model's others and the repeats' records from the same search."""
    store, X, _ = _store()
    asked = []
    real = store.estimate_many

    def spy(emb, scales, *, recorded=False):
        asked.append((list(scales), recorded))
        return real(emb, scales, recorded=recorded)

    store.estimate_many = spy
    cfg = CapabilityConfig(dim=4, hidden=8, codes=2, knn_scales=[[0, 0], [30, 1.0]])
    for repeats in (True, False):
        asked.clear()
        Predictor(store, Capability(build_model(X.shape[1], 2, cfg).eval(), ["a", "b"]), repeats=repeats).predict(
            X, ["a", "b"], np.zeros(2))
        assert asked == [([OWN, (30.0, 1.0)], repeats)]


def test_a_repeated_prompt_is_estimated_from_its_own_records_pooled_with_the_prediction():
    store, X, centres = _store()
    backends = ["a", "b", "new"]
    fresh = _unit(centres + 0.05)                          # near the clusters, stored nowhere
    probe = np.vstack([X[:2], fresh])
    off = Predictor(store, repeats=False).predict(probe, backends, np.zeros(3)).quality
    on = Predictor(store).predict(probe, backends, np.zeros(3)).quality
    # X[0] recorded a=1, b=0; X[1] a=0, b=1: one copy each, pooled with the prediction as one more.
    np.testing.assert_allclose(on[0, :2], (np.array([1.0, 0.0]) + off[0, :2]) / 2, atol=1e-6)
    np.testing.assert_allclose(on[1, :2], (np.array([0.0, 1.0]) + off[1, :2]) / 2, atol=1e-6)
    np.testing.assert_array_equal(on[:, 2], off[:, 2])     # no records of "new": its estimate stands
    np.testing.assert_array_equal(on[2:], off[2:])         # prompts stored nowhere: unchanged
    # A second recorded copy of X[0] with a=0 makes its own mean 0.5 over two copies.
    store.insert(X[:1], [OutcomeRecord(id="again", prompt="", scores={"a": 0.0, "b": 0.0})])
    off2 = Predictor(store, repeats=False).predict(X[:1], backends, np.zeros(3)).quality
    on2 = Predictor(store).predict(X[:1], backends, np.zeros(3)).quality
    np.testing.assert_allclose(on2[0, :2], (2 * np.array([0.5, 0.0]) + off2[0, :2]) / 3, atol=1e-6)
    # Onboarding's successor keeps the setting.
    cap = Capability(build_model(X.shape[1], 2, CapabilityConfig(dim=4, hidden=8, codes=2)).eval(), ["a", "b"])
    assert Predictor(store, repeats=False).with_capability(cap).repeats is False
