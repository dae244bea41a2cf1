"""Ray Serve mode end to end: a local Ray instance with small resources, the real backends as
deployments, the router as the ingress, called over real gRPC; compared with in-process mode."""
from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 + 25?",
           "Explain photosynthesis briefly.", "Name a primary colour."]
DENSE, PRUNED = "smollm2-135m", "smollm2-135m-mlp75"


@pytest.fixture(scope="module")
def ray_serving(tmp_path_factory, models_dir):
    pytest.importorskip("ray")
    from router.adapters.ray import RayServing
    from tests.conftest import default_config

    cfg = default_config(tmp_path_factory.mktemp("ray"), models_dir)
    cfg.server.http_port = 0
    cfg.ray.num_cpus = 2
    # A replica that is gone must fail over quickly here; a fresh one needs longer than this to load.
    cfg.ray.first_chunk_timeout_s = 6.0
    # Slower than the failover below takes to dispatch (milliseconds after the kill), so that it
    # usually meets the dead replica itself; fast enough to see an outage of a few seconds.
    cfg.ray.status_poll_s = 1.0
    srv = RayServing(cfg)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def ray_stub(ray_serving):
    import grpc

    from caprouter.v1 import router_pb2_grpc

    ch = grpc.insecure_channel(ray_serving.address)
    yield router_pb2_grpc.RouterStub(ch), ch
    ch.close()


@pytest.fixture(scope="module")
def local_stub(tmp_path_factory, models_dir):
    """In-process mode with the same config and a fresh state, for comparison."""
    import grpc

    from caprouter.v1 import router_pb2_grpc
    from tests.conftest import LiveServer, default_config

    srv = LiveServer(default_config(tmp_path_factory.mktemp("local"), models_dir))
    srv.call(srv.server.load_and_serve())
    ch = grpc.insecure_channel(srv.address)
    yield router_pb2_grpc.RouterStub(ch)
    ch.close()
    srv.stop()


