"""The OpenAI-compatible HTTP adapter, served beside gRPC by ``caprouter serve --http-port``.

    POST /v1/chat/completions   POST /v1/completions   (streaming as SSE, or not)
    GET  /v1/models             POST /v1/feedback       GET /metrics   GET /healthz

``model: "caprouter"`` (or ``"auto"``) routes; a backend's name forces that backend. Routing
knobs go in an extra body field ``caprouter: {cost_weight, min_quality, max_cost,
allowed_backends, denied_backends, budget_per_request, budget_key}`` or in ``X-Caprouter-*``
headers (the body wins). Every response names the chosen backend, the decision id, and the
predicted quality and cost, in headers and in a ``caprouter`` field (on the first chunk when
streaming). Errors use OpenAI's error body, the status from router.errors.HTTP_STATUS.

Thin like the gRPC adapter: parse, call RouterService, format; no routing logic here.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any, Callable

from aiohttp import web

from backends.base import FinishReason, TextChunk
from router.app import App
from router.compute import off_loop
from router.errors import HTTP_STATUS, OPENAI_ERROR_TYPE, CaprouterError, InvalidArgument, NotFound, Unavailable
from router.policy import KnobsInput
from router.service import Decision, GenEnd, GenParams, GenStart, Query

log = logging.getLogger(__name__)

ROUTED_MODELS = ("caprouter", "auto")
_FINISH = {FinishReason.STOP: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length",
           FinishReason.CANCELLED: "stop"}
_HEADER_KNOBS = {"x-caprouter-cost-weight": "cost_weight", "x-caprouter-min-quality": "min_quality",
                 "x-caprouter-max-cost": "max_cost", "x-caprouter-budget-per-request": "budget_per_request"}


def _error(status: int, message: str, etype: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": etype, "param": param, "code": code}},
                             status=status)


def _from_caprouter(e: CaprouterError) -> web.Response:
    return _error(HTTP_STATUS[e.code], str(e), OPENAI_ERROR_TYPE[e.code], e.code.value.lower())


def _guard(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self: "HttpServer", request: web.Request) -> web.StreamResponse:
        try:
            return await fn(self, request)
        except CaprouterError as e:
            return _from_caprouter(e)
        except (asyncio.CancelledError, web.HTTPException):
            raise
        except Exception as e:  # never crash the server on a request
            log.exception("%s failed", fn.__name__)
            return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")
    return wrapper


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def _number(v: Any, name: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise InvalidArgument(f"{name} must be a number")
    try:
        return float(v)
    except ValueError:
        raise InvalidArgument(f"{name} must be a number, got {v!r}") from None


def _names(v: Any, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise InvalidArgument(f"{name} must be a list of backend names")


def knobs_from(request: web.Request, body: dict[str, Any], known: set[str]) -> KnobsInput:
    """Knobs from the X-Caprouter-* headers, overridden by the body's ``caprouter`` field; the
    ``model`` field forces a backend unless it is "caprouter"/"auto"."""
    raw: dict[str, Any] = {k: request.headers[h] for h, k in _HEADER_KNOBS.items() if h in request.headers}
    for h, k in (("x-caprouter-allowed-backends", "allowed_backends"), ("x-caprouter-denied-backends", "denied_backends"),
                 ("x-caprouter-budget-key", "budget_key")):
        if h in request.headers:
            raw[k] = request.headers[h]
    extra = body.get("caprouter") or {}
    if not isinstance(extra, dict):
        raise InvalidArgument("the caprouter field must be an object of routing knobs")
    unknown = set(extra) - {*_HEADER_KNOBS.values(), "allowed_backends", "denied_backends", "budget_key"}
    if unknown:
        raise InvalidArgument(f"unknown routing knob(s): {', '.join(sorted(unknown))}")
    raw.update(extra)
    allowed = _names(raw.get("allowed_backends"), "allowed_backends")
    model = body.get("model") or "caprouter"
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string")
    if model not in ROUTED_MODELS:
        if model not in known:
            raise NotFound(f"model {model!r} does not exist: use 'caprouter' (routed) or one of {', '.join(sorted(known))}")
        allowed = (model,)
    key = raw.get("budget_key") or ""
    if not isinstance(key, str):
        raise InvalidArgument("budget_key must be a string")
    return KnobsInput(cost_weight=_number(raw.get("cost_weight"), "cost_weight"),
                      min_quality=_number(raw.get("min_quality"), "min_quality"),
                      max_cost=_number(raw.get("max_cost"), "max_cost"), allowed=allowed,
                      denied=_names(raw.get("denied_backends"), "denied_backends"),
                      budget=_number(raw.get("budget_per_request"), "budget_per_request"), budget_key=key)


def _content(c: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text ones count."""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    if c is None:
        return ""
    raise InvalidArgument("message content must be a string or a list of content parts")


