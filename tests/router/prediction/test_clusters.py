"""The cluster table: regions of the embedding space with each backend's shrunk mean score."""
from __future__ import annotations

import numpy as np
import pytest

from router.prediction import clusters as cl
from router.prediction.clusters import ClusterTable


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _data(n_per: int = 30, dim: int = 16, seed: int = 0):
    """Three well-separated topics; "a" is right on topic 0 only, "b" on topics 1 and 2, "c"
    scored on topic 2 only (NaN elsewhere)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(3, dim)))
    topic = np.repeat(np.arange(3), n_per)
    X = _unit(centres[topic] + 0.05 * rng.normal(size=(len(topic), dim)))
    Y = np.stack([topic == 0, topic > 0, np.where(topic == 2, 1.0, np.nan)], 1).astype(np.float64)
    return X, Y, topic, centres


def test_regions_hold_shrunk_means_and_a_prompt_reads_its_own_region():
    X, Y, topic, centres = _data()
    t = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=3)
    assert t.centroids.shape == (3, 16) and t.quality.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(t.centroids, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(t.prior_mean[:2], [1 / 3, 2 / 3], atol=1e-6)
    assert t.prior_mean[2] == pytest.approx(1.0)          # the mean of the scores recorded, NaN left out
    region = (X @ t.centroids.T).argmax(1)
    assert len({(int(a), int(b)) for a, b in zip(topic, region)}) == 3     # one region a topic
    # Topic 0's region: 30 records of 1 for "a", shrunk with PRIOR pseudo-records at 1/3.
    r0 = region[topic == 0][0]
    want = (30 * 1.0 + cl.PRIOR / 3) / (30 + cl.PRIOR)
    assert t.quality[r0, 0] == pytest.approx(want, abs=1e-5)
    # "c" was never scored in topic 0's region: its cell is the prior, its overall mean.
    assert t.quality[r0, 2] == pytest.approx(1.0)
    q = t.predict(centres)
    assert q.shape == (3, 3) and q.dtype == np.float32
    # At a topic's centre its own region dominates the soft assignment.
    for k in range(3):
        own = t.quality[region[topic == k][0]]
        np.testing.assert_allclose(q[k], own, atol=0.02)


def test_soft_assignment_weights_the_nearest_regions_and_batched_equals_one_by_one():
    X, Y, _, _ = _data()
    t = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=3)
    rng = np.random.default_rng(1)
    Q = _unit(rng.normal(size=(25, 16)))
    batch = t.predict(Q)
    for i in range(25):
        np.testing.assert_allclose(t.predict(Q[i:i + 1])[0], batch[i], atol=1e-6)
    # Every prediction is a convex combination of region rows.
    assert (batch >= t.quality.min(0) - 1e-6).all() and (batch <= t.quality.max(0) + 1e-6).all()
    # Halfway between two regions, both count equally.
    mid = _unit((t.centroids[0] + t.centroids[1])[None])
    w = np.exp(cl.SHARPNESS * (mid @ t.centroids.T))[0]
    w[np.argsort(-w)[cl.NEAREST:]] = 0
    np.testing.assert_allclose(t.predict(mid)[0], (w / w.sum()) @ t.quality, atol=1e-5)


def test_fewer_regions_for_few_prompts_and_the_fit_is_seeded():
    X, Y, _, _ = _data(n_per=10)                 # 30 prompts: at most 30 // PROMPTS_PER_CLUSTER regions, at least 2
    t = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=32)
    assert len(t.centroids) == max(2, 30 // cl.PROMPTS_PER_CLUSTER)
    X, Y, _, _ = _data()
    a = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=4, seed=3)
    b = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=4, seed=3)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.quality, b.quality)


def test_onboarding_a_backend_adds_or_replaces_its_column_the_way_fit_computes_it():
    X, Y, _, _ = _data()
    full = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=3)
    two = ClusterTable(full.centroids, full.quality[:, :2], full.prior_mean[:2], ("a", "b"))
    grown = two.with_backend("c", X, Y[:, 2])
    assert grown.backends == ("a", "b", "c")
    np.testing.assert_allclose(grown.quality, full.quality, atol=1e-6)     # same regions, same rule
    np.testing.assert_allclose(grown.prior_mean, full.prior_mean, atol=1e-6)
    again = grown.with_backend("a", X, 1.0 - Y[:, 0])                        # re-onboarded: replaced in place
    assert again.backends == ("a", "b", "c")
    np.testing.assert_allclose(again.quality[:, 1:], full.quality[:, 1:])
    np.testing.assert_allclose(again.quality[:, 0], 1.0 - full.quality[:, 0], atol=1e-5)
    assert full.quality[0, 0] != again.quality[0, 0]                        # the original is unchanged


def test_an_ensembles_cluster_table_is_saved_in_the_artifact_and_served_from_it(tmp_path):
    from datastore.records import OutcomeRecord
    from encoders.capability import CapabilityConfig, build_model, config_dict
    from router.prediction import artifact as art
    from router.prediction.predictor import Ensemble

    X, Y, _, _ = _data()
    table = ClusterTable.fit(X, Y, ["a", "b", "c"], clusters=3)
    cfg = CapabilityConfig(dim=4, hidden=8, codes=1, knn_blend=False, knn_scales=None)
    model = build_model(X.shape[1], 3, cfg).eval()
    records = [OutcomeRecord(id=str(i), prompt=f"p{i}", scores={b: float(v) for b, v in zip("abc", y) if v == v})
               for i, y in enumerate(Y)]
    manifest = {"embedder": {"id": "synthetic", "dim": X.shape[1], "max_tokens": 8}, "backends": ["a", "b", "c"],
                "router": "ensemble",
                "ensemble": {"members": [{"name": "MLP", "capability": config_dict(cfg), "weights": "member-0.safetensors"}],
                             "neighbourhoods": [[40, 100.0]],
                             "clusters": [{"regions": 3, "weights": "clusters-0.safetensors"}]}}
    art.save(tmp_path / "r", models=[model], manifest=manifest, records=records, embeddings=X, tables=[table])
    a = art.load(tmp_path / "r")
    served = a.capability()
    assert isinstance(served, Ensemble) and len(served.tables) == 1
    got = served.tables[0]
    assert got.backends == table.backends
    for name in ("centroids", "quality", "prior_mean"):
        np.testing.assert_array_equal(getattr(got, name), getattr(table, name))
    # A table that does not fit the artifact's backends is refused with the file named.
    manifest["backends"] = ["a", "b"]
    art.save(tmp_path / "bad", models=[build_model(X.shape[1], 2, cfg).eval()], manifest=manifest,
             records=records, embeddings=X, tables=[table])
    with pytest.raises(art.ArtifactError, match="clusters-0.safetensors"):
        art.load(tmp_path / "bad")
