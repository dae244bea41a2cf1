"""What apps expect of a model gateway, over real sockets: capability-aware eligibility (context
window, tools, JSON mode, parameters), OpenAI pass-through (tools, tool_choice, logprobs, top_p,
user, ...) with streamed tool-call deltas, in front of a loopback OpenAI-compatible server that
answers with tool calls, and traces of the request path (collected by the in-memory exporter). The app is caprouter's own (real MiniLM, FAISS, HTTP and gRPC servers);
its two backends are remote ones on that loopback server: "small" declares a local model's
capabilities (a 200-token window, no tools, no JSON mode, only ``user``), "big" takes everything.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class ToolServer:
    """A loopback OpenAI-compatible server: records every request body; with ``tools`` it
    streams one tool call in three fragments (finish_reason tool_calls), else text, with
    logprobs when asked; models in ``failing`` answer 500."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.failing: set[str] = set()

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "small-model"}, {"id": "big-model"}]})

    async def chat(self, request):
        body = await request.json()
        self.seen.append(body)
        if body["model"] in self.failing:
            return web.json_response({"error": {"message": "down"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def chunk(delta, finish=None, logprobs=None):
            c = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        if body.get("tools"):
            await chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                              "function": {"name": "get_weather", "arguments": ""}}]})
            await chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
            await chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "tool_calls")
        else:
            for i, t in enumerate(["Sunny", " in", " Paris"]):
                lp = {"content": [{"token": t, "logprob": -0.5 * i, "bytes": None, "top_logprobs": []}]} \
                    if body.get("logprobs") else None
                await chunk({"content": t}, "stop" if i == 2 else None, lp)
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _gateway(tmp_path_factory, models_dir, **overrides):
    from router.adapters.http_server import HttpServer
    from tests.conftest import LiveServer, default_config
    from tests.fakes import serve_openai

    remote = ToolServer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    runner, url = asyncio.run_coroutine_threadsafe(serve_openai(remote), loop).result(30)
    price = {"kind": "per_token", "input_per_million_tokens": 1.0, "output_per_million_tokens": 1.0}
    backends = [
        {"name": "small", "kind": "openai", "cost": price, "options": {"base_url": url, "model": "small-model",
                                                                       "retries": 0, "recheck_s": 0.2},
         "capabilities": {"context_window": 200, "tools": False, "json_mode": False, "params": ["user"]}},
        {"name": "big", "kind": "openai", "cost": {**price, "output_per_million_tokens": 50.0},
         "options": {"base_url": url, "model": "big-model", "retries": 0, "recheck_s": 0.2}},
    ]
    tmp = tmp_path_factory.mktemp("gateway")
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    srv = LiveServer(default_config(tmp, models_dir, backends=backends, **{"routing.cost_unit": "USD",
                                                                         "tracing.enabled": True, **overrides}),
                     tracer_provider=provider)
    srv.call(srv.server.load_and_serve())
    http = HttpServer(srv.app, "127.0.0.1", 0, metrics=srv.app.telemetry)
    srv.call(http.start())
    yield {"remote": remote, "http": http.address, "grpc": srv.address, "app": srv.app, "spans": spans}
    srv.call(http.stop())
    srv.stop()
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, models_dir):
    yield from _gateway(tmp_path_factory, models_dir)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, models_dir):
    """The same gateway with the answer cache on, semantic hits at cosine 0.9."""
    yield from _gateway(tmp_path_factory, models_dir, **{"cache.enabled": True, "cache.semantic": True,
                                                         "cache.semantic_threshold": 0.9})


@pytest.fixture(scope="module")
def client(gateway):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://{gateway['http']}/v1", api_key="unused", max_retries=0, timeout=60)


def _excluded(resp) -> dict[str, str]:
    extra = resp.model_extra["caprouter"] if hasattr(resp, "model_extra") else resp["caprouter"]
    return {e["backend"]: e["reason"] for e in extra.get("excluded", [])}


def test_a_plain_request_may_go_to_the_small_backend(gateway, client):
    # Cost first: the small backend is 50x cheaper per output token, and nothing rules it out.
    r = client.chat.completions.create(model="caprouter", messages=ASK, max_tokens=8,
                                       extra_headers={"x-caprouter-cost-weight": "1000"})
    assert r.model == "small" and r.choices[0].message.content == "Sunny in Paris"
    assert gateway["remote"].seen[-1]["model"] == "small-model" and "tools" not in gateway["remote"].seen[-1]