def _messages(body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidArgument("messages must be a non-empty list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument("each message needs a role and content")
        out.append((m["role"], _content(m.get("content"))))
    return tuple(out)


def _params(body: dict[str, Any]) -> GenParams:
    if body.get("n", 1) != 1:
        raise InvalidArgument("n must be 1")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("stop must be a string or a list of strings")
    for name, v in (("max_tokens", mt), ("seed", body.get("seed"))):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InvalidArgument(f"{name} must be an integer")
    temp = body.get("temperature")
    return GenParams(max_tokens=mt, temperature=None if temp is None else _number(temp, "temperature"),
                     stop=tuple(stop), seed=body.get("seed"))


def _decision_info(d: Decision, ev: GenStart | None, unit: str) -> dict[str, Any]:
    chosen = next((s for s in d.selection.ranked if s.backend == (ev.backend if ev else d.backend)), d.selection.chosen)
    return {"decision_id": d.decision_id, "backend": chosen.backend, "predicted_quality": chosen.quality,
            "predicted_cost": chosen.cost, "cost_unit": unit, "cost_weight": d.selection.cost_weight,
            "candidates": [{"backend": s.backend, "predicted_quality": s.quality, "predicted_cost": s.cost,
                            "utility": s.utility, "rank": s.rank} for s in d.selection.ranked],
            "fallbacks": [{"backend": b, "error": e} for b, e in (ev.fallbacks if ev else ())]}


def _headers(info: dict[str, Any]) -> dict[str, str]:
    return {"x-caprouter-backend": info["backend"], "x-caprouter-decision-id": info["decision_id"],
            "x-caprouter-predicted-quality": f"{info['predicted_quality']:.6f}",
            "x-caprouter-predicted-cost": f"{info['predicted_cost']:.6g}", "x-caprouter-cost-unit": info["cost_unit"]}


class HttpServer:
    def __init__(self, app: App, host: str, port: int, *, metrics: Any = None) -> None:
        self.app = app
        self.host, self.port = host, port
        self.metrics = metrics
        web_app = web.Application(client_max_size=4 << 20)
        web_app.add_routes([web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
                            web.get("/v1/models", self.models), web.post("/v1/feedback", self.feedback),
                            web.get("/healthz", self.healthz), web.get("/metrics", self.metrics_text)])
        self._runner = web.AppRunner(web_app, access_log=None)
        self.address = ""

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port when 0 was asked
        self.address = f"{self.host}:{self.port}"
        log.info("OpenAI-compatible HTTP on http://%s/v1", self.address)

    async def stop(self) -> None:
        await self._runner.cleanup()

    def _svc(self):
        if not self.app.ready:
            raise Unavailable(f"caprouter is starting ({self.app.loading_detail}); retry shortly")
        return self.app.service

    # ---- endpoints ------------------------------------------------------------------------------
    @_guard
    async def chat(self, request: web.Request) -> web.StreamResponse:
        svc = self._svc()
        body = await _json(request)
        q = Query(messages=_messages(body), knobs=knobs_from(request, body, set(svc.backends)))
        return await self._generate(request, svc, body, q, chat=True)

    @_guard
    async def completions(self, request: web.Request) -> web.StreamResponse:
        svc = self._svc()
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidArgument("prompt must be a non-empty string")
        q = Query(prompt=prompt, knobs=knobs_from(request, body, set(svc.backends)))
        return await self._generate(request, svc, body, q, chat=False)

    async def _generate(self, request: web.Request, svc: Any, body: dict, q: Query, *, chat: bool) -> web.StreamResponse:
        params = _params(body)
        stream_mode = bool(body.get("stream"))
        unit = svc.config.routing.cost_unit
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        events = svc.generate(q, params)
        try:
            first = await events.__anext__()          # the decision: routing done, first token produced
            assert isinstance(first, GenStart)
            info = _decision_info(first.decision, first, unit)
            cid = ("chatcmpl-" if chat else "cmpl-") + first.decision.decision_id
            if not stream_mode:
                parts: list[str] = []
                end: GenEnd | None = None
                async for ev in events:
                    if isinstance(ev, TextChunk):
                        parts.append(ev.text)
                    elif isinstance(ev, GenEnd):
                        end = ev
                assert end is not None
                f = end.finished
                choice: dict[str, Any] = {"index": 0, "finish_reason": _FINISH[f.reason]}
                if chat:
                    choice["message"] = {"role": "assistant", "content": "".join(parts)}
                else:
                    choice.update(text="".join(parts), logprobs=None)
                return web.json_response(
                    {"id": cid, "object": obj, "created": created, "model": end.backend, "choices": [choice],
                     "usage": {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                               "total_tokens": f.prompt_tokens + f.completion_tokens},
                     "caprouter": info}, headers=_headers(info))
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **_headers(info)})
            await resp.prepare(request)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            obj_chunk = "chat.completion.chunk" if chat else "text_completion"

            async def send(delta: Any, finish: str | None = None, extra: dict | None = None) -> None:
                c: dict[str, Any] = {"index": 0, "finish_reason": finish}
                if chat:
                    c["delta"] = delta
                else:
                    c.update(text=delta, logprobs=None)
                payload = {"id": cid, "object": obj_chunk, "created": created, "model": info["backend"],
                           "choices": [c], **(extra or {})}
                await resp.write(f"data: {json.dumps(payload)}\n\n".encode())

            await send({"role": "assistant", "content": ""} if chat else "", extra={"caprouter": info})
            try:
                async for ev in events:
                    if isinstance(ev, TextChunk):
                        await send({"content": ev.text} if chat else ev.text)
                    elif isinstance(ev, GenEnd):
                        f = ev.finished
                        await send({} if chat else "", _FINISH[f.reason])
                        if include_usage:
                            usage = {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                                     "total_tokens": f.prompt_tokens + f.completion_tokens}
                            await resp.write(("data: " + json.dumps(
                                {"id": cid, "object": obj_chunk, "created": created, "model": info["backend"],
                                 "choices": [], "usage": usage}) + "\n\n").encode())
            except CaprouterError as e:
                # After the first chunk the status is sent: the stream carries the error and ends.
                err = {"error": {"message": str(e), "type": OPENAI_ERROR_TYPE[e.code], "code": e.code.value.lower()}}
                await resp.write(f"data: {json.dumps(err)}\n\n".encode())
            except ConnectionResetError:
                # The client went away; closing the events (finally) stops the generation.
                return resp
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            await events.aclose()

    @_guard
    async def models(self, request: web.Request) -> web.Response:
        svc = self._svc()
        now = int(time.time())
        data = [{"id": "caprouter", "object": "model", "created": now, "owned_by": "caprouter",
                 "caprouter": {"routed": True}}]
        for v in svc.list_backends():
            data.append({"id": v.name, "object": "model", "created": now, "owned_by": "caprouter",
                         "caprouter": {"kind": v.kind, "status": v.status.value, "detail": v.detail,
                                       "description": v.description, "cost": v.cost_model.summary()}})
        return web.json_response({"object": "list", "data": data})

    @_guard
    async def feedback(self, request: web.Request) -> web.Response:
        svc = self._svc()
        body = await _json(request)
        score = body.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise InvalidArgument("score must be a number in [0, 1]")
        did = body.get("decision_id", "")
        if not isinstance(did, str) or not did:
            raise InvalidArgument("decision_id is required (from a response's caprouter.decision_id)")
        did = did.removeprefix("chatcmpl-").removeprefix("cmpl-")
        res = await off_loop(svc.feedback, did, float(score), backend=body.get("backend") or "")
        return web.json_response({"object": "feedback", "record_id": res.record_id, "backend": res.backend})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.app.ready else "loading", "detail": self.app.loading_detail},
                                 status=200 if self.app.ready else 503)

    async def metrics_text(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return _error(404, "metrics are not enabled", "invalid_request_error")
        body, ctype = self.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": ctype})
