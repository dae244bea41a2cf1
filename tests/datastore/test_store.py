import gzip
import itertools
import json
import math

import numpy as np
import pytest

from datastore.records import read_outcomes
from datastore.store import FaissKnnDatastore
from router.core.errors import InvalidArgument


def _unit(rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_knn_estimate_matches_hand_computation():
    ds = FaissKnnDatastore(2, "toy", k=2, prior_strength=1.0, temperature=0.1)
    emb = _unit([[1, 0], [0.8, 0.6], [0, 1]])
    ds._insert(emb, ["a", "b", "c"], [{"m": 1.0}, {"m": 0.0, "n": 1.0}, {"m": 0.0}], [{}, {}, {}])
    q = _unit([[1, 0.1]])
    est = ds.estimate(q)
    sims = (emb @ q[0])[:2]                    # the two nearest are a and b
    w = np.exp((sims - sims.max()) / 0.1)
    prior_m = 1.0 / 3.0
    expect_m = (w[0] * 1.0 + w[1] * 0.0 + 1.0 * prior_m) / (w[0] + w[1] + 1.0)
    expect_n = (w[1] * 1.0 + 1.0 * 1.0) / (w[1] + 1.0)   # n's prior is its own mean (1.0)
    m, n = est.column("m"), est.column("n")
    assert math.isclose(est.quality[0, m], expect_m, rel_tol=1e-5)
    assert math.isclose(est.quality[0, n], expect_n, rel_tol=1e-5)
    assert math.isclose(est.support[0, n], w[1], rel_tol=1e-5)


def test_recorded_returns_the_scores_stored_for_the_very_prompt():
    ds = FaissKnnDatastore(2, "toy", k=2)
    emb = _unit([[1, 0], [0.8, 0.6], [1, 0]])
    # "a" and "c" are the same prompt, stored twice (say by two backends' feedback).
    ds._insert(emb, ["a", "b", "c"], [{"m": 1.0}, {"m": 0.0, "n": 1.0}, {"m": 0.0, "n": 0.5}],
               [{"m": 2.0}, {}, {}])
    rec = ds.recorded(_unit([[1, 0], [0.8, 0.6], [0, 1]]))
    m, n = rec.column("m"), rec.column("n")
    assert rec.quality[0, m] == 0.5 and rec.quality[0, n] == 0.5       # the mean over both copies
    assert rec.support[0, m] == 2 and rec.support[0, n] == 1 and rec.cost[0, m] == 2.0
    assert rec.quality[1, m] == 0.0 and rec.quality[1, n] == 1.0
    assert np.isnan(rec.quality[2]).all() and (rec.support[2] == 0).all()   # a new prompt: nothing recorded
    assert np.isnan(FaissKnnDatastore(2, "toy").recorded(_unit([[1, 0]])).quality).all()


def test_recorded_comes_from_the_estimates_search_and_counts_copies_beyond_k():
    """estimate_many(..., recorded=True) is the estimates of estimate_many and recorded's from one
    search; copies of the prompt count even where the neighbourhoods are smaller than their number."""
    ds = FaissKnnDatastore(2, "toy", k=1)
    emb = _unit([[1, 0], [1, 0], [1, 0], [0.6, 0.8]])
    ds._insert(emb, ["a", "b", "c", "d"], [{"m": 1.0}, {"m": 0.0}, {"m": 1.0}, {"m": 0.0}], [{}, {}, {}, {}])
    q = _unit([[1, 0], [0.6, 0.8], [0, 1]])
    scales = [(0, 0.0), (2, 100.0)]
    *ests, rec = ds.estimate_many(q, scales, recorded=True)
    for a, b in zip(ests, ds.estimate_many(q, scales), strict=True):
        np.testing.assert_array_equal(a.quality, b.quality)
        np.testing.assert_array_equal(a.support, b.support)
    m = rec.column("m")
    assert rec.support[0, m] == 3 and rec.quality[0, m] == pytest.approx(2 / 3)
    assert rec.support[1, m] == 1 and rec.quality[1, m] == 0.0 and np.isnan(rec.quality[2, m])
    np.testing.assert_array_equal(rec.quality, ds.recorded(q).quality)


def test_backend_without_neighbours_gets_its_prior():
    ds = FaissKnnDatastore(2, "toy", k=1, prior_strength=2.0)
    ds._insert(_unit([[1, 0], [0, 1]]), ["a", "b"], [{"m": 1.0}, {"n": 0.25}], [{}, {}])
    est = ds.estimate(_unit([[1, 0]]))
    assert est.support[0, est.column("n")] == 0
    assert math.isclose(est.quality[0, est.column("n")], 0.25, rel_tol=1e-6)


def test_cost_is_estimated_from_neighbours_and_nan_without():
    ds = FaissKnnDatastore(2, "toy", k=2)
    ds._insert(_unit([[1, 0], [1, 0.01]]), ["a", "b"], [{"m": 1.0, "n": 1.0}] * 2, [{"m": 2.0}, {"m": 4.0}])
    est = ds.estimate(_unit([[1, 0.005]]))
    assert 2.0 < est.cost[0, est.column("m")] < 4.0
    assert np.isnan(est.cost[0, est.column("n")])


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


ROWS = [{"id": f"r{i}", "prompt": p, "scores": {"good": 1.0, "bad": float(i % 2)}, "category": "c"}
        for i, p in enumerate(["What is 2 + 2?", "Capital of Peru?", "Write a poem about snow.",
                               "Translate 'cat' to French.", "Who painted the Mona Lisa?", "Sort [3, 1, 2]."])]


def test_top1_self_retrieval_persist_and_reload(tmp_path, any_encoder):
    src = tmp_path / "o.jsonl"
    _write(src, ROWS)
    ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=3, progress=False)
    assert len(ds) == len(ROWS)
    emb = any_encoder.encode([r["prompt"] for r in ROWS])
    _, idx = ds.index.search(emb, 1)
    assert idx[:, 0].tolist() == list(range(len(ROWS)))
    ds.close()
    again = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=3, progress=False)
    np.testing.assert_allclose(again.estimate(emb).quality, ds.estimate(emb).quality, atol=1e-6)


