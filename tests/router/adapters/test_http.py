"""The OpenAI-compatible HTTP endpoint, called by the official ``openai`` package, and /metrics."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow

DENSE = "smollm2-135m"


@pytest.fixture(scope="module")
def http(live_server):
    from router.adapters.http_server import HttpServer

    srv = HttpServer(live_server.app, "127.0.0.1", 0, metrics=live_server.app.telemetry)
    live_server.call(srv.start())
    yield srv
    live_server.call(srv.stop())


@pytest.fixture(scope="module")
def client(http):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://{http.address}/v1", api_key="unused", max_retries=0, timeout=120)


def _post(http, path, body, headers=None):
    req = urllib.request.Request(f"http://{http.address}{path}", data=body if isinstance(body, bytes) else
                                 json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_completion_is_routed_and_says_where_it_went(client):
    raw = client.chat.completions.with_raw_response.create(
        model="caprouter", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    resp = raw.parse()
    info = resp.model_extra["caprouter"]
    assert resp.choices[0].message.content.strip() and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.model == info["backend"] == raw.headers["x-caprouter-backend"]
    assert raw.headers["x-caprouter-decision-id"] == info["decision_id"] and resp.id.endswith(info["decision_id"])
    assert 0 <= info["predicted_quality"] <= 1 and info["predicted_cost"] > 0 and info["cost_unit"] == "GFLOP"
    assert float(raw.headers["x-caprouter-predicted-quality"]) == pytest.approx(info["predicted_quality"], abs=1e-6)
    assert {c["backend"] for c in info["candidates"]} == {DENSE, "smollm2-135m-mlp75"}
    assert 1 <= resp.usage.completion_tokens <= 8 and resp.usage.total_tokens > resp.usage.completion_tokens


def test_streaming_chat_with_a_forced_model_and_knobs(client):
    stream = client.chat.completions.create(
        model=DENSE, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
        max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].model_extra["caprouter"]["backend"] == DENSE and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    # knobs in the body and in headers
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"caprouter": {"denied_backends": [DENSE], "cost_weight": 0.5}})
    assert r.model == "smollm2-135m-mlp75" and r.model_extra["caprouter"]["cost_weight"] == 0.5
    r = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_headers={"X-Caprouter-Denied-Backends": DENSE,
                                                      "X-Caprouter-Cost-Weight": "0.25"})
    assert r.model == "smollm2-135m-mlp75" and r.model_extra["caprouter"]["cost_weight"] == 0.25


def test_text_completions_stream_and_not(client):
    r = client.completions.create(model="caprouter", prompt="Name a colour.", max_tokens=6)
    assert r.choices[0].text.strip() and r.model_extra["caprouter"]["decision_id"]
    parts = list(client.completions.create(model="caprouter", prompt="Name a colour.", max_tokens=6, stream=True))
    assert "".join(p.choices[0].text for p in parts).strip()


def test_models_and_feedback(client, http):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "caprouter" and DENSE in ids
    r = client.chat.completions.create(model="caprouter", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    status, body = _post(http, "/v1/feedback", {"decision_id": r.id, "score": 1.0})
    assert status == 200 and body["backend"] == r.model and body["record_id"]
    status, body = _post(http, "/v1/feedback", {"decision_id": "nope", "score": 1.0})
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.mark.parametrize("body,status,part", [
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "caprouter", "messages": []}, 400, "non-empty"),
    ({"model": "caprouter", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n must be 1"),
    ({"model": "caprouter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "caprouter", "messages": [{"role": "user", "content": "hi"}], "caprouter": {"speed": 1}}, 400, "unknown routing knob"),
    ({"model": "caprouter", "messages": [{"role": "user", "content": "hi"}], "caprouter": {"min_quality": 1.0,
                                                                                           "max_cost": 0.0}}, 409, "no backend satisfies"),
])
def test_errors_use_openai_format_and_status(http, body, status, part):
    got, err = _post(http, "/v1/chat/completions", body)
    assert got == status and part in err["error"]["message"] and err["error"]["type"]


def test_openai_client_raises_its_own_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="caprouter", messages=[{"role": "user", "content": "hi"}], n=3)


def test_bad_json_and_metrics(http):
    status, err = _post(http, "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    with urllib.request.urlopen(f"http://{http.address}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'caprouter_requests_total{backend="' in text and 'rpc="Generate"' in text and 'status="ok"' in text
    assert "caprouter_routing_seconds_count" in text and "caprouter_generated_tokens_total" in text
    ds = [line for line in text.splitlines() if line.startswith("caprouter_datastore_records ")]
    assert ds and float(ds[0].split()[1]) > 0
    assert f'caprouter_queue_running{{backend="{DENSE}"}}' in text and "caprouter_queue_expected_wait_seconds" in text
    assert "caprouter_routing_pending " in text
    with urllib.request.urlopen(f"http://{http.address}/healthz", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


def test_a_full_queue_is_429_with_retry_after(http, live_server):
    import threading
    import time

    dense = live_server.app.service.backends[DENSE]
    sched = dense._scheduler
    saved = sched.max_batch, sched.max_queue
    sched.max_batch, sched.max_queue = 1, 0
    body = {"model": DENSE, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 120}
    busy = threading.Thread(target=_post, args=(http, "/v1/chat/completions", body), daemon=True)
    try:
        busy.start()
        for _ in range(200):
            if dense.queue_stats().running == 1:
                break
            time.sleep(0.05)
        req = urllib.request.Request(f"http://{http.address}/v1/chat/completions", data=json.dumps(
            {**body, "max_tokens": 4}).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=30)
        err = json.loads(ei.value.read())
        assert ei.value.code == 429 and int(ei.value.headers["Retry-After"]) >= 1
        assert err["error"]["type"] == "rate_limit_error" and "saturated" in err["error"]["message"]
    finally:
        sched.max_batch = 8                                  # let the long one finish quickly
        busy.join(120)
        sched.max_batch, sched.max_queue = saved


def test_json_logs_carry_the_decision_id(live_server, caplog):
    import logging

    from router.core.logs import JsonFormatter
    from router.serving.service import Query

    with caplog.at_level(logging.INFO, logger="router.serving.service"):
        d = live_server.app.service.route(Query(prompt="Name a fruit."))
    recs = [r for r in caplog.records if getattr(r, "decision_id", None) == d.decision_id]
    assert recs
    line = json.loads(JsonFormatter().format(recs[0]))
    assert line["decision_id"] == d.decision_id and line["backend"] == d.backend and line["rpc"] == "Route"
