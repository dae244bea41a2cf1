"""`caprouter train` / `caprouter eval` on a small slice of the real LLMRouter data, some of its models
renamed as published routing data names them (provider suffixes and paths: ``@``, ``/``, ``:``):
whatever `train` accepts, `serve --artifact` loads."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from router.core.errors import ArtifactError

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent / "caprouter"


# Names as published routing data spells them: a provider suffix, an organisation path, a tag.
RENAMED = {"llama-3.1-8b-instruct": "Llama-3.1-8B-Inst@sambanova", "qwen2.5-7b-instruct": "Qwen/qwen2.5-7b-instruct",
           "codegemma-7b": "codegemma:7b"}


def _renamed(row: dict) -> dict:
    row["scores"] = {RENAMED.get(k, k): v for k, v in row["scores"].items()}
    prices = row["meta"]["price_per_M_tokens"]
    row["meta"]["price_per_M_tokens"] = {RENAMED.get(k, k): v for k, v in prices.items()}
    return row


@pytest.fixture(scope="module")
def slice_file(shared_data, tmp_path_factory) -> Path:
    rows = [_renamed(json.loads(line)) for line in gzip.open(shared_data / "llmrouter.jsonl.gz", "rt")]
    train = [r for r in rows if r["split"] == "train"][::14][:400]
    test = [r for r in rows if r["split"] == "test"][:120]
    p = tmp_path_factory.mktemp("slice") / "slice.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for r in train + test:
            f.write(json.dumps(r) + "\n")
    return p


@pytest.fixture(scope="module")
def trained(slice_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "router"
    # --router learned: these tests need a capability model (auto chooses by held-out folds).
    r = subprocess.run([str(BIN), "train", "--data", str(slice_file), "--out", str(out), "--epochs", "15",
                        "--seed", "1", "--router", "learned"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test AIQ" in r.stdout and "<- served" in r.stdout
    return out


def test_train_writes_a_versioned_artifact_with_a_manifest(trained, slice_file):
    m = json.loads((trained / "manifest.json").read_text())
    assert m["format"] == 1 and m["code_version"] and m["embedder"] == {
        "id": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384, "max_tokens": 256}
    assert len(m["backends"]) == 9 and m["data"]["n_test"] == 120 and m["data"]["sha256"]
    assert set(RENAMED.values()) <= set(m["backends"])
    assert set(m["knn_weights"]) == set(m["backends"]) and 0 < m["metrics"]["test"]["aiq"] <= 1
    sel = m["metrics"]["selection"]
    assert m["router"] == "capability" and sel["folds"] == 3 and sel["metric"] == "aiq"
    assert {c["name"] for c in sel["candidates"]} == {"MLP", "matrix factorization", "blend w_con=0.2 w_ot=0.1",
                                                       "blend w_con=0 w_ot=0", "blend w_con=0.2 w_ot=0",
                                                       "blend w_con=0 w_ot=0.1"}
    assert sel["chosen"] == max(sel["candidates"], key=lambda c: c["mean"])["name"]
    assert set(m["metrics"]["seconds"]) == {"embedding_s", "choosing_s", "training_s"}
    assert m["cost"]["mean_per_request"]["gemma-2-9b-it"] == pytest.approx(0.1)
    for f in ("model.safetensors", "outcomes.jsonl.gz", "embeddings.npy"):
        assert (trained / f).exists()


def test_eval_writes_markdown_json_and_png(trained, slice_file, tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([str(BIN), "eval", "--artifact", str(trained), "--data", str(slice_file), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["n"] == 120 and {"caprouter", "kNN (k=40)", "oracle", "zero router"} <= set(rep)
    assert rep["oracle"]["aiq"] >= rep["caprouter"]["aiq"] > 0
    assert out.with_suffix(".md").read_text().startswith("# Evaluation")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_artifact_round_trip_and_manifest_mismatch_refused(trained, tmp_path):
    import shutil

    import numpy as np

    from encoders.capability import predict
    from router.prediction import artifact as art

    a = art.load(trained, embedder_id="sentence-transformers/all-MiniLM-L6-v2", dim=384)
    x = a.embeddings[:5]
    assert predict(a.model, x).shape == (5, 9) and len(a.records) == len(a.embeddings)
    b = art.load(trained)
    np.testing.assert_allclose(predict(b.model, x), predict(a.model, x))
    with pytest.raises(ArtifactError, match="trained on embeddings of"):
        art.load(trained, embedder_id="other/encoder")
    with pytest.raises(ArtifactError, match="expects 384-d"):
        art.load(trained, dim=768)
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unsupported artifact format"):
        art.load(bad)
    with pytest.raises(ArtifactError, match="not a caprouter artifact"):
        art.load(tmp_path)


def test_artifacts_from_before_several_neighbourhoods_still_load(trained, tmp_path):
    """An artifact written before knn_scales existed: one datastore weight per backend."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    from encoders.capability import predict
    from router.prediction import artifact as art

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    state = load_file(str(old / "model.safetensors"))
    state["w"] = state["w"][:, 0].contiguous()
    save_file(state, str(old / "model.safetensors"))
    m = json.loads((old / "manifest.json").read_text())
    del m["capability"]["knn_scales"]
    (old / "manifest.json").write_text(json.dumps(m))
    a = art.load(old)
    assert a.model.knn_scales is None and tuple(a.model.w.shape) == (9, 1)
    assert predict(a.model, a.embeddings[:3], np.full((3, 9), 0.5, np.float32)).shape == (3, 9)


