"""Architecture codes and the MoE backend built on the real SmolLM2 and served through the router
over real gRPC: a quick joint build (few prompts, one round), its artifact, and dispatch."""
from __future__ import annotations

import json

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory, models_dir):
    """A quick build through the CLI: two codes, 40 calibration prompts, one round."""
    from router.cli import main

    out = tmp_path_factory.mktemp("codes") / "codes"
    assert main(["codes", "--out", str(out), "--keep", "0.9,0.6", "--rounds", "1", "--max-prompts", "40",
                 "--answer-tokens", "8", "--cache-dir", str(models_dir)]) == 0
    return out


def test_the_codes_artifact_round_trips(codes_dir):
    from transformers import AutoConfig

    from router.offline.codes import load_manifest

    m = load_manifest(codes_dir)
    assert [c["name"] for c in m["codes"]] == ["mlp90-a", "mlp60-b"]
    assert [c["intermediate_size"] for c in m["codes"]] == [round(0.9 * 1536), round(0.6 * 1536)]
    for c in m["codes"]:
        # materialized: a plain HF folder with the smaller MLP, nothing masked
        assert AutoConfig.from_pretrained(str(codes_dir / c["name"])).intermediate_size == c["intermediate_size"]
    h = m["history"][0]["codes"]
    assert abs(h["mlp90-a"]["share"] - 0.5) < 0.05 and abs(h["mlp60-b"]["share"] - 0.5) < 0.05
    ev = m["evaluation"]
    assert ev["mix"]["routed_nll"] > ev["dense_nll"] and m["embedder"] and m["dim"] == 384
    assert json.loads((codes_dir / "codes.json").read_text()) == m


@pytest.fixture(scope="module")
def codes_server(tmp_path_factory, models_dir, codes_dir):
    from router.core.config import load_config
    from tests.conftest import LiveServer

    tmp = tmp_path_factory.mktemp("codes-live")
    cfg = {"server": {"port": 0}, "cache_dir": str(models_dir), "artifact": None,
           "datastore": {"outcomes": [], "state_dir": str(tmp / "state")},
           "routing": {"cost_weight": 0.01},
           "backends": [
               {"name": "dense", "kind": "transformers", "options": {"model": "smollm2-135m-instruct"}},
               {"name": "code-a", "kind": "transformers", "options": {"model": str(codes_dir / "mlp90-a")}},
               {"name": "moe", "kind": "moe", "options": {"experts": 8, "top_k": 4}}]}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    srv = LiveServer(load_config(tmp / "c.yaml"))
    srv.call(srv.server.load_and_serve())
    yield srv
    srv.stop()


def test_codes_and_moe_are_routed_and_answer_over_grpc(codes_server):
    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc

    with grpc.insecure_channel(codes_server.address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        r = stub.Route(pb.RouteRequest(prompt="Explain photosynthesis in one sentence."), timeout=60)
        ranked = {c.backend: c for c in r.candidates}
        assert set(ranked) == {"dense", "code-a", "moe"}
        # compute cost follows the active parameters: both sub-networks are cheaper than dense
        assert ranked["code-a"].predicted_cost < ranked["dense"].predicted_cost
        assert ranked["moe"].predicted_cost < ranked["dense"].predicted_cost
        for name in ("code-a", "moe"):
            chunks = list(stub.Generate(pb.GenerateRequest(
                prompt="What is the capital of France?", knobs=pb.RoutingKnobs(allowed_backends=[name]),
                params=pb.GenerationParams(max_tokens=12)), timeout=120))
            assert chunks[0].start.backend == name and chunks[-1].end.backend == name
            assert "".join(c.text for c in chunks).strip()
            assert chunks[-1].end.usage.completion_tokens >= 1
        listed = {b.name: b for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}
        assert listed["moe"].kind == "moe" and listed["code-a"].kind == "transformers"