def test_tools_route_past_a_backend_without_them_and_stream_tool_call_deltas(gateway, client):
    remote = gateway["remote"]
    stream = client.chat.completions.create(model="caprouter", messages=ASK, max_tokens=32, tools=TOOLS,
                                            tool_choice="auto", parallel_tool_calls=False, user="app-user-7",
                                            stream=True, extra_headers={"x-caprouter-cost-weight": "1000"})
    chunks = list(stream)
    info = chunks[0].model_extra["caprouter"]
    assert info["backend"] == "big"
    assert {e["backend"]: e["reason"] for e in info["excluded"]}["small"].startswith("ineligible: no tool calling")
    sent = remote.seen[-1]
    assert sent["model"] == "big-model" and sent["tools"] == TOOLS and sent["tool_choice"] == "auto"
    assert sent["parallel_tool_calls"] is False and sent["user"] == "app-user-7"
    frags = [tc for c in chunks for ch in c.choices for tc in (ch.delta.tool_calls or [])]
    assert [f.function.arguments for f in frags] == ["", '{"city": ', '"Paris"}']
    assert frags[0].id == "call_1" and frags[0].function.name == "get_weather"
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]


def test_a_whole_answer_merges_the_tool_call_and_the_decision_says_why_small_was_excluded(gateway, client):
    r = client.chat.completions.create(model="caprouter", messages=ASK, max_tokens=32, tools=TOOLS,
                                       extra_headers={"x-caprouter-cost-weight": "1000"})
    call = r.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("call_1", "get_weather",
                                                                                  {"city": "Paris"})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert r.model == "big"
    # The app sends the tool's result back: tool messages need tool calling too.
    follow = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    r2 = client.chat.completions.create(model="caprouter", messages=follow, max_tokens=16,
                                        extra_headers={"x-caprouter-cost-weight": "1000"})
    assert r2.model == "big"
    sent = gateway["remote"].seen[-1]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2] == follow[2]     # passed untouched


def _post(gateway, body, headers=None):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{gateway['http']}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CHEAP = {"x-caprouter-cost-weight": "1000"}


@pytest.mark.parametrize(("extra", "why"), [
    ({"messages": [{"role": "user", "content": "Summarize: " + "lorem ipsum dolor sit amet " * 60}]},
     "context window 200 tokens < "),
    ({"max_tokens": 400}, "context window 200 tokens < "),
    ({"response_format": {"type": "json_object"}}, "no JSON mode"),
    ({"logprobs": True, "top_logprobs": 2, "top_p": 0.9}, "does not take logprobs, top_logprobs, top_p"),
])
def test_what_a_request_needs_excludes_the_small_backend_with_the_reason(gateway, extra, why):
    body = {"model": "caprouter", "messages": ASK, "max_tokens": 8, **extra}
    status, r = _post(gateway, body, CHEAP)
    assert status == 200, r
    assert r["model"] == "big" and why in _excluded(r)["small"] and _excluded(r)["small"].startswith("ineligible: ")
    sent = gateway["remote"].seen[-1]
    assert sent["model"] == "big-model"
    for k, v in extra.items():
        if k not in ("messages", "max_tokens"):
            assert sent[k] == v                     # passed through verbatim
    if extra.get("logprobs"):
        assert [t["token"] for t in r["choices"][0]["logprobs"]["content"]] == ["Sunny", " in", " Paris"]


def test_a_request_only_backends_without_the_capability_may_serve_is_a_400_naming_it(gateway):
    status, r = _post(gateway, {"model": "small", "messages": ASK, "tools": TOOLS, "top_p": 0.5})
    assert status == 400, r
    msg = r["error"]["message"]
    assert "small: no tool calling" in msg and "does not take top_p" in msg
    status, r = _post(gateway, {"model": "caprouter", "messages": ASK, "tools": "not a list"})
    assert status == 400 and "tools must be a list" in r["error"]["message"]


def test_a_traffic_budget_keeps_the_capability_exclusions(gateway):
    status, r = _post(gateway, {"model": "caprouter", "messages": ASK, "max_tokens": 8, "tools": TOOLS},
                      {"x-caprouter-budget-per-request": "1", "x-caprouter-budget-key": "team-a"})
    assert status == 200 and r["model"] == "big"
    assert _excluded(r)["small"].startswith("ineligible: no tool calling")
    assert [c["backend"] for c in r["caprouter"]["candidates"]] == ["big"]     # no fallback to small


def test_fallback_after_a_failure_stays_among_the_capable_backends(gateway):
    remote = gateway["remote"]
    remote.failing.add("big-model")
    try:
        n = len(remote.seen)
        status, r = _post(gateway, {"model": "caprouter", "messages": ASK, "max_tokens": 8, "tools": TOOLS}, CHEAP)
        assert status == 503, r                     # big failed; small cannot take tools: no fallback there
        assert [b["model"] for b in remote.seen[n:]] == ["big-model"]
        status, r = _post(gateway, {"model": "caprouter", "messages": ASK, "max_tokens": 8, "caprouter": {
            "allowed_backends": ["big", "small"], "cost_weight": 0}})
        assert status == 200 and r["model"] == "small"   # without tools small serves, first or as fallback
    finally:
        remote.failing.clear()
        time.sleep(0.3)                                 # big's recheck_s: routable again