def test_missing_costs_is_a_clear_cli_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "x", "scores": {"a": 1, "b": 0}}) + "\n")
    r = subprocess.run([str(BIN), "train", "--data", str(p), "--out", str(tmp_path / "o")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "pass --costs" in r.stderr


def test_serve_artifact_routes_over_route_only_backends(trained, tmp_path):
    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc
    from router.core.config import load_config
    from tests.conftest import LiveServer

    cfg = load_config(None, {"server.port": 0, "artifact": str(trained), "backends": [],
                             "datastore.state_dir": str(tmp_path / "state"), "routing.cost_unit": "USD/M tokens",
                             "routing.cost_weight": 0.0})
    srv = LiveServer(cfg)
    try:
        srv.call(srv.server.load_and_serve())
        names = json.loads((trained / "manifest.json").read_text())["backends"]
        with grpc.insecure_channel(srv.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            listed = stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends
            assert sorted(b.name for b in listed) == sorted(names)
            assert all(b.kind == "route-only" and b.status == pb.BACKEND_STATUS_READY for b in listed)
            assert all(b.cost_model.kind == "per_request" and b.cost_model.per_request > 0 for b in listed)
            r = stub.Route(pb.RouteRequest(prompt="What is 17 * 23? Think step by step."), timeout=30)
            assert r.backend in names and len(r.candidates) == len(names) and r.cost_unit == "USD/M tokens"
            # The encoder's blend changes predictions relative to the datastore alone.
            svc = srv.app.service
            assert svc.capability is not None and list(svc.capability.backends) == names
            assert set(RENAMED.values()) <= {c.backend for c in r.candidates}
            forced = stub.Route(pb.RouteRequest(prompt="Hi", knobs=pb.RoutingKnobs(
                allowed_backends=["Llama-3.1-8B-Inst@sambanova"])), timeout=30)
            assert forced.backend == "Llama-3.1-8B-Inst@sambanova"
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.Generate(pb.GenerateRequest(prompt="hello"), timeout=30))
            assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "is route-only" in ei.value.details() and any(repr(n) in ei.value.details() for n in names)
            fb = stub.Feedback(pb.FeedbackRequest(decision_id=r.decision_id, score=1.0), timeout=30)
            assert fb.backend == r.backend
    finally:
        srv.stop()


def test_a_name_serving_cannot_take_is_refused_by_train_and_a_bad_artifact_fails_start_up_in_one_line(trained,
                                                                                                       tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "scores": {"gpt 4 (turbo)": 1, "b": 0}}) + "\n")
    r = subprocess.run([str(BIN), "train", "--data", str(bad), "--out", str(tmp_path / "o"), "--costs",
                        str(_costs(tmp_path, {"gpt 4 (turbo)": 1.0, "b": 0.5}))], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "'gpt 4 (turbo)'" in r.stderr and "rename" in r.stderr
    # An artifact edited by hand (or from elsewhere) with such a name: serve says so in one line.
    art = tmp_path / "edited"
    art.mkdir()
    for f in trained.iterdir():
        (art / f.name).write_bytes(f.read_bytes())
    m = json.loads((art / "manifest.json").read_text())
    m["backends"][0] = "gpt 4 (turbo)"
    (art / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([str(BIN), "serve", "--artifact", str(art), "--port", "0", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert lines[-1].startswith("error: ") and "'gpt 4 (turbo)'" in lines[-1] and "retrain" in lines[-1]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr


def _costs(tmp_path: Path, costs: dict) -> Path:
    p = tmp_path / "costs.json"
    p.write_text(json.dumps(costs))
    return p


def test_equal_costs_train_and_report_accuracy_against_best_single_and_oracle(slice_file, tmp_path):
    """Quality-only routing (every backend costs the same) used to die with 'c_max must exceed
    c_min'; it trains, reports accuracy next to the best single backend and the oracle, and serves.
    A score out of [0, 1] is clipped with --clip-scores, and said."""
    rows = []
    for line in gzip.open(slice_file, "rt"):
        r = json.loads(line)
        r["meta"].pop("price_per_M_tokens", None)
        r.pop("cost", None)
        rows.append(r)
    first = next(iter(rows[0]["scores"]))
    rows[0]["scores"][first] = 1.2                               # one score out of range: --clip-scores
    data = tmp_path / "equal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({b: 1.0 for b in rows[0]["scores"]}))
    out = tmp_path / "router"
    r = subprocess.run([str(BIN), "train", "--data", str(data), "--out", str(out), "--epochs", "5", "--costs",
                        str(costs), "--clip-scores"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    test = json.loads((out / "manifest.json").read_text())["metrics"]["test"]
    assert test["equal_costs"] == 1.0 and 0 < test["best_single"] <= test["oracle"] <= 1
    assert 0 < test["accuracy"] <= test["oracle"] and test["aiq"] >= test["accuracy"]
    assert "accuracy" in r.stdout and "best single" in r.stdout and "clipped 1 score(s)" in r.stdout
    assert json.loads((out / "manifest.json").read_text())["data"]["clipped_scores"] == 1
    from router.prediction.artifact import load

    assert load(out).backends == sorted(rows[0]["scores"])          # what serve --artifact loads


def test_small_data_serves_the_datastore_alone_chosen_on_folds_and_says_so(slice_file, tmp_path):
    """Fewer prompts than a learned router needs: only the datastore's neighbourhoods are compared,
    the artifact has no model, and it evaluates and serves (Route over gRPC) like any other."""
    rows = [json.loads(line) for line in gzip.open(slice_file, "rt")]
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:150] + rows[-40:]))
    out = tmp_path / "router"
    r = subprocess.run([str(BIN), "train", "--data", str(small), "--out", str(out), "--folds", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fewer than the 200 a learned router needs" in r.stdout and "the datastore alone (k " in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    sel = m["metrics"]["selection"]
    assert m["router"] == "datastore" and "knn_weights" not in m and "capability" not in m
    assert sel["folds"] == 4 and all(c["name"].startswith("datastore") for c in sel["candidates"])
    best = max(sel["candidates"], key=lambda c: c["mean"])
    assert sel["chosen"] == best["name"] and not (out / "model.safetensors").exists()
    if best["name"] != "datastore (configured k, temperature)":
        k, t = best["name"].removeprefix("datastore k=").split(" temperature=")
        assert m["datastore"]["k"] == int(k) and m["datastore"]["temperature"] == float(t)

    from router.core.config import load_config
    from router.prediction import artifact as art
    from tests.conftest import LiveServer

    assert art.load(out).model is None
    rep = tmp_path / "eval.json"
    r = subprocess.run([str(BIN), "eval", "--artifact", str(out), "--data", str(small), "--json", str(rep)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 0 < json.loads(rep.read_text())["caprouter"]["aiq"] <= 1

    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc

    cfg = load_config(None, {"server.port": 0, "artifact": str(out), "backends": [],
                             "datastore.state_dir": str(tmp_path / "state"), "routing.cost_unit": "USD/M tokens"})
    srv = LiveServer(cfg)
    try:
        srv.call(srv.server.load_and_serve())
        assert srv.app.service.capability is None
        assert srv.app.service.datastore.k == m["datastore"]["k"]           # the chosen neighbourhood serves
        with grpc.insecure_channel(srv.address) as ch:
            got = router_pb2_grpc.RouterStub(ch).Route(pb.RouteRequest(prompt="What is 17 * 23?"), timeout=30)
        assert got.backend in m["backends"] and len(got.candidates) == len(m["backends"])
    finally:
        srv.stop()


def test_an_ensemble_trains_evaluates_and_serves(slice_file, tmp_path):
    """--router ensemble: the ensembles alone are compared (their members fitted on each fold), the
    winner's learned members are written one file each, and `eval` and `serve --artifact` run the
    same mean of members, neighbourhoods and cluster table that was chosen."""
    import numpy as np

    from router.core.config import load_config
    from router.offline import candidates as cm
    from router.prediction import artifact as art
    from router.prediction.predictor import Ensemble, Predictor, columns, knn_store, pool_repeats
    from tests.conftest import LiveServer

    out = tmp_path / "router"
    r = subprocess.run([str(BIN), "train", "--data", str(slice_file), "--out", str(out), "--epochs", "15",
                        "--router", "ensemble"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    sel = m["metrics"]["selection"]
    assert m["router"] == "ensemble" and "capability" not in m and "ensemble: " in r.stdout
    names = [c["name"] for c in sel["candidates"]]
    assert len(names) == len(cm.ENSEMBLES) and sel["chosen"] in names and all(n.startswith("ensemble: ") for n in names)
    members = m["ensemble"]["members"]
    assert [x["name"] for x in members] == [x["name"] for x in m["metrics"]["ensemble_members"]]
    assert all((out / x["weights"]).exists() for x in members) and not (out / "model.safetensors").exists()

    a = art.load(out)
    ens = a.capability()
    assert isinstance(ens, Ensemble) and a.model is None and len(ens.members) == len(members)
    assert [list(s) for s in ens.neighbourhoods] == m["ensemble"]["neighbourhoods"]
    tables = m["ensemble"]["clusters"]
    assert len(ens.tables) == len(tables) == (cm.CLUSTER_TABLE in sel["chosen"])
    assert all((out / c["weights"]).exists() and t.quality.shape == (c["regions"], len(a.backends))
               for c, t in zip(tables, ens.tables))
    # Served: the mean of the members and neighbourhoods over the store of every non-test outcome.
    rows = [json.loads(line) for line in gzip.open(slice_file, "rt")]
    assert m["metrics"]["test"]["aiq"] > 0
    store = knn_store(a.embeddings, a.records, load_config(None).datastore.model_copy(update=m["datastore"]))
    x = a.embeddings[:7]
    by = dict(zip(ens.scales, store.estimate_many(x, ens.scales)))
    mean = ens.predict(x, by)
    parts = [*(mm.predict(x, by) for mm in ens.members), *(columns(by[s], a.backends)[0] for s in ens.neighbourhoods),
             *(t.predict(x) for t in ens.tables)]
    np.testing.assert_allclose(mean, np.mean(parts, 0), atol=1e-6)
    q = Predictor(store, ens, repeats=False).predict(x, a.backends, np.zeros(len(a.backends))).quality
    np.testing.assert_allclose(q, mean, atol=1e-6)
    # These prompts are stored, so the served estimate (repeats on, the default) pools their records.
    served = Predictor(store, ens).predict(x, a.backends, np.zeros(len(a.backends))).quality
    assert (store.recorded(x).support > 0).any(1).all()
    np.testing.assert_allclose(served, pool_repeats(mean, store.recorded(x), a.backends), atol=1e-6)
    rep = tmp_path / "eval.json"
    r = subprocess.run([str(BIN), "eval", "--artifact", str(out), "--data", str(slice_file), "--json", str(rep)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(rep.read_text())
    assert got["n"] == sum(1 for row in rows if row["split"] == "test")
    assert 0 < got["caprouter"]["aiq"] <= 1 and "kNN (k=40)" in got

    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc

    cfg = load_config(None, {"server.port": 0, "artifact": str(out), "backends": [],
                             "datastore.state_dir": str(tmp_path / "state"), "routing.cost_unit": "USD/M tokens"})
    srv = LiveServer(cfg)
    try:
        srv.call(srv.server.load_and_serve())
        assert isinstance(srv.app.service.capability, Ensemble)
        with grpc.insecure_channel(srv.address) as ch:
            got = router_pb2_grpc.RouterStub(ch).Route(pb.RouteRequest(prompt="What is 17 * 23?"), timeout=30)
        assert got.backend in m["backends"] and len(got.candidates) == len(m["backends"])
    finally:
        srv.stop()