def test_health_and_reflection_in_ray_mode(ray_stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, ch = ray_stub
    hs = health_pb2_grpc.HealthStub(ch)
    assert hs.Check(health_pb2.HealthCheckRequest(service="caprouter.v1.Router"), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    rs = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(rs.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert "caprouter.v1.Router" in {s.name for s in resp.list_services_response.service}


def test_the_openai_endpoint_and_metrics_are_served_in_ray_mode(ray_serving, ray_stub):
    import json
    import urllib.request

    assert ray_serving.http_address
    req = urllib.request.Request(f"http://{ray_serving.http_address}/v1/chat/completions", data=json.dumps(
        {"model": "caprouter", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        body = json.loads(r.read())
        assert r.headers["x-caprouter-backend"] == body["model"] and body["choices"][0]["message"]["content"]
    with urllib.request.urlopen(f"http://{ray_serving.http_address}/metrics", timeout=10) as r:
        assert 'rpc="Generate"' in r.read().decode()


def test_decisions_and_streams_match_in_process_mode(ray_stub, local_stub):
    from caprouter.v1 import router_pb2 as pb

    stub, _ = ray_stub
    for p in PROMPTS:
        a = stub.Route(pb.RouteRequest(prompt=p), timeout=30)
        b = local_stub.Route(pb.RouteRequest(prompt=p), timeout=30)
        assert a.backend == b.backend
        for ca, cb in zip(a.candidates, b.candidates):
            assert ca.backend == cb.backend
            assert ca.predicted_quality == pytest.approx(cb.predicted_quality, abs=1e-5)
            # float32 rounding: replicas run torch on one thread (Ray sets OMP_NUM_THREADS), sums differ in order
            assert ca.predicted_cost == pytest.approx(cb.predicted_cost, rel=1e-5)
    for backend in (DENSE, PRUNED):
        req = pb.GenerateRequest(prompt="What is the capital of France?", knobs=pb.RoutingKnobs(allowed_backends=[backend]),
                                 params=pb.GenerationParams(max_tokens=12))
        ray_chunks = list(stub.Generate(req, timeout=120))
        local_chunks = list(local_stub.Generate(req, timeout=120))
        assert len([c for c in ray_chunks if c.text]) > 1          # streamed, not one blob
        assert "".join(c.text for c in ray_chunks) == "".join(c.text for c in local_chunks)
        assert ray_chunks[0].start.backend == backend and ray_chunks[-1].end.usage.completion_tokens == \
            local_chunks[-1].end.usage.completion_tokens


def _backend_status(stub, name):
    from caprouter.v1 import router_pb2 as pb

    return {b.name: b for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=10).backends}[name]


def test_a_dead_replica_fails_over_then_the_deployment_recovers(ray_serving, ray_stub):
    import ray

    from caprouter.v1 import router_pb2 as pb
    from router.adapters.ray import replica_actors

    stub, _ = ray_stub
    knobs = pb.RoutingKnobs(allowed_backends=[DENSE, PRUNED], cost_weight=0.0)
    prompt = "What is the capital of France?"
    assert stub.Route(pb.RouteRequest(prompt=prompt, knobs=knobs), timeout=30).backend == DENSE
    # Watch the backend's status from the moment of the kill until it is back.
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        t0 = time.time()
        while time.time() - t0 < 180 and not done.is_set():
            seen.append(_backend_status(stub, DENSE).status)
            if pb.BACKEND_STATUS_UNAVAILABLE in seen and seen[-1] == pb.BACKEND_STATUS_READY:
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    for actor in replica_actors(ray_serving.cfg.ray.app_name, DENSE):
        ray.kill(actor, no_restart=True)
    watcher.start()
    chunks = list(stub.Generate(pb.GenerateRequest(prompt=prompt, knobs=knobs, params=pb.GenerationParams(max_tokens=8)),
                                timeout=120))
    start = chunks[0].start
    # Dispatched to the dead replica and fell back; or, when the health poll saw the outage first,
    # routed around it.
    assert start.backend == PRUNED
    assert [f.backend for f in start.fallbacks] == [DENSE] or DENSE not in [c.backend for c in start.candidates]
    assert "".join(c.text for c in chunks).strip()
    # the outage showed as backend status, then Serve brought a replica back
    watcher.join(200)
    done.set()
    assert pb.BACKEND_STATUS_UNAVAILABLE in seen and seen[-1] == pb.BACKEND_STATUS_READY
    again = list(stub.Generate(pb.GenerateRequest(prompt=prompt, knobs=knobs, params=pb.GenerationParams(max_tokens=8)),
                               timeout=120))
    assert again[0].start.backend == DENSE and not again[0].start.fallbacks


def test_a_replica_dying_mid_stream_ends_the_stream_with_a_clear_error(ray_serving, ray_stub):
    import grpc
    import ray

    from caprouter.v1 import router_pb2 as pb
    from router.adapters.ray import replica_actors

    stub, _ = ray_stub
    stream = stub.Generate(pb.GenerateRequest(prompt="Write a long story about a dragon.",
                                              knobs=pb.RoutingKnobs(allowed_backends=[PRUNED]),
                                              params=pb.GenerationParams(max_tokens=400)), timeout=120)
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for c in stream:
            got.append(c)
            if len(got) == 3:
                for actor in replica_actors(ray_serving.cfg.ray.app_name, PRUNED):
                    ray.kill(actor, no_restart=True)
    assert got[0].start.backend == PRUNED
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "after streaming began" in err.value.details()


def test_the_serve_config_builds_the_application_it_names():
    """docs/examples/serve-config.yaml names deployments that app_builder creates."""
    pytest.importorskip("ray")
    from pathlib import Path

    import yaml
    from ray.serve import Application

    from backends.ray_serve import deployment_name
    from router.adapters.ray import app_builder

    doc = yaml.safe_load((Path(__file__).resolve().parents[3] / "docs/examples/serve-config.yaml").read_text())
    app_cfg = doc["applications"][0]
    assert app_cfg["import_path"] == "router.adapters.ray:app_builder"
    app = app_builder(app_cfg["args"])
    assert isinstance(app, Application)
    names = {deployment_name(DENSE), deployment_name(PRUNED), "router"}
    assert {d["name"] for d in app_cfg["deployments"]} <= names


@pytest.mark.parametrize("ray_section,part", [
    ({"default": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}, "not both"),
    ({"ingress": {"num_replicas": 2}}, "one replica"),
])
def test_invalid_ray_settings_are_refused(ray_section, part):
    pytest.importorskip("ray")
    from router.adapters.ray import build_application
    from router.core.config import load_config
    from router.core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=part):
        build_application(load_config(None, {"ray": ray_section}))
