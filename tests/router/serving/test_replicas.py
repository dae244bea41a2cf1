"""Replicas on one system of record stay in step: what one is told (feedback, retractions,
registrations), the others take in when they follow. Two services with the real datastore on one
database, SQLite and PostgreSQL (the two-process test over sockets is in
tests/router/test_replicas_live.py)."""
from __future__ import annotations

import numpy as np
import pytest

from datastore.storage import open_storage
from datastore.store import FaissKnnDatastore
from router.core.config import AppConfig
from router.serving.keys import KeyFile
from router.serving.registrations import AptitudeResult, OnboardSpec
from router.serving.service import Query, RouterService
from tests.fakes import OUTCOMES, ScriptedBackend, write_outcomes


def _replica(tmp_path, name, db_url, encoder):
    src = write_outcomes(tmp_path / "o.jsonl", OUTCOMES)
    storage = open_storage(db_url)
    ds = FaissKnnDatastore.open(tmp_path / name, encoder, [src], k=8, progress=False,
                                feedback_log=storage.stream("feedback"))
    cfg = AppConfig.model_validate({"routing": {"cost_unit": "USD", "decision_cache_size": 1000}})
    svc = RouterService(cfg, encoder, ds, {b.name: b for b in (ScriptedBackend("mathy"), ScriptedBackend("wordy"))})
    svc.attach_registry(storage.stream("registry"))
    return svc, storage


def test_feedback_retractions_and_registrations_reach_the_other_replica(tmp_path, db_url, any_encoder):
    a, sa = _replica(tmp_path, "a", db_url, any_encoder)
    b, sb = _replica(tmp_path, "b", db_url, any_encoder)
    q = "What is 40 + 2?"
    emb = any_encoder.encode([q])

    def quality(svc):
        p = svc.predict(emb, [len(q)])
        return float(p.quality[0, p.backends.index("mathy")])
    before = quality(b)
    keys = KeyFile(tmp_path / "keys.json")
    mallory = keys.authenticate(keys.create("mallory", scopes=("feedback",))[1])
    for _ in range(4):
        a.feedback("", 0.0, prompt=q, backend="mathy", caller=mallory)
    assert quality(b) == before                       # B has not followed yet
    assert b.follow_replicas() == 4
    assert quality(b) == pytest.approx(quality(a)) and quality(b) < before - 0.1
    assert b.follow_replicas() == 0 and a.follow_replicas() == 0   # nobody gets its own back
    # A retraction on A withdraws them on B.
    assert a.retract_feedback("mallory") == 4
    assert b.follow_replicas() == 1
    # Retracted rows keep their place in the index but take no neighbour's slot: as before.
    assert quality(b) == pytest.approx(quality(a), abs=1e-6) == pytest.approx(before, abs=1e-6)
    # A backend onboarded on A is routable on B.
    results = [AptitudeResult(score=1.0, prompt=f"Write a haiku about {t}.") for t in "abcdefghij"]
    a.onboard(OnboardSpec("poet-7b", results, {"kind": "per_request", "per_request": 0.5}))
    assert "poet-7b" not in b.names
    b.follow_replicas()
    assert "poet-7b" in b.names
    d = b.route(Query(prompt="Write a haiku about the sea."))
    assert "poet-7b" in {c.backend for c in d.selection.ranked}
    np.testing.assert_allclose(b.predict(emb, [len(q)]).quality, a.predict(emb, [len(q)]).quality, atol=1e-5)
    for st in (sa, sb):
        st.close()
