"""A remote OpenAI-compatible endpoint as a backend (vLLM, TGI, Ollama, llama.cpp server, a
hosted API): ``kind: openai``.

    - name: llama-70b
      kind: openai
      cost: {kind: per_token, input_per_million_tokens: 0.6, output_per_million_tokens: 0.8}
      options: {base_url: "http://gpu-box:8000/v1", model: meta-llama/Llama-3.1-70B-Instruct,
                api_key_env: LLAMA_API_KEY, timeout_s: 60, retries: 2}

Streams ``/chat/completions`` (SSE). Connection failures, 429 and 5xx are retried with
exponential backoff while nothing has been streamed; after the first token a failure ends the
request (the router reports it, as for any backend). Every call has a connect timeout, a
first-token timeout and a per-chunk timeout, so nothing hangs. A backend whose calls failed (or
whose probe did) is left out of routing for ``recheck_s``; then one request at a time tries it again
(a circuit breaker's half-open state: the others fail over at once) until one succeeds.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import BACKENDS, Backend, Capabilities, Finished, FinishReason, GenerationRequest, Status, TextChunk
from router.core.config import BackendConfig
from router.core.costs import CostModel
from router.core.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "tool_calls": FinishReason.TOOL_CALLS,
           "function_call": FinishReason.TOOL_CALLS}


class OpenAIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_url: str = Field(pattern=r"^https?://")
    model: str
    # Name of the environment variable holding the API key (never the key itself); None: no key.
    api_key_env: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    # Until the first token (queueing and prefill on the remote side), and between two chunks.
    first_token_timeout_s: float = Field(60.0, gt=0)
    chunk_timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0, le=10)
    backoff_s: float = Field(0.5, ge=0)
    # Probe GET {base_url}/models at start-up to report status.
    probe: bool = True
    # After a failed call (or probe) the backend is left out of routing for this long; then the
    # next request may try it again (a circuit breaker's half-open state): a success brings it
    # back, a failure starts the wait again. Without it, one failure left it out until a restart.
    recheck_s: float = Field(10.0, ge=0)


class _Retryable(Exception):
    pass


@BACKENDS.register("openai")
class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, cfg: BackendConfig, *, cost_unit: str, models_dir: Any = None, compute: Any = None,
                 encoder: Any = None) -> None:
        try:
            self.opts = OpenAIOptions.model_validate(cfg.options)
        except ValidationError as e:
            raise ConfigError(f"backend {cfg.name!r}: invalid options:\n{e}") from None
        if self.opts.api_key_env and not os.environ.get(self.opts.api_key_env):
            raise ConfigError(f"backend {cfg.name!r}: environment variable {self.opts.api_key_env} (its API key) is not set")
        self.name = cfg.name
        self.capabilities_config = cfg.capabilities
        self.description = cfg.description or f"{self.opts.model} at {self.opts.base_url}"
        self._cost = CostModel.from_config(cfg.cost, cost_unit)
        self._status = (Status.LOADING, "not probed yet")
        self._down_since: float | None = None     # time.monotonic() of the failure that took it out
        self._trial = False                       # a request is trying it again (half-open)
        self._session: Any = None

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.opts.api_key_env:
            h["Authorization"] = f"Bearer {os.environ[self.opts.api_key_env]}"
        return h

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, connect=self.opts.connect_timeout_s, sock_connect=self.opts.connect_timeout_s))
        return self._session

    async def load(self) -> None:
        if not self.opts.probe:
            self._status = (Status.READY, f"{self.opts.model} at {self.opts.base_url} (not probed)")
            return
        try:
            async with self._client().get(self.opts.base_url.rstrip("/") + "/models", headers=self._headers(),
                                          timeout=_timeout(self.opts.connect_timeout_s * 2)) as r:
                if r.status >= 400:
                    raise RuntimeError(f"HTTP {r.status}")
            self._up()
        except Exception as e:  # reported, not fatal: the endpoint may come up later
            self._down(f"{self.opts.base_url} unreachable: {type(e).__name__}: {e}")

    def status(self) -> tuple[Status, str]:
        st, detail = self._status
        if st == Status.UNAVAILABLE and self._down_since is not None:
            down = time.monotonic() - self._down_since
            if down >= self.opts.recheck_s:
                return Status.READY, f"trying again after {down:.0f} s out ({detail})"
        return self._status

    def _down(self, detail: str) -> None:
        self._status = (Status.UNAVAILABLE, detail)
        self._down_since = time.monotonic()
        self._trial = False

    def _up(self) -> None:
        self._status = (Status.READY, f"{self.opts.model} at {self.opts.base_url}")
        self._down_since = None
        self._trial = False

    def _admit_trial(self) -> None:
        """While it is out, one request at a time tries it (half-open); the others fail at once,
        so the router falls back without each paying the connect timeout and the retries."""
        if self._down_since is None:
            return
        if self._trial:
            raise BackendError(self.name, f"being tried again after a failure ({self._status[1]}); not this request")
        self._trial = True

    def cost_model(self) -> CostModel:
        return self._cost

    def known_capabilities(self) -> Capabilities:
        """An OpenAI-compatible server takes every OpenAI parameter; whether the model behind
        it does tools or JSON mode, and its window, only the config can say (``capabilities``):
        by default tools and JSON mode are assumed, the window undeclared."""
        return Capabilities(tools=True, json_mode=True, params=Capabilities.ALL_PARAMS)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TextChunk | Finished]:
        messages = ([dict(m) for m in request.raw_messages] if request.raw_messages is not None
                    else [{"role": r, "content": c} for r, c in request.messages])
        # The app's OpenAI parameters first: the ones caprouter owns (model, streaming, limits)
        # are its own.
        body: dict[str, Any] = {**request.extra, "model": self.opts.model, "stream": True,
                                "max_tokens": request.max_tokens, "temperature": request.temperature,
                                "messages": messages, "stream_options": {"include_usage": True}}
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        self._admit_trial()
        try:
            async for ev in self._attempts(body):
                yield ev
        finally:
            self._trial = False         # a trial that ended otherwise (cancelled, a 4xx) lets the next one try

    async def _attempts(self, body: dict[str, Any]) -> AsyncGenerator[TextChunk | Finished]:
        delay = self.opts.backoff_s
        for attempt in range(self.opts.retries + 1):
            streamed = 0
            try:
                async for ev in self._stream(body):
                    if isinstance(ev, TextChunk):
                        streamed += 1
                    yield ev
                self._up()
                return
            except _Retryable as e:
                if streamed or attempt == self.opts.retries:
                    self._down(f"last call failed: {e}")
                    raise BackendError(self.name, str(e), tokens_streamed=streamed) from None
                log.warning("backend %s: %s; retrying in %.2fs (%d/%d)", self.name, e, delay, attempt + 1,
                            self.opts.retries)
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay *= 2

    async def _stream(self, body: dict[str, Any]) -> AsyncGenerator[TextChunk | Finished]:
        import aiohttp

        url = self.opts.base_url.rstrip("/") + "/chat/completions"
        try:
            async with self._client().post(url, json=body, headers=self._headers(),
                                           timeout=_timeout(None, self.opts.first_token_timeout_s)) as r:
                if r.status == 429 or r.status >= 500:
                    raise _Retryable(f"HTTP {r.status}: {(await r.text())[:200]}")
                if r.status >= 400:
                    raise BackendError(self.name, f"HTTP {r.status}: {(await r.text())[:300]}")
                finish, usage, n_chunks = FinishReason.STOP, None, 0
                first = True
                while True:
                    wait = self.opts.first_token_timeout_s if first else self.opts.chunk_timeout_s
                    line = await asyncio.wait_for(r.content.readline(), wait)
                    if not line:
                        break
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        raise BackendError(self.name, f"remote error: {msg['error']}", tokens_streamed=n_chunks)
                    usage = msg.get("usage") or usage
                    for ch in msg.get("choices") or []:
                        delta = ch.get("delta") or {}
                        text = delta.get("content") or ""
                        calls = tuple(delta.get("tool_calls") or ())
                        if text or calls:
                            first = False
                            n_chunks += 1
                            yield TextChunk(text, tool_calls=calls, logprobs=ch.get("logprobs"))
                        if ch.get("finish_reason"):
                            finish = _FINISH.get(ch["finish_reason"], FinishReason.STOP)
                usage = usage or {}
                yield Finished(finish, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", n_chunks)),
                               0.0)
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None


def _timeout(total: float | None, read: float | None = None):
    import aiohttp

    return aiohttp.ClientTimeout(total=total, sock_read=read)
