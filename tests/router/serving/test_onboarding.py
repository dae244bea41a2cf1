"""Onboard: registering a backend from aptitude results, with the real datastore and either encoder."""
from __future__ import annotations

import numpy as np
import pytest

from datastore.log import AppendLog
from datastore.store import FaissKnnDatastore
from router.core.config import AppConfig
from router.core.errors import FailedPrecondition, InvalidArgument
from router.policy.selection import KnobsInput
from router.serving.registrations import AptitudeResult, OnboardSpec, log_path
from router.serving.service import Query, RouterService
from tests.fakes import OUTCOMES, ScriptedBackend, write_outcomes

MATH = [f"What is {i} * {i + 2}?" for i in range(8)]
POEM = [f"Write a haiku about {t}." for t in ("snow", "the river", "a fox", "dawn", "tea", "the wind", "ash", "bees")]


def results(poem_score: float, math_score: float) -> list[AptitudeResult]:
    return ([AptitudeResult(score=poem_score, prompt=p) for p in POEM]
            + [AptitudeResult(score=math_score, prompt=p) for p in MATH])


@pytest.fixture
def open_service(tmp_path, any_encoder):
    made = []

    def make(capability=None):
        src = write_outcomes(tmp_path / "o.jsonl", OUTCOMES)
        ds = FaissKnnDatastore.open(tmp_path / "state", any_encoder, [src], k=8, progress=False)
        cfg = AppConfig.model_validate({"routing": {"cost_unit": "USD", "decision_cache_size": 1000}})
        svc = RouterService(cfg, any_encoder, ds, {b.name: b for b in (ScriptedBackend("mathy"), ScriptedBackend("wordy"))},
                            capability=capability)
        svc.attach_registry(AppendLog.open(log_path(tmp_path / "state")))
        made.append(svc)
        return svc
    yield make
    for s in made:
        s.datastore.close()
        s._registry_log.close()


def test_onboarded_backend_is_routable_at_once_and_persisted(open_service):
    svc = open_service()
    res = svc.onboard(OnboardSpec("poet-7b", results(1.0, 0.0), {"kind": "per_request", "per_request": 0.5},
                                  "a poetry model"))
    assert res.created and res.results == 16 and res.mean_score == 0.5 and not res.capability_fitted
    view = {v.name: v for v in svc.list_backends()}["poet-7b"]
    assert view.kind == "route-only" and view.outcomes == 16 and view.cost_model.predict(10) == 0.5
    only = KnobsInput(allowed=("poet-7b", "mathy"))
    assert svc.route(Query(prompt="Write a haiku about the sea.", knobs=only)).backend == "poet-7b"
    assert svc.route(Query(prompt="What is 9 * 11?", knobs=only)).backend == "mathy"
    svc.datastore.close()
    svc._registry_log.close()

    again = open_service()          # a restart: the registration is replayed from backends.log
    assert "poet-7b" in again.names
    assert {v.name: v for v in again.list_backends()}["poet-7b"].outcomes == 16
    assert again.route(Query(prompt="Write a haiku about the sea.", knobs=only)).backend == "poet-7b"


def test_update_replaces_the_earlier_results(open_service):
    svc = open_service()
    svc.onboard(OnboardSpec("poet-7b", results(1.0, 0.0), {"kind": "per_request", "per_request": 0.5}))
    upd = svc.onboard(OnboardSpec("poet-7b", results(0.0, 1.0), {"kind": "per_request", "per_request": 0.2}))
    assert not upd.created
    view = {v.name: v for v in svc.list_backends()}["poet-7b"]
    assert view.outcomes == 16 and view.cost_model.predict(10) == 0.2        # not 32: the old ones are retracted
    only = KnobsInput(allowed=("poet-7b", "wordy"))
    assert svc.route(Query(prompt="Write a haiku about the sea.", knobs=only)).backend == "wordy"
    svc.datastore.close()
    svc._registry_log.close()
    again = open_service()
    assert {v.name: v for v in again.list_backends()}["poet-7b"].outcomes == 16
    assert again.route(Query(prompt="Write a haiku about the sea.", knobs=only)).backend == "wordy"


