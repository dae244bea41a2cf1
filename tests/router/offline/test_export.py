"""Served traffic back into training data (`caprouter export`): rows from the feedback stream, and
the whole loop over real sockets: serve, feed back, export, retrain, and the new artifact routes
those prompts elsewhere."""
from __future__ import annotations

import gzip
import json

import pytest

from router.offline.export import served_rows


def _fb(rid, prompt, scores, decision_id=None, **extra):
    return {"id": rid, "prompt": prompt, "scores": scores, "source": "feedback", "ts": 1.0,
            **({"decision_id": decision_id} if decision_id else {}), **extra}


def test_served_rows_join_a_decisions_feedback_average_by_weight_and_drop_retractions():
    entries = [
        _fb("r1", "What is 2+2?", {"a": 1.0}, "d1", key="app1"),
        _fb("r2", "What is 2+2?", {"b": 0.0}, "d1", key="app2", weight=0.5),
        _fb("r3", "What is 2+2?", {"a": 0.0}, "d1", key="app2", weight=0.5),      # a: (1 + 0.5*0) / 1.5
        _fb("r4", "Write a haiku", {"b": 0.8}, cost={"b": 0.02}),                # by prompt
        _fb("r5", "Write a haiku", {"b": 0.4}),
        _fb("r6", "Spam", {"a": 1.0}, "d2", key="bad"),
        {"op": "retract", "key": "bad", "since": None, "ids": ["r6"], "ts": 2.0},
    ]
    rows, used, gone = served_rows(entries)
    assert (used, gone) == (5, 1)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"served-d1", next(i for i in by_id if i != "served-d1")}
    d1 = by_id["served-d1"]
    assert d1["prompt"] == "What is 2+2?" and d1["source"] == "feedback"
    assert d1["scores"] == {"a": pytest.approx(1 / 1.5), "b": 0.0}
    assert d1["meta"]["decision_id"] == "d1" and d1["meta"]["keys"] == ["app1", "app2"]
    haiku = next(r for r in rows if r["prompt"] == "Write a haiku")
    assert haiku["scores"] == {"b": pytest.approx(0.6)} and haiku["cost"] == {"b": 0.02}
    assert "decision_id" not in haiku["meta"]
    from datastore.records import parse_record

    for r in rows:                          # every row is a valid outcome record
        parse_record(r, "test")


HAIKU = ["Write a haiku about {}.", "Compose a short haiku on {}.", "A haiku, please, about {}."]
TOPICS = ["autumn leaves", "the sea at night", "a quiet city", "morning frost", "a mountain lake", "falling snow",
          "an old bridge", "the first rain", "a paper lantern", "summer grass", "a crow at dusk", "river stones"]


@pytest.mark.slow
def test_serve_feed_back_export_retrain_routes_those_prompts_elsewhere(tmp_path, models_dir):
    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc
    from router.cli import main
    from router.core.config import builtin_data
    from tests.conftest import LiveServer

    dense, pruned = "smollm2-135m", "smollm2-135m-mlp75"
    config = tmp_path / "served.yaml"
    config.write_text(json.dumps({
        "cache_dir": str(models_dir), "server": {"port": 0},
        "datastore": {"outcomes": [str(builtin_data("aptitude_outcomes.jsonl"))]},
        "auth": {"keys_file": str(tmp_path / "keys.json")},
        "routing": {"cost_weight": 0.0},
        "backends": [{"name": n, "kind": "route-only", "cost": {"kind": "per_request", "per_request": 1.0}}
                     for n in (dense, pruned)]}))
    prompts = [t.format(x) for x in TOPICS for t in HAIKU]
    train_p, held_out = prompts[::2], prompts[1::2]

    def serve(state, artifact=None):
        from router.core.config import load_config

        overrides = {"datastore.state_dir": str(state)}
        if artifact:
            overrides["artifact"] = str(artifact)
        srv = LiveServer(load_config(str(config), overrides))
        srv.call(srv.server.load_and_serve())
        return srv

    def route(srv, texts):
        with grpc.insecure_channel(srv.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            return [stub.Route(pb.RouteRequest(prompt=p), timeout=30) for p in texts]

    # 1. Served: the bundled outcomes favour the dense model; the app's judge says the pruned one
    #    writes the better haiku (Feedback by decision id, and by prompt for both backends).
    srv = serve(tmp_path / "state")
    try:
        held_before = [d.backend for d in route(srv, held_out)]       # before any feedback
        before = route(srv, train_p)
        with grpc.insecure_channel(srv.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            for d, p in zip(before, train_p):
                stub.Feedback(pb.FeedbackRequest(decision_id=d.decision_id, score=float(d.backend == pruned)),
                              timeout=30)
                for b in (dense, pruned):
                    stub.Feedback(pb.FeedbackRequest(prompt=p, backend=b, score=float(b == pruned)), timeout=30)
    finally:
        srv.stop()
    # 2. Export what was served (and the offline outcomes), and retrain on it.
    data = tmp_path / "served.jsonl.gz"
    assert main(["export", "--config", str(config), "--state-dir", str(tmp_path / "state"), "--out", str(data)]) == 0
    with gzip.open(data, "rt") as f:
        rows = [json.loads(line) for line in f]
    served = [r for r in rows if r.get("source") == "feedback"]
    assert len(served) == 2 * len(train_p)        # one row a decision, one a prompt (both backends' scores)
    by_decision = {r["meta"]["decision_id"]: r for r in served if "decision_id" in r["meta"]}
    assert {d: r["scores"] for d, r in by_decision.items()} == {
        d.decision_id: {d.backend: float(d.backend == pruned)} for d in before}
    assert sum(r["scores"] == {dense: 0.0, pruned: 1.0} for r in served) == len(train_p)
    assert len(rows) - len(served) == sum(1 for _ in open(builtin_data("aptitude_outcomes.jsonl")))
    art = tmp_path / "retrained"
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(art), "--epochs", "30",
                 "--test-share", "0"]) == 0
    # 3. The retrained artifact, served afresh (no feedback in its state), routes held-out haiku
    #    prompts to the pruned model, which the router trained on offline data alone did not.
    srv = serve(tmp_path / "fresh", artifact=art)
    try:
        held_after = [d.backend for d in route(srv, held_out)]
    finally:
        srv.stop()
    assert held_before.count(pruned) <= len(held_out) // 4
    assert held_after.count(pruned) >= 3 * len(held_out) // 4, held_after