def test_capabilities_are_listed_over_grpc_and_http(gateway):
    import urllib.request

    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc

    with grpc.insecure_channel(gateway["grpc"]) as ch:
        got = {b.name: b.capabilities for b in router_pb2_grpc.RouterStub(ch).ListBackends(pb.ListBackendsRequest()).backends}
    assert (got["small"].context_window, got["small"].tools, list(got["small"].params)) == (200, False, ["user"])
    assert got["big"].tools and got["big"].json_mode and "logprobs" in got["big"].params
    assert got["big"].context_window == 0                      # not declared
    with urllib.request.urlopen(f"http://{gateway['http']}/v1/models", timeout=30) as r:
        models = {m["id"]: m for m in json.loads(r.read())["data"]}
    assert models["small"]["caprouter"]["capabilities"]["context_window"] == 200


def _tree(spans, root):
    """{name: span} of ``root`` and its descendants (names are unique within one request)."""
    out, frontier = {root.name: root}, [root]
    while frontier:
        parent = frontier.pop()
        for s in spans:
            if s.parent is not None and s.parent.span_id == parent.context.span_id:
                out[s.name] = s
                frontier.append(s)
    return out


def test_a_generate_is_traced_from_the_grpc_span_down_to_decode(gateway):
    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc

    gateway["spans"].clear()
    with grpc.insecure_channel(gateway["grpc"]) as ch:
        chunks = list(router_pb2_grpc.RouterStub(ch).Generate(pb.GenerateRequest(
            prompt="What is the weather in Paris?", params=pb.GenerationParams(max_tokens=8)), timeout=60))
    decision_id = chunks[0].start.decision_id
    spans = gateway["spans"].get_finished_spans()
    server = next(s for s in spans if s.name == "/caprouter.v1.Router/Generate")
    tree = _tree(spans, server)
    assert {"caprouter.generate", "caprouter.route", "caprouter.route.queue", "caprouter.route.embed",
            "caprouter.route.predict", "caprouter.route.decide", "caprouter.dispatch", "caprouter.first_token",
            "caprouter.decode"} <= set(tree)
    gen, route, dispatch = tree["caprouter.generate"], tree["caprouter.route"], tree["caprouter.dispatch"]
    assert gen.parent.span_id == server.context.span_id and route.parent.span_id == gen.context.span_id
    assert dispatch.parent.span_id == gen.context.span_id
    assert gen.attributes["caprouter.decision_id"] == route.attributes["caprouter.decision_id"] == decision_id
    assert dispatch.attributes["caprouter.backend"] == chunks[0].start.backend == gen.attributes["caprouter.backend"]
    assert tree["caprouter.decode"].attributes["gen_ai.usage.output_tokens"] == chunks[-1].end.usage.completion_tokens
    assert tree["caprouter.route.embed"].attributes["caprouter.batch_prompts"] >= 1
    for child in ("caprouter.route.embed", "caprouter.route.predict", "caprouter.route.decide"):
        assert route.start_time <= tree[child].start_time <= tree[child].end_time <= route.end_time
    assert tree["caprouter.first_token"].end_time <= tree["caprouter.decode"].start_time + 1


