"""The remote OpenAI-compatible backend against real HTTP servers on loopback: a scripted one
(failures, slowness) and caprouter's own OpenAI endpoint with the real SmolLM2 behind it."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from backends.base import Finished, GenerationRequest, Status, TextChunk
from backends.openai_remote import OpenAIBackend
from router.core.config import BackendConfig
from router.core.errors import BackendError, ConfigError
from tests.fakes import openai_server


class Scripted:
    """A loopback OpenAI-compatible server: fails the first ``fail`` calls with 503, waits
    ``delay`` seconds before answering, then streams three chunks and usage."""

    def __init__(self, fail: int = 0, delay: float = 0.0) -> None:
        self.fail, self.delay, self.calls, self.seen = fail, delay, 0, []

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    async def chat(self, request):
        self.calls += 1
        self.seen.append((await request.json(), request.headers.get("Authorization")))
        if self.calls <= self.fail:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        await asyncio.sleep(self.delay)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, t in enumerate(["Hello", " from", " remote"]):
            c = {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": "stop" if i == 2 else None}]}
            await resp.write(f"data: {json.dumps(c)}\n\n".encode())
        await resp.write(b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _backend(url: str, **opts) -> OpenAIBackend:
    return OpenAIBackend(BackendConfig(name="remote", kind="openai",
                                       cost={"kind": "per_token", "input_per_million_tokens": 0.5,
                                             "output_per_million_tokens": 1.5},
                                       options={"base_url": url, "model": "m", "backoff_s": 0.05, **opts}),
                         cost_unit="USD")


async def _collect(b, **kw):
    text, fin = [], None
    async for ev in b.generate(GenerationRequest(messages=[("user", "hi")], max_tokens=5, **kw)):
        if isinstance(ev, TextChunk):
            text.append(ev.text)
        else:
            fin = ev
    return "".join(text), fin


@pytest.mark.slow  # starts a loopback OpenAI-compatible server
def test_streams_with_the_key_and_retries_with_backoff(monkeypatch):
    monkeypatch.setenv("REMOTE_KEY", "sk-test")

    async def go():
        s = Scripted(fail=2)
        async with openai_server(s) as url:
            b = _backend(url, api_key_env="REMOTE_KEY", retries=2)
            await b.load()
            assert b.status()[0] == Status.READY
            t = time.perf_counter()
            text, fin = await _collect(b, stop=["\n"], seed=3)
            await b.close()
            return s, text, fin, time.perf_counter() - t, b

    s, text, fin, dt, b = asyncio.run(go())
    assert text == "Hello from remote" and isinstance(fin, Finished)
    assert (fin.prompt_tokens, fin.completion_tokens, fin.reason.value) == (7, 3, "stop")
    assert s.calls == 3 and dt >= 0.05 * 0.5 + 0.1 * 0.5          # two jittered backoffs
    body, auth = s.seen[-1]
    assert auth == "Bearer sk-test" and body["model"] == "m" and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["stop"] == ["\n"] and body["seed"] == 3
    assert b.cost_model().kind == "per_token"


@pytest.mark.slow  # starts a loopback OpenAI-compatible server
def test_gives_up_after_the_retries_and_reports_unavailable():
    async def go():
        s = Scripted(fail=10)
        async with openai_server(s) as url:
            b = _backend(url, retries=1)
            await b.load()
            with pytest.raises(BackendError, match="HTTP 503"):
                await _collect(b)
            await b.close()
            return s, b

    s, b = asyncio.run(go())
    assert s.calls == 2 and b.status()[0] == Status.UNAVAILABLE


@pytest.mark.slow  # starts a loopback OpenAI-compatible server
def test_first_token_timeout_and_unreachable_endpoint():
    async def go():
        s = Scripted(delay=3.0)
        async with openai_server(s) as url:
            b = _backend(url, retries=0, first_token_timeout_s=0.5)
            # The server answers after 3 s; the timeout fires first (else the tokens would arrive).
            with pytest.raises(BackendError, match="Timeout"):
                await _collect(b)
            await b.close()
        dead = _backend("http://127.0.0.1:9/v1", retries=0, connect_timeout_s=0.5)
        await dead.load()
        await dead.close()
        return dead

    dead = asyncio.run(go())
    assert dead.status()[0] == Status.UNAVAILABLE and "unreachable" in dead.status()[1]


def test_a_missing_key_variable_is_a_config_error(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        _backend("http://127.0.0.1:1/v1", api_key_env="NO_SUCH_KEY")


@pytest.mark.slow
def test_against_a_real_openai_compatible_server_with_a_real_model(live_server):
    """caprouter's own OpenAI endpoint (SmolLM2 behind it) as the remote server."""
    from router.adapters.http_server import HttpServer

    http = HttpServer(live_server.app, "127.0.0.1", 0)
    live_server.call(http.start())
    try:
        b = _backend(f"http://{http.address}/v1", model="smollm2-135m")

        async def go():
            await b.load()
            out = []
            async for ev in b.generate(GenerationRequest(messages=[("user", "What is the capital of France?")],
                                                         max_tokens=12)):
                out.append(ev)
            await b.close()
            return out

        evs = asyncio.run(go())
        text = "".join(e.text for e in evs if isinstance(e, TextChunk))
        assert "Paris" in text and len([e for e in evs if isinstance(e, TextChunk)]) > 1
        assert evs[-1].completion_tokens >= 1 and evs[-1].prompt_tokens > 5
    finally:
        live_server.call(http.stop())


@pytest.mark.slow  # starts a loopback OpenAI-compatible server
def test_a_failed_backend_is_tried_again_after_recheck_s_and_a_success_brings_it_back():
    async def go():
        s = Scripted(fail=1)
        async with openai_server(s) as url:
            b = _backend(url, retries=0, recheck_s=0.3)
            await b.load()
            with pytest.raises(BackendError):
                await _collect(b)
            assert b.status()[0] == Status.UNAVAILABLE and "last call failed" in b.status()[1]
            await asyncio.sleep(0.35)
            st, detail = b.status()
            assert st == Status.READY and detail.startswith("trying again after")   # half-open
            s.delay = 0.3
            trial = asyncio.ensure_future(_collect(b))          # one request tries it again ...
            await asyncio.sleep(0.1)
            with pytest.raises(BackendError, match="being tried again"):
                await _collect(b)                               # ... the others fall back at once
            text, fin = await trial
            assert text == "Hello from remote" and b.status() == (Status.READY, f"m at {url}")
            s.delay = 0.0
            text, fin = await _collect(b)
            assert text == "Hello from remote" and b.status() == (Status.READY, f"m at {url}")
            await b.close()
    asyncio.run(go())