def test_feedback_is_durable_and_survives_a_snapshot_rebuild(tmp_path, any_encoder):
    src = tmp_path / "o.jsonl"
    _write(src, ROWS)
    ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=4, progress=False)
    q = "What is 2 + 2?"
    emb = any_encoder.encode([q])
    before = ds.estimate(emb).quality[0, ds.estimate(emb).column("bad")]
    ids = ds.add(np.repeat(emb, 3, axis=0), [{"prompt": q, "scores": {"bad": 1.0}}] * 3)
    after = ds.estimate(emb).quality[0, ds.estimate(emb).column("bad")]
    assert len(ids) == 3 and after > before
    ds.close()
    _write(src, ROWS + [{"id": "new", "prompt": "Name a planet.", "scores": {"good": 1.0}}])  # forces a rebuild
    again = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=4, progress=False)
    assert len(again) == len(ROWS) + 1 + 3
    est = again.estimate(emb)
    assert math.isclose(est.quality[0, est.column("bad")], after, rel_tol=1e-5)


def test_new_backend_in_feedback_gets_a_column(tmp_path, any_encoder):
    src = tmp_path / "o.jsonl"
    _write(src, ROWS)
    ds = FaissKnnDatastore.open(tmp_path / "s", any_encoder, [src], progress=False)
    ds.add(any_encoder.encode(["hi"]), [{"prompt": "hi", "scores": {"fresh": 0.5}}])
    assert "fresh" in ds.backends and ds.stats()["fresh"].outcomes == 1


@pytest.mark.parametrize("line,part", [
    ('{"prompt": "", "scores": {"a": 1}}', "'prompt' must be a non-empty string"),
    ('{"prompt": "x", "scores": {}}', "'scores' must name at least one backend"),
    ('{"prompt": "x", "scores": {"a": 1.5}}', "outside [0, 1]"),
    ('{"prompt": "x", "scores": {"a": "yes"}}', "finite number"),
    ('{"prompt": "x", "scores": {"a": 1}, "cost": {"a": -1}}', "negative"),
    ('not json', "not valid JSON"),
])
def test_outcome_file_errors_name_the_line(tmp_path, line, part):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok", "scores": {"a": 1}}\n' + line + "\n")
    with pytest.raises(InvalidArgument) as ei:
        list(read_outcomes(p))
    assert "bad.jsonl:2" in str(ei.value) and part in str(ei.value)