@pytest.mark.parametrize("served", ["model", "ensemble"])
def test_aptitude_items_by_id_and_capability_vector_fitted(open_service, any_encoder, served):
    import torch

    from encoders.capability import CapabilityConfig, build_model
    from router.prediction.clusters import ClusterTable
    from router.prediction.predictor import Capability, Ensemble
    from router.serving.registrations import load_suite, suite_path

    cfg = CapabilityConfig(dim=8, hidden=16, codes=2)
    model = build_model(384, 2, cfg).eval()
    with torch.no_grad():
        model.w.fill_(1.0)
    cap = Capability(model, ["mathy", "wordy"], config=cfg)
    if served == "ensemble":    # a learned member without datastore input, a neighbourhood and a cluster table
        plain = CapabilityConfig(dim=8, hidden=16, codes=1, knn_blend=False, knn_scales=None, seed=1)
        stored = any_encoder.encode([r["prompt"] for r in OUTCOMES])
        table = ClusterTable.fit(stored, np.array([[r["scores"][b] for b in ("mathy", "wordy")] for r in OUTCOMES]),
                                 ["mathy", "wordy"], clusters=2)
        cap = Ensemble([cap, Capability(build_model(384, 2, plain).eval(), ["mathy", "wordy"], config=plain)],
                       [(8, 100.0)], [table])
    svc = open_service(cap)
    items = load_suite(suite_path(None))
    arith = [it for it in items if it["kind"] == "arithmetic"][:15]
    facts = [it for it in items if it["kind"] == "facts"][:15]
    spec = OnboardSpec("calc-1", [AptitudeResult(score=1.0, item_id=it["id"]) for it in arith]
                       + [AptitudeResult(score=0.0, item_id=it["id"]) for it in facts],
                       {"kind": "compute", "active_parameters": 1_000_000_000})
    res = svc.onboard(spec)
    assert res.capability_fitted and svc.capability.backends == ("mathy", "wordy", "calc-1")
    members = svc.capability.members if served == "ensemble" else (svc.capability,)
    assert all(m.backends == ("mathy", "wordy", "calc-1") for m in members)      # each learned member fitted
    if served == "ensemble":   # the table's new column: each region's mean of the results in it
        grown = svc.capability.tables[0]
        assert grown.backends == ("mathy", "wordy", "calc-1")
        np.testing.assert_array_equal(grown.quality[:, :2], table.quality)
    X = svc.encoder.encode(["What is 12 + 30? Answer with just the number.",
                            "What is the capital of Italy? Answer in one word."])
    q_math, q_fact = svc.predict(X, [40, 40]).quality
    assert q_math[2] > q_fact[2] + 0.1
    # Re-onboarding replaces its column; the prompt side is untouched.
    svc.onboard(spec)
    assert svc.capability.backends == ("mathy", "wordy", "calc-1")
    served_model = svc.capability.members[0].model if served == "ensemble" else svc.capability.model
    np.testing.assert_array_equal(served_model.f[0].weight.detach().numpy(), model.f[0].weight.detach().numpy())