def test_an_http_request_joins_the_callers_trace_and_a_failed_dispatch_is_an_error_span(gateway):
    remote = gateway["remote"]
    gateway["spans"].clear()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    remote.failing.add("small-model")
    try:
        status, r = _post(gateway, {"model": "caprouter", "messages": ASK, "max_tokens": 8},
                          {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", **CHEAP})
    finally:
        remote.failing.clear()
    assert status == 200 and r["model"] == "big" and r["caprouter"]["fallbacks"][0]["backend"] == "small"
    spans = gateway["spans"].get_finished_spans()
    server = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert format(server.context.trace_id, "032x") == trace_id and server.attributes["http.response.status_code"] == 200
    dispatches = sorted((s for s in spans if s.name == "caprouter.dispatch"), key=lambda s: s.start_time)
    assert [d.attributes["caprouter.backend"] for d in dispatches] == ["small", "big"]
    assert not dispatches[0].status.is_ok and dispatches[1].status.is_unset
    assert all(format(s.context.trace_id, "032x") == trace_id for s in spans)


def test_the_answer_cache_serves_repeats_and_paraphrases_and_honours_opt_out(cached):
    remote = cached["remote"]
    ask = {"model": "caprouter", "messages": [{"role": "user", "content": "What is the capital city of France?"}],
           "max_tokens": 8, "temperature": 0}
    n = len(remote.seen)
    status, first = _post(cached, ask, CHEAP)
    assert status == 200 and first["caprouter"]["cache"] is None and len(remote.seen) == n + 1
    status, again = _post(cached, ask, CHEAP)
    assert status == 200 and len(remote.seen) == n + 1                       # not asked again
    assert again["caprouter"]["cache"] == {"hit": "exact", "similarity": 1.0}
    assert again["choices"][0]["message"] == first["choices"][0]["message"] and again["model"] == first["model"]
    assert again["caprouter"]["decision_id"] != first["caprouter"]["decision_id"]   # a decision of its own
    para = {**ask, "messages": [{"role": "user", "content": "What is the capital city of France ?"}]}
    status, near = _post(cached, para, CHEAP)
    assert status == 200 and near["caprouter"]["cache"]["hit"] == "semantic" and len(remote.seen) == n + 1
    assert near["caprouter"]["cache"]["similarity"] >= 0.9
    other = {**ask, "messages": [{"role": "user", "content": "Write a limerick about a cat."}]}
    assert _post(cached, other, CHEAP)[1]["caprouter"]["cache"] is None and len(remote.seen) == n + 2
    # Opting out, other parameters, sampling without a seed: the backend answers.
    assert _post(cached, ask, {**CHEAP, "x-caprouter-cache": "off"})[1]["caprouter"]["cache"] is None
    assert _post(cached, {**ask, "caprouter": {"cache": False}}, CHEAP)[1]["caprouter"]["cache"] is None
    assert _post(cached, {**ask, "max_tokens": 9}, CHEAP)[1]["caprouter"]["cache"] is None
    assert _post(cached, {**ask, "temperature": 0.7}, CHEAP)[1]["caprouter"]["cache"] is None
    assert _post(cached, {**ask, "temperature": 0.7}, CHEAP)[1]["caprouter"]["cache"] is None
    assert len(remote.seen) == n + 7
    seeded = {**ask, "temperature": 0.7, "seed": 5}
    _post(cached, seeded, CHEAP)
    assert _post(cached, seeded, CHEAP)[1]["caprouter"]["cache"]["hit"] == "exact"      # a seed makes it repeatable
    assert _post(cached, {**seeded, "messages": para["messages"]}, CHEAP)[1]["caprouter"]["cache"] is None   # no
    # semantic hits above temperature 0
    with urllib.request.urlopen(f"http://{cached['http']}/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert 'caprouter_answer_cache_lookups_total{backend="small",result="exact"}' in metrics


def test_a_cached_tool_call_streams_back_whole_over_grpc_and_http(cached):
    import grpc

    from caprouter.v1 import router_pb2 as pb
    from caprouter.v1 import router_pb2_grpc

    remote = cached["remote"]
    body = {"model": "caprouter", "messages": ASK, "max_tokens": 32, "tools": TOOLS, "temperature": 0}
    _post(cached, body, CHEAP)
    n = len(remote.seen)
    status, r = _post(cached, body, CHEAP)
    assert status == 200 and r["caprouter"]["cache"]["hit"] == "exact" and len(remote.seen) == n
    call = r["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    # The agent sends the tool's result back: the routing text (the last user turn) is the same,
    # but the conversation is not, so no semantic hit replays the tool call.
    follow = {**body, "messages": [*ASK, r["choices"][0]["message"],
                                   {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]}
    status, r2 = _post(cached, follow, CHEAP)
    assert status == 200 and r2["caprouter"]["cache"] is None and len(remote.seen) == n + 1
    system = {**body, "messages": [{"role": "system", "content": "Answer in German."}, *ASK]}
    assert _post(cached, system, CHEAP)[1]["caprouter"]["cache"] is None       # another system prompt
    assert _post(cached, {**body, "logprobs": True}, CHEAP)[1]["caprouter"]["cache"] is None
    # gRPC: the same prompt at temperature 0, cached for the backend the router picks.
    req = pb.GenerateRequest(prompt="Name a prime number.", params=pb.GenerationParams(max_tokens=8, temperature=0))
    with grpc.insecure_channel(cached["grpc"]) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        a = list(stub.Generate(req, timeout=60))
        b = list(stub.Generate(req, timeout=60))
        req.params.cache = False
        c = list(stub.Generate(req, timeout=60))
    assert (a[0].start.cache, b[0].start.cache, c[0].start.cache) == ("", "exact", "")
    assert "".join(x.text for x in b) == "".join(x.text for x in a) == "Sunny in Paris"