@pytest.mark.slow
def test_reads_the_shared_schema(shared_data, tmp_path, encoder):
    """The real LLMRouter file: gzip, meta blocks, splits. A slice keeps the test fast."""
    rows = list(itertools.islice(read_outcomes(shared_data / "llmrouter.jsonl.gz"), 200))
    assert len(rows) == 200 and all(r.scores and r.split in ("train", "test") for r in rows)
    p = tmp_path / "slice.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for r in rows:
            f.write(json.dumps(r.to_json()) + "\n")
    ds = FaissKnnDatastore.open(tmp_path / "s", encoder, [p], k=8, progress=False)
    emb = encoder.encode([r.prompt for r in rows[:50]])
    sims, idx = ds.index.search(emb, 1)
    # Top-1 self-retrieval (duplicated prompts may retrieve their twin, at similarity 1).
    assert np.all(sims[:, 0] > 0.999)
    assert len(ds.backends) == 9


def test_a_keys_feedback_is_retracted_live_and_after_a_restart(tmp_path, any_encoder):
    """The issue-14 attack: one key floods made-up scores; retracting its feedback restores the
    estimate at once and after a restart, and leaves the other keys' feedback alone."""
    src = tmp_path / "o.jsonl"
    _write(src, ROWS)
    ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=4, progress=False)
    q = "What is 2 + 2?"
    emb = any_encoder.encode([q])

    def bad() -> float:
        est = ds.estimate(emb)
        return float(est.quality[0, est.column("bad")])
    clean = bad()
    ds.add(emb, [{"prompt": q, "scores": {"good": 1.0}, "key": "honest", "ts": 1.0}])
    honest = bad()
    ids = ds.add(np.repeat(emb, 5, axis=0), [{"prompt": q, "scores": {"bad": 1.0}, "key": "mallory",
                                               "key_id": "00000000000a"}] * 5)
    assert bad() > honest + 0.1 and len(ids) == 5
    assert ds.retract_feedback("nobody") == 0
    assert ds.retract_feedback("mallory", since=2e9) == 0          # sent before that time: kept
    assert ds.retract_feedback("00000000000a") == 5                 # by the key's id (names may be reused)
    assert math.isclose(bad(), honest, rel_tol=1e-6)
    assert ds.retract_feedback("mallory") == 0 and ds.retract_feedback("00000000000a") == 0
    ds.close()
    lines = (tmp_path / "state" / "feedback.log").read_text().splitlines()
    assert len(lines) == 1 + 5 + 1 and '"op":"retract"' in lines[-1]     # appended, nothing rewritten
    ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=4, progress=False)
    assert math.isclose(bad(), honest, rel_tol=1e-6)
    assert ds.retract_feedback("honest") == 1
    assert math.isclose(bad(), clean, rel_tol=1e-6)


def test_weighted_feedback_reads_back_at_its_value_and_retracts_without_residue(tmp_path, any_encoder):
    src = tmp_path / "o.jsonl"
    _write(src, ROWS)
    ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=4, progress=False)
    q = "A prompt nobody stored before"
    emb = any_encoder.encode([q])
    for w in (0.7, 0.9, 0.3):
        ds.add(emb, [{"prompt": q, "scores": {"newcomer": 1.0}, "cost": {"newcomer": 2.0}, "key": "k",
                      "weight": w}])
    rec = ds.recorded(emb)
    col = rec.column("newcomer")
    assert rec.quality[0, col] == pytest.approx(1.0) and rec.cost[0, col] == pytest.approx(2.0)   # not w x value
    assert rec.support[0, col] == pytest.approx(1.9, rel=1e-5)
    assert ds.stats()["newcomer"].mean_score == pytest.approx(1.0)
    assert ds.retract_feedback("k") == 3
    # Its only scores gone: the backend's prior is the global mean again, not a rounding residue.
    stats = ds.stats()["newcomer"]
    assert stats.outcomes == 0 and math.isnan(stats.mean_score)
    prior = ds.priors()[ds.backends.index("newcomer")]
    assert 0.0 <= prior <= 1.0


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_the_approximate_index_agrees_with_the_exact_one(kind):
    from datastore.records import OutcomeRecord
    from datastore.store import AnnSettings

    rng = np.random.default_rng(0)
    centers = _unit(rng.standard_normal((40, 32)))
    X = _unit(centers[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, 32)))
    recs = [OutcomeRecord(id=f"r{i}", prompt="", scores={"a": float(rng.random()), "b": float(rng.random())})
            for i in range(3000)]
    exact = FaissKnnDatastore.from_records(X[:2000], recs[:2000], k=16)
    ann = FaissKnnDatastore.from_records(X[:1000], recs[:1000], k=16,
                                         ann=AnnSettings(kind, min_size=1500, ivf_nprobe=40))
    assert ann.ann is None
    ann._insert_records(X[1000:2000], recs[1000:2000])             # crosses min_size: built now
    assert ann.ann is not None and ann.ann.ntotal == 2000
    q = X[2000:2100]
    e, a = exact.estimate(q), ann.estimate(q)
    assert np.abs(e.quality - a.quality).mean() < 0.01
    # Later rows join the approximate index too, and dead rows are skipped by it.
    ann._insert_records(X[2000:2100], recs[2000:2100])
    exact._insert_records(X[2000:2100], recs[2000:2100])
    ids = [f"r{i}" for i in range(2000, 2100)]
    for store in (exact, ann):
        store._withdraw(ids)
    e, a = exact.estimate(q), ann.estimate(q)
    assert np.abs(e.quality - a.quality).mean() < 0.01
    _, idx = ann._search(q, 16)
    assert not np.isin(idx, np.arange(2000, 2100)).any()


