"""The OpenAI-compatible HTTP adapter, served beside gRPC by ``caprouter serve --http-port``.

    POST /v1/chat/completions   POST /v1/completions   (streaming as SSE, or not)
    GET  /v1/models             POST /v1/feedback       GET /metrics   GET /healthz

``model: "caprouter"`` (or ``"auto"``) routes; a backend's name forces that backend. Routing
knobs go in an extra body field ``caprouter: {cost_weight, min_quality, max_cost,
allowed_backends, denied_backends, budget_per_request, budget_key}`` or in ``X-Caprouter-*``
headers (the body wins). Every response names the chosen backend, the decision id, and the
predicted quality and cost, in headers and in a ``caprouter`` field (on the first chunk when
streaming). Errors use OpenAI's error body, the status from router.core.errors.HTTP_STATUS.

Thin like the gRPC adapter: parse (``openai_convert``), call RouterService, format; readiness and
the exception ladder from ``router.adapters.guard``; no routing logic here.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace

from backends.base import TextChunk
from router import __version__
from router.adapters import guard
from router.adapters import openai_convert as oa
from router.core.compute import off_loop
from router.core.config import ServerConfig
from router.core.errors import CaprouterError, ConfigError, InvalidArgument
from router.serving.app import App
from router.serving.keys import Caller
from router.serving.service import GenEnd, GenStart, Query, RouterService
from router.serving.telemetry import Telemetry

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
Handler = Callable[["HttpServer", web.Request, Caller], Awaitable[web.StreamResponse]]
Endpoint = Callable[["HttpServer", web.Request], Awaitable[web.StreamResponse]]


def _guard(scope: str | None) -> Callable[[Handler], Endpoint]:
    """The caller is authorized for ``scope`` (None: any valid key) from the Authorization header
    and handed to the handler; errors become OpenAI error bodies."""
    return lambda fn: _guarded(fn, scope)


def _guarded(fn: Handler, scope: str | None) -> Endpoint:
    @functools.wraps(fn)
    async def wrapper(self: HttpServer, request: web.Request) -> web.StreamResponse:
        try:
            return await fn(self, request, guard.authorize(self.app, request.headers.get("Authorization"), scope))
        except (asyncio.CancelledError, web.HTTPException):
            raise
        except Exception as e:
            code, message = guard.failure(e, fn.__name__)
            if isinstance(e, oa.UnsupportedMediaType):
                return oa.error_response(415, message, "invalid_request_error", "unsupported_media_type")
            if isinstance(e, CaprouterError):
                resp = oa.error_for(code, message)
                wait = guard.retry_after_s(e)
                if wait is not None:
                    resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))   # whole seconds (RFC 9110)
                return resp
            return oa.error_response(500, message, "server_error")     # no error code of ours to name
    return wrapper


@web.middleware
async def _openai_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path 404, wrong method 405, body too large 413) in
    OpenAI's error body, like every other error of this endpoint."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        etype = "server_error" if e.status >= 500 else "invalid_request_error"
        message = {404: f"no such endpoint: {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}",
                   413: f"the request body is larger than {MAX_BODY_BYTES} bytes"}.get(e.status, e.reason)
        resp = oa.error_response(e.status, message, etype, e.reason.lower().replace(" ", "_"))
        for h in ("Allow", "Retry-After"):
            if h in e.headers:
                resp.headers[h] = e.headers[h]
        return resp


def _traced(provider: trace.TracerProvider) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A SERVER span per HTTP request, child of the caller's W3C ``traceparent`` when it sends one.

    Written here rather than taken from opentelemetry-instrumentation-aiohttp-server: the registry's
    latest release (0.66b1) pins opentelemetry-instrumentation 0.66b1, which cannot be installed
    beside the gRPC instrumentation (0.66b2) the gRPC server uses."""
    tracer = provider.get_tracer("caprouter.http", __version__)

    @web.middleware
    async def traced(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        with tracer.start_as_current_span(f"{request.method} {route}", context=propagate.extract(request.headers),
                                          kind=trace.SpanKind.SERVER,
                                          attributes={"http.request.method": request.method, "http.route": route,
                                                      "url.path": request.path}) as span:
            resp = await handler(request)
            span.set_attribute("http.response.status_code", resp.status)
            if resp.status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
            return resp
    return traced


def ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP port from the same PEM files as gRPC's (None: plain text)."""
    if not cfg.tls:
        return None
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        if cfg.tls_client_ca:
            ctx.load_verify_locations(cfg.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files: {e}") from None
    return ctx


class HttpServer:
    def __init__(self, app: App, host: str, port: int, *, metrics: Telemetry | None = None,
                 tls: ServerConfig | None = None) -> None:
        """``tls``: where the TLS files come from (default: the app's server config)."""
        self.app = app
        self.tls = tls or app.config.server
        self.host, self.port = host, port
        self.metrics = metrics
        # The trace middleware outermost: its span covers the error middleware's answers too.
        middlewares = [_traced(app.tracer_provider), _openai_errors] if app.config.tracing.enabled else [_openai_errors]
        web_app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
        web_app.add_routes([web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
                            web.get("/v1/models", self.models), web.post("/v1/feedback", self.feedback),
                            web.get("/healthz", self.healthz), web.get("/metrics", self.metrics_text)])
        self._runner = web.AppRunner(web_app, access_log=None)
        self.address = ""

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_context(self.tls))
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise ConfigError(f"cannot serve HTTP on {self.host}:{self.port} ({e.strerror}): choose another "
                              "--http-port") from None
        server: Any = site._server          # asyncio's Server, or uvloop's under Ray Serve
        self.port = server.sockets[0].getsockname()[1]  # the bound port when 0 was asked
        self.address = f"{self.host}:{self.port}"
        log.info("OpenAI-compatible HTTP on http://%s/v1", self.address)

    async def stop(self) -> None:
        await self._runner.cleanup()

    def _svc(self) -> RouterService:
        return guard.ready(self.app)

    # ---- endpoints ------------------------------------------------------------------------------
    @_guard("generate")
    async def chat(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        svc = self._svc()
        body = await oa.json_body(request)
        q = Query(messages=oa.chat_messages(body), knobs=oa.knobs(request, body, set(svc.backends)), caller=caller)
        return await self._generate(request, svc, body, q, chat=True)

    @_guard("generate")
    async def completions(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        svc = self._svc()
        body = await oa.json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument("prompt must be a non-empty string")
        q = Query(prompt=prompt, knobs=oa.knobs(request, body, set(svc.backends)), caller=caller)
        return await self._generate(request, svc, body, q, chat=False)

    async def _generate(self, request: web.Request, svc: RouterService, body: dict[str, Any], q: Query, *,
                        chat: bool) -> web.StreamResponse:
        if request.headers.get("x-caprouter-cache", "").lower() in ("off", "false", "0", "no"):
            body = {**body, "caprouter": {**(body.get("caprouter") or {}), "cache": False}}
        params = oa.gen_params(body, chat=chat)
        stream_mode = bool(body.get("stream"))
        unit = svc.config.routing.cost_unit
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        events = svc.generate(q, params)
        try:
            first = await events.__anext__()          # the decision: routing done, first token produced
            assert isinstance(first, GenStart)
            info = oa.decision_info(first.decision, first, unit)
            cid = ("chatcmpl-" if chat else "cmpl-") + first.decision.decision_id
            if not stream_mode:
                answer = oa.Answer()
                end: GenEnd | None = None
                async for ev in events:
                    if isinstance(ev, TextChunk):
                        answer.add(ev)
                    elif isinstance(ev, GenEnd):
                        end = ev
                assert end is not None
                f = end.finished
                choice: dict[str, Any] = {"index": 0, "finish_reason": oa.FINISH[f.reason],
                                          "logprobs": answer.logprobs()}
                if chat:
                    choice["message"] = answer.message()
                else:
                    choice.update(text=answer.text())
                return web.json_response(
                    {"id": cid, "object": obj, "created": created, "model": end.backend, "choices": [choice],
                     "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                               "total_tokens": f.prompt_tokens + f.completion_tokens},
                     "caprouter": info}, headers=oa.decision_headers(info))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **oa.decision_headers(info)})
            await resp.prepare(request)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            obj_chunk = "chat.completion.chunk" if chat else "text_completion"

            async def send(delta: Any, finish: str | None = None, extra: dict | None = None,
                           logprobs: Any = None) -> None:
                c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
                if chat:
                    c["delta"] = delta
                else:
                    c["text"] = delta
                payload = {"id": cid, "object": obj_chunk, "created": created, "model": info["backend"],
                           "choices": [c], **(extra or {})}
                await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

            await send({"role": "assistant", "content": ""} if chat else "", extra={"caprouter": info})
            try:
                async for ev in events:
                    if isinstance(ev, TextChunk):
                        await send(oa.delta(ev) if chat else ev.text, logprobs=ev.logprobs)
                    elif isinstance(ev, GenEnd):
                        f = ev.finished
                        await send({} if chat else "", oa.FINISH[f.reason])
                        if include_usage:
                            usage = {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                                     "total_tokens": f.prompt_tokens + f.completion_tokens}
                            await resp.write(("data: " + json.dumps(
                                {"id": cid, "object": obj_chunk, "created": created, "model": info["backend"],
                                 "choices": [], "usage": usage}) + "\n\n").encode())
            except CaprouterError as e:
                # After the first chunk the status is sent: the stream carries the error and ends.
                await resp.write(oa.stream_error(e.code, str(e)))
            except ConnectionResetError:
                # The client went away; closing the events (finally) stops the generation.
                return resp
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            await events.aclose()

    @_guard(None)
    async def models(self, request: web.Request, caller: Caller) -> web.Response:
        svc = self._svc()
        now = int(time.time())
        data = [{"id": "caprouter", "object": "model", "created": now, "owned_by": "caprouter",
                 "caprouter": {"routed": True}}]
        for v in svc.list_backends():
            data.append({"id": v.name, "object": "model", "created": now, "owned_by": "caprouter",
                         "caprouter": {"kind": v.kind, "status": v.status.value, "detail": v.detail,
                                       "description": v.description, "cost": v.cost_model.summary(),
                                       "capabilities": oa.capabilities(v.capabilities)}})
        return web.json_response({"object": "list", "data": data})

    @_guard("feedback")
    async def feedback(self, request: web.Request, caller: Caller) -> web.Response:
        svc = self._svc()
        body = await oa.json_body(request)
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InvalidArgument("score must be a number in [0, 1]")
        value = oa.number(score, "score")
        assert value is not None
        backend = body.get("backend") or ""
        if not isinstance(backend, str):
            raise InvalidArgument("backend must be a backend's name")
        did = body.get("decision_id", "")
        if not isinstance(did, str) or not did:
            raise InvalidArgument("decision_id is required (from a response's caprouter.decision_id)")
        did = did.removeprefix("chatcmpl-").removeprefix("cmpl-")
        res = await off_loop(svc.feedback, did, value, backend=backend, caller=caller)
        return web.json_response({"object": "feedback", "record_id": res.record_id, "backend": res.backend})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.app.ready else "loading", "detail": self.app.loading_detail},
                                 status=200 if self.app.ready else 503)

    @_guard("metrics")
    async def metrics_text(self, request: web.Request, caller: Caller) -> web.StreamResponse:
        """Prometheus text; with API keys on, scrapers send a key with the (read-only) metrics scope."""
        if self.metrics is None:
            return oa.error_response(404, "metrics are not enabled", "invalid_request_error")
        body, ctype = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": ctype})
