"""The real path over a real socket: MiniLM, FAISS and SmolLM2 (dense and pruned)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caprouter.v1 import router_pb2 as pb

pytestmark = pytest.mark.slow

DENSE, PRUNED = "smollm2-135m", "smollm2-135m-mlp75"


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_serving_and_reflection(live_server):
    assert _health(live_server.address) == health_pb2.HealthCheckResponse.SERVING
    assert _health(live_server.address, "caprouter.v1.Router") == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(live_server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=5)))
    names = {s.name for s in resp.list_services_response.service}
    assert {"caprouter.v1.Router", "grpc.health.v1.Health"} <= names


def test_not_serving_until_loaded(tmp_path, models_dir):
    from tests.conftest import LiveServer, default_config

    srv = LiveServer(default_config(tmp_path, models_dir))
    try:
        assert _health(srv.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        from caprouter.v1 import router_pb2_grpc

        with grpc.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.RpcError) as ei:
                router_pb2_grpc.RouterStub(ch).Route(pb.RouteRequest(prompt="hi"), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in ei.value.details()
    finally:
        srv.stop()


def test_route_ranks_every_backend_with_scores(stub):
    r = stub.Route(pb.RouteRequest(prompt="What is 3 + 4? Answer with just the number."), timeout=30)
    assert r.backend in (DENSE, PRUNED) and r.decision_id
    assert {c.backend for c in r.candidates} == {DENSE, PRUNED}
    assert [c.rank for c in r.candidates] == [1, 2] and r.candidates[0].backend == r.backend
    assert r.candidates[0].utility >= r.candidates[1].utility
    for c in r.candidates:
        assert 0 <= c.predicted_quality <= 1 and c.predicted_cost > 0 and c.support > 0
    assert r.timings.total_ms >= r.timings.embedding_ms > 0 and r.cost_unit == "GFLOP"
    assert r.metadata.api_version == "caprouter.v1" and r.metadata.datastore_records >= 300
    assert r.metadata.embedder.endswith("all-MiniLM-L6-v2")


def test_route_knobs_change_the_decision(stub):
    q = "What is the capital of Italy? Answer in a few words."
    only = stub.Route(pb.RouteRequest(prompt=q, knobs=pb.RoutingKnobs(allowed_backends=[PRUNED])), timeout=30)
    assert only.backend == PRUNED and [e.backend for e in only.excluded] == [DENSE]
    cheap = stub.Route(pb.RouteRequest(prompt=q, knobs=pb.RoutingKnobs(cost_weight=1.0)), timeout=30)
    assert cheap.backend == min(cheap.candidates, key=lambda c: c.predicted_cost).backend
    chat = stub.Route(pb.RouteRequest(messages=[pb.Message(role="user", content="Name a fruit."),
                                                pb.Message(role="assistant", content="Apple."),
                                                pb.Message(role="user", content="Another one?")]), timeout=30)
    assert chat.backend


def _generate(stub, **kw):
    timeout = kw.pop("timeout", 120)
    return list(stub.Generate(pb.GenerateRequest(**kw), timeout=timeout))


def test_generate_streams_decision_text_and_usage(stub):
    chunks = _generate(stub, prompt="What is the capital of France?",
                       params=pb.GenerationParams(max_tokens=12, temperature=0.0))
    first, last = chunks[0], chunks[-1]
    assert first.HasField("start") and first.start.backend in (DENSE, PRUNED) and first.start.decision_id
    assert first.metadata.request_id and len(first.start.candidates) == 2
    assert last.HasField("end")
    assert last.end.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert 1 <= last.end.usage.completion_tokens <= 12 and last.end.usage.prompt_tokens > 5
    assert last.end.latency_ms > 0 and last.end.backend == first.start.backend
    text = "".join(c.text for c in chunks)
    assert text.strip()


def test_generate_forced_backend_greedy_is_deterministic(stub):
    kw = dict(prompt="What is the capital of France?", knobs=pb.RoutingKnobs(allowed_backends=[DENSE]),
              params=pb.GenerationParams(max_tokens=8))
    a = "".join(c.text for c in _generate(stub, **kw))
    b = "".join(c.text for c in _generate(stub, **kw))
    assert a == b and "Paris" in a


def test_generate_stop_sequence(stub):
    chunks = _generate(stub, prompt="What is the capital of France?",
                       knobs=pb.RoutingKnobs(allowed_backends=[DENSE]),
                       params=pb.GenerationParams(max_tokens=20, stop=["Paris"]))
    text = "".join(c.text for c in chunks)
    assert "Paris" not in text and chunks[-1].end.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE


def _code(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


ROUTE_ERRORS = [
    (pb.RouteRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (pb.RouteRequest(prompt="x" * 40_000), grpc.StatusCode.INVALID_ARGUMENT, "prompt too long"),
    (pb.RouteRequest(prompt="hi", knobs=pb.RoutingKnobs(allowed_backends=["gpt-9"])),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown backend"),
    (pb.RouteRequest(prompt="hi", knobs=pb.RoutingKnobs(cost_weight=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "cost_weight must be >= 0"),
    (pb.RouteRequest(prompt="hi", knobs=pb.RoutingKnobs(min_quality=1.5)), grpc.StatusCode.INVALID_ARGUMENT,
     "min_quality must be in [0, 1]"),
    (pb.RouteRequest(messages=[pb.Message(role="wizard", content="hi")]), grpc.StatusCode.INVALID_ARGUMENT,
     "role must be one of"),
    (pb.RouteRequest(messages=[pb.Message(role="user", content="")]), grpc.StatusCode.INVALID_ARGUMENT,
     "content is empty"),
    (pb.RouteRequest(prompt="hi", knobs=pb.RoutingKnobs(min_quality=1.0)), grpc.StatusCode.FAILED_PRECONDITION,
     "no backend satisfies"),
    (pb.RouteRequest(prompt="hi", knobs=pb.RoutingKnobs(max_cost=0.0)), grpc.StatusCode.FAILED_PRECONDITION,
     "max_cost"),
]


@pytest.mark.parametrize("req,code,part", ROUTE_ERRORS)
def test_route_error_table(stub, req, code, part):
    got, details = _code(lambda: stub.Route(req, timeout=30))
    assert got == code and part in details


@pytest.mark.parametrize("req,code,part", [
    (pb.FeedbackRequest(decision_id="no-such-decision", score=1.0), grpc.StatusCode.NOT_FOUND, "unknown decision_id"),
    (pb.FeedbackRequest(prompt="hi", backend=DENSE, score=1.5), grpc.StatusCode.INVALID_ARGUMENT, "score must be"),
    (pb.FeedbackRequest(prompt="hi", backend=DENSE, score=-0.1), grpc.StatusCode.INVALID_ARGUMENT, "score must be"),
    (pb.FeedbackRequest(prompt="hi", backend="gpt-9", score=1.0), grpc.StatusCode.INVALID_ARGUMENT, "unknown backend"),
    (pb.FeedbackRequest(score=1.0), grpc.StatusCode.INVALID_ARGUMENT, "needs a decision_id"),
])
def test_feedback_error_table(stub, req, code, part):
    got, details = _code(lambda: stub.Feedback(req, timeout=30))
    assert got == code and part in details


@pytest.mark.parametrize("params,part", [
    (pb.GenerationParams(max_tokens=0), "max_tokens"),
    (pb.GenerationParams(max_tokens=100_000), "max_tokens"),
    (pb.GenerationParams(temperature=-1), "temperature"),
])
def test_generate_error_table(stub, params, part):
    got, details = _code(lambda: _generate(stub, prompt="hi", params=params))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and part in details


def test_route_batch_keeps_a_budget_and_route_keeps_a_window_budget(stub):
    prompts = ["What is 12 + 30?", "Name the capital of Japan.", "Reverse the word 'cat'.",
               "Is 17 a prime number? Answer yes or no.", "Write the word 'blue' in capital letters.",
               "What is 7 * 8?", "Which is heavier, a kilogram of iron or a gram of gold?", "Spell 'dog' backwards."]
    items = [pb.BatchItem(prompt=p) for p in prompts]
    free = stub.RouteBatch(pb.RouteBatchRequest(items=items, knobs=pb.RoutingKnobs(cost_weight=0.0)), timeout=60)
    assert len(free.decisions) == len(prompts) and free.metadata.api_version == "caprouter.v1"
    lo = sum(min(c.predicted_cost for c in d.candidates) for d in free.decisions) / len(prompts)
    hi = sum(max(c.predicted_cost for c in d.candidates) for d in free.decisions) / len(prompts)
    budget = lo + 0.3 * (hi - lo)
    b = stub.RouteBatch(pb.RouteBatchRequest(items=items, knobs=pb.RoutingKnobs(budget_per_request=budget)), timeout=60)
    assert b.predicted_mean_cost <= budget + 1e-6 and b.cost_unit == "GFLOP"
    chosen = [d.candidates[0] for d in b.decisions]
    assert all(d.backend == c.backend and c.rank == 1 for d, c in zip(b.decisions, chosen))
    assert abs(sum(c.predicted_cost for c in chosen) / len(chosen) - b.predicted_mean_cost) < 1e-6
    assert all(d.cost_weight == b.cost_weight for d in b.decisions)
    with pytest.raises(grpc.RpcError) as ei:
        stub.RouteBatch(pb.RouteBatchRequest(items=items, knobs=pb.RoutingKnobs(budget_per_request=lo / 2)), timeout=60)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "below the cheapest" in ei.value.details()
    with pytest.raises(grpc.RpcError) as ei:
        stub.RouteBatch(pb.RouteBatchRequest(items=[items[0], pb.BatchItem()]), timeout=60)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items[1]" in ei.value.details()
    # One at a time: the window's lambda is reported with every decision.
    knobs = pb.RoutingKnobs(budget_per_request=budget, budget_key="grpc-window-test")
    picks = [stub.Route(pb.RouteRequest(prompt=p, knobs=knobs), timeout=30) for p in prompts * 2]
    assert all(r.cost_weight >= 0 for r in picks) and {r.backend for r in picks} <= {DENSE, PRUNED}


def test_feedback_round_trip(stub):
    r = stub.Route(pb.RouteRequest(prompt="Spell the word cat backwards."), timeout=30)
    before = {b.name: b.outcomes for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}
    fb = stub.Feedback(pb.FeedbackRequest(decision_id=r.decision_id, score=1.0), timeout=30)
    assert fb.backend == r.backend and fb.record_id and fb.metadata.request_id
    after = {b.name: b.outcomes for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}
    assert after[r.backend] == before[r.backend] + 1


def test_list_backends(stub):
    resp = stub.ListBackends(pb.ListBackendsRequest(), timeout=30)
    by = {b.name: b for b in resp.backends}
    assert set(by) == {DENSE, PRUNED}
    for b in by.values():
        assert b.status == pb.BACKEND_STATUS_READY and b.kind == "transformers" and b.cost_model.kind == "compute"
        assert b.outcomes >= 340 and b.description
    assert by[PRUNED].cost_model.active_parameters < by[DENSE].cost_model.active_parameters


@pytest.fixture
def hooked(live_server):
    backends = live_server.app.service.backends
    yield backends
    for b in backends.values():
        b.step_hook = None


def test_deadline_is_honoured_and_generation_stops(stub, live_server, hooked):
    steps: list[int] = []
    hooked[DENSE].step_hook = steps.append        # the decode loop's step index, every token
    got, _ = _code(lambda: _generate(stub, prompt="Write a very long story about a dragon.",
                                     knobs=pb.RoutingKnobs(allowed_backends=[DENSE]),
                                     params=pb.GenerationParams(max_tokens=600), timeout=3.0))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    # The cancelled request leaves the batch at its next step (bounded wait, then the check below).
    for _ in range(100):
        if hooked[DENSE].queue_stats().running == 0:
            break
        time.sleep(0.05)
    assert hooked[DENSE].queue_stats().running == 0
    chunks = _generate(stub, prompt="Say hi.", knobs=pb.RoutingKnobs(allowed_backends=[DENSE]),
                       params=pb.GenerationParams(max_tokens=3), timeout=120)
    assert chunks[-1].HasField("end")
    second = max(i for i, s in enumerate(steps) if s == 0)    # where the short request's steps begin
    # The long request decoded for about its 3 s (~10-20 tokens/s here), not towards its 600 tokens.
    assert 0 < second and max(steps[:second]) < 200 and steps[second:] == list(range(len(steps) - second))
    assert _health(live_server.address) == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def tight(hooked):
    """The dense backend with room for one running and one waiting request."""
    sched = hooked[DENSE]._scheduler
    saved = sched.max_batch, sched.max_queue
    sched.max_batch, sched.max_queue = 1, 1
    yield hooked[DENSE]
    sched.max_batch, sched.max_queue = saved


def _until(cond, what):
    for _ in range(200):                          # at most 10 s
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _background(stub, req, timeout):
    """Start a Generate in a thread; its outcome lands in the returned dict ("call" cancels it)."""
    import threading

    out: dict = {"call": stub.Generate(req, timeout=timeout)}

    def go():
        try:
            out["chunks"] = list(out["call"])
        except grpc.RpcError as e:
            out["code"] = e.code()
    t = threading.Thread(target=go, daemon=True)
    t.start()
    out["thread"] = t
    return out


def test_a_full_queue_answers_resource_exhausted_at_once_with_a_retry_hint(stub, tight):
    long = pb.GenerateRequest(prompt="Write a very long story about a dragon.", params=pb.GenerationParams(
        max_tokens=400), knobs=pb.RoutingKnobs(allowed_backends=[DENSE]))
    first = _background(stub, long, 60)
    _until(lambda: tight.queue_stats().running == 1, "the first request to run")
    second = _background(stub, long, 60)
    _until(lambda: tight.queue_stats().waiting == 1, "the second request to wait")
    t = time.perf_counter()
    with pytest.raises(grpc.RpcError) as ei:
        _generate(stub, prompt="Hi", knobs=pb.RoutingKnobs(allowed_backends=[DENSE]), timeout=30)
    took = time.perf_counter() - t
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "saturated" in ei.value.details()
    assert took < 1.0                             # refused, not queued (routing included)
    hint = dict(ei.value.trailing_metadata())["retry-after-ms"]
    assert int(hint) > 0
    # With max_queue_ms the same request goes to the next-best backend instead, listed as excluded.
    chunks = _generate(stub, prompt="Hi", params=pb.GenerationParams(max_tokens=4),
                       knobs=pb.RoutingKnobs(max_queue_ms=50), timeout=60)
    assert chunks[0].start.backend == PRUNED
    assert any(e.backend == DENSE and "saturated" in e.reason for e in chunks[0].start.excluded)
    info = {b.name: b for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=10).backends}
    assert info[DENSE].queue.running == 1 and info[DENSE].queue.waiting == 1 and info[DENSE].queue.max_queue == 1
    assert info[DENSE].queue.expected_wait_ms > 50
    for r in (first, second):                     # callers that leave free their slots
        r["call"].cancel()
        r["thread"].join(30)
        assert r.get("code") == grpc.StatusCode.CANCELLED
    _until(lambda: tight.queue_stats().running == 0 and tight.queue_stats().waiting == 0, "the queue to empty")


def test_a_request_whose_deadline_passes_in_the_queue_never_starts(stub, tight):
    steps: list[int] = []
    tight.step_hook = steps.append
    long = pb.GenerateRequest(prompt="Write a very long story about a dragon.", params=pb.GenerationParams(
        max_tokens=60, temperature=0.0), knobs=pb.RoutingKnobs(allowed_backends=[DENSE]))
    first = _background(stub, long, 60)
    _until(lambda: tight.queue_stats().running == 1, "the first request to run")
    queued = _background(stub, pb.GenerateRequest(prompt="Say hi.", knobs=pb.RoutingKnobs(allowed_backends=[DENSE])),
                         0.5)
    queued["thread"].join(30)
    assert queued["code"] == grpc.StatusCode.DEADLINE_EXCEEDED
    first["thread"].join(60)
    assert first["chunks"][-1].HasField("end")
    _until(lambda: tight.queue_stats().waiting == 0, "the queue to empty")
    assert steps == list(range(len(steps)))       # only the first request ever decoded


def test_fallback_when_the_chosen_backend_fails_before_streaming(stub, hooked):
    prompt = "What is the capital of France?"
    ranked = [c.backend for c in stub.Route(pb.RouteRequest(prompt=prompt), timeout=30).candidates]

    def boom(step):
        raise RuntimeError("simulated crash")
    hooked[ranked[0]].step_hook = boom
    chunks = _generate(stub, prompt=prompt, params=pb.GenerationParams(max_tokens=4))
    start = chunks[0].start
    assert [c.backend for c in start.candidates] == ranked
    assert start.backend == ranked[1] and [f.backend for f in start.fallbacks] == [ranked[0]]
    assert "simulated crash" in start.fallbacks[0].error
    assert chunks[-1].HasField("end") and chunks[-1].end.backend == ranked[1]
    assert "".join(c.text for c in chunks)


def test_failure_after_first_token_ends_stream_with_clear_error(stub, hooked):
    def late(step):
        if step == 2:
            raise RuntimeError("simulated crash mid-stream")
    hooked[DENSE].step_hook = late
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for c in stub.Generate(pb.GenerateRequest(prompt="Tell me about the ocean.",
                                                  knobs=pb.RoutingKnobs(allowed_backends=[DENSE]),
                                                  params=pb.GenerationParams(max_tokens=20)), timeout=60):
            got.append(c)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "after streaming began" in ei.value.details() and "simulated crash" in ei.value.details()
    assert got[0].HasField("start") and "".join(c.text for c in got)


def test_a_port_in_use_is_one_clear_start_up_error():
    import socket

    from router.adapters.grpc_server import GrpcServer
    from router.core.config import AppConfig
    from router.core.errors import ConfigError
    from router.serving.app import App

    async def bind_taken_port(port: int) -> None:
        # grpc.aio servers belong to a running loop, as in serve(); outside one the test would
        # depend on whether an earlier test left a default loop behind.
        GrpcServer(app, "127.0.0.1", port)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        app = App(AppConfig())
        try:
            with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*choose another --port"):
                asyncio.run(bind_taken_port(s.getsockname()[1]))
        finally:
            app.compute.shutdown()