def test_a_serving_store_builds_its_approximate_index_aside(tmp_path, any_encoder):
    import time as _time

    from datastore.store import AnnSettings

    src = tmp_path / "o.jsonl"
    _write(src, ROWS)
    ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=4, progress=False,
                                ann=AnnSettings("hnsw", min_size=len(ROWS) + 3))
    assert ds.ann is None
    q = "What is 2 + 2?"
    emb = any_encoder.encode([q])
    exact = ds.estimate(emb).quality
    ds.add(np.repeat(emb, 3, axis=0), [{"prompt": q, "scores": {"good": 1.0}}] * 3)   # crosses min_size
    deadline = _time.time() + 30
    while ds.ann is None and _time.time() < deadline:
        ds.estimate(emb)                                  # searches go on meanwhile
        _time.sleep(0.01)
    assert ds.ann is not None and ds.ann.ntotal == len(ds)
    assert ds.estimate(emb).quality.shape == exact.shape


def test_the_approximate_index_is_saved_with_the_snapshot_and_reused_while_its_settings_hold(tmp_path, caplog):
    """A start reads the saved HNSW index instead of building it again (every replica's start paid
    the build), replays feedback into it, and builds (and saves) a new one when the settings change
    or the file is unreadable."""
    import logging

    from datastore.records import OutcomeRecord
    from datastore.store import AnnSettings
    from tests.fakes import WordEncoder

    enc = WordEncoder()
    rng = np.random.default_rng(0)
    X = _unit(rng.standard_normal((600, enc.dim)))
    recs = [OutcomeRecord(f"r{i}", f"p{i}", {"a": float(rng.random() < 0.5), "b": float(i % 2)}) for i in range(600)]
    snap = tmp_path / "state" / "snapshot"

    def start(ann):
        caplog.clear()
        with caplog.at_level(logging.INFO, "datastore.store"):
            return FaissKnnDatastore.open(tmp_path / "state", enc, [], base=(X, recs, "h"), progress=False, ann=ann)

    hnsw = AnnSettings("hnsw", min_size=500)
    first = start(hnsw)
    assert first.ann is not None and (snap / "ann.faiss").exists() and "reused" not in caplog.text
    fb = "Feedback on a prompt nobody stored"
    first.add(enc.encode([fb]), [{"prompt": fb, "scores": {"a": 1.0}}])
    q = X[:20]
    before = first.estimate(q)
    first.close()

    second = start(hnsw)
    assert "reused the saved hnsw index of 600 rows" in caplog.text
    assert second.ann.ntotal == len(second) == 601                 # the feedback replayed into it
    np.testing.assert_array_equal(second.estimate(q).quality, before.quality)
    np.testing.assert_array_equal(second._search(q, 8)[1], first._search(q, 8)[1])
    second.close()

    other = AnnSettings("hnsw", min_size=500, hnsw_m=16)
    third = start(other)                                           # other settings: built, and saved
    assert "reused" not in caplog.text and third.ann.hnsw.nb_neighbors(1) == 16
    third.close()
    fourth = start(other)
    assert "reused the saved hnsw index" in caplog.text and fourth.ann.hnsw.nb_neighbors(1) == 16
    fourth.close()

    (snap / "ann.faiss").write_bytes(b"not an index")
    fifth = start(other)
    assert "unreadable; rebuilding it" in caplog.text and fifth.ann.ntotal == len(fifth)
    fifth.close()
    assert not start(AnnSettings("off")).ann                       # exact search: the file is ignored