def test_onboarding_reads_the_trained_backends_residuals_on_stored_prompts(open_service, monkeypatch):
    """Aptitude prompts the datastore already holds carry the trained backends' own outcomes:
    their residuals reach the fit (the control variate); new prompts give none."""
    import torch

    from encoders.capability import CapabilityConfig, build_model
    from router.prediction import onboarding
    from router.prediction.predictor import Capability, search

    cfg = CapabilityConfig(dim=8, hidden=16, codes=2)
    model = build_model(384, 2, cfg).eval()
    with torch.no_grad():
        model.w.fill_(1.0)
    seen = []
    real = onboarding.fit_backend

    def spy(model, X, y, ds_cfg, *, peer_residuals=None):
        seen.append(peer_residuals)
        return real(model, X, y, ds_cfg, peer_residuals=peer_residuals)

    monkeypatch.setattr(onboarding, "fit_backend", spy)
    svc = open_service(Capability(model, ["mathy", "wordy"], config=cfg))
    stored = [(r["prompt"], r["scores"]) for r in OUTCOMES]
    X = svc.encoder.encode([p for p, _ in stored])
    predicted = svc.capability.predict(X, search(svc.datastore, X, svc.capability.scales))
    svc.onboard(OnboardSpec("known-prompts", [AptitudeResult(score=1.0, prompt=p) for p, _ in stored],
                            {"kind": "per_request", "per_request": 0.1}))
    R = seen[-1]
    assert R is not None and R.shape == (len(stored), 2)
    for i, (_, scores) in enumerate(stored):
        for j, b in enumerate(("mathy", "wordy")):
            if b in scores:
                assert abs(R[i, j] - (scores[b] - predicted[i, j])) < 1e-5   # recorded minus predicted
            else:
                assert np.isnan(R[i, j])
    svc.onboard(OnboardSpec("new-prompts", results(1.0, 0.0), {"kind": "per_request", "per_request": 0.1}))
    assert seen[-1] is None


@pytest.mark.parametrize("spec,err,part", [
    (OnboardSpec("x", results(1, 0)[:5], {"kind": "per_request"}), InvalidArgument, "between 10 and"),
    (OnboardSpec("bad name!", results(1, 0), {"kind": "per_request"}), InvalidArgument, "not valid"),
    (OnboardSpec("x", results(1, 0) + [AptitudeResult(score=1.5, prompt="hi")], {"kind": "per_request"}),
     InvalidArgument, "score must be in [0, 1]"),
    (OnboardSpec("x", results(1, 0) + [AptitudeResult(score=1, item_id="nope-1")], {"kind": "per_request"}),
     InvalidArgument, "unknown aptitude item"),
    (OnboardSpec("x", results(1, 0) + [AptitudeResult(score=1, item_id="arithmetic-000", prompt="p")],
                 {"kind": "per_request"}), InvalidArgument, "not both"),
    (OnboardSpec("x", results(1, 0) + [AptitudeResult(score=1)], {"kind": "per_request"}), InvalidArgument,
     "needs an item_id or"),
    (OnboardSpec("x", results(1, 0), {"kind": "compute"}), InvalidArgument, "active_parameters"),
    (OnboardSpec("x", results(1, 0), {"kind": "per_request", "per_request": -1}), InvalidArgument, "cost_model"),
    (OnboardSpec("x", results(1, 0), {"kind": "teleport"}), InvalidArgument, "cost_model"),
    (OnboardSpec("mathy", results(1, 0), {"kind": "per_request"}), FailedPrecondition, "defined in the server's config"),
])
def test_onboard_errors(open_service, spec, err, part):
    svc = open_service()
    with pytest.raises(err) as ei:
        svc.onboard(spec)
    assert part in str(ei.value)
    assert "x" not in svc.names


def test_a_registration_carries_the_key_that_made_it_and_is_audited(open_service, tmp_path):
    import json

    from router.serving.access import Access, AuditLog
    from router.serving.keys import KeyFile

    svc = open_service()
    svc.access = Access(svc.config.auth, None, AuditLog(tmp_path / "audit.jsonl"))
    keys = KeyFile(tmp_path / "keys.json")
    caller = keys.authenticate(keys.create("vendor", scopes=("onboard",))[1])
    svc.onboard(OnboardSpec("poet-7b", results(1.0, 0.0), {"kind": "per_request", "per_request": 0.5}), caller=caller)
    entry = json.loads(log_path(tmp_path / "state").read_text().splitlines()[-1][9:])
    assert entry["op"] == "onboard" and entry["key"] == "vendor"
    line = json.loads((tmp_path / "audit.jsonl").read_text())
    assert line["action"] == "onboard" and line["key"] == "vendor" and line["backend"] == "poet-7b"
    svc.datastore.close()
    svc._registry_log.close()
    again = open_service()
    assert again._registered["poet-7b"].key == "vendor"       # replayed with its provenance
