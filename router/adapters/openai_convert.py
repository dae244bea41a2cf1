"""Conversion between the OpenAI-compatible HTTP API and the core's dataclasses: request bodies
and headers in, decisions and OpenAI error bodies out. The only module that knows both sides of
the HTTP adapter (``http_server`` does the serving)."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from backends.base import Capabilities, FinishReason, TextChunk
from router.core.config import PASS_THROUGH
from router.core.errors import HTTP_STATUS, OPENAI_ERROR_TYPE, ErrorCode, InvalidArgument, NotFound
from router.policy.selection import KnobsInput
from router.serving.service import Decision, GenParams, GenStart

ROUTED_MODELS = ("caprouter", "auto")
FINISH = {FinishReason.STOP: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length",
          FinishReason.CANCELLED: "stop", FinishReason.TOOL_CALLS: "tool_calls"}
_HEADER_KNOBS = {"x-caprouter-cost-weight": "cost_weight", "x-caprouter-min-quality": "min_quality",
                 "x-caprouter-max-cost": "max_cost", "x-caprouter-budget-per-request": "budget_per_request"}


def error_response(status: int, message: str, etype: str, code: str | None = None,
                   param: str | None = None) -> web.Response:
    """OpenAI's error body."""
    return web.json_response({"error": {"message": message, "type": etype, "param": param, "code": code}},
                             status=status)


def error_for(code: ErrorCode, message: str) -> web.Response:
    """The error body and HTTP status of an error code (``router.core.errors``' tables)."""
    return error_response(HTTP_STATUS[code], message, OPENAI_ERROR_TYPE[code], code.value.lower())


def stream_error(code: ErrorCode, message: str) -> bytes:
    """An error sent inside an SSE stream, after the status went out with the first chunk."""
    err = {"error": {"message": message, "type": OPENAI_ERROR_TYPE[code], "code": code.value.lower()}}
    return f"data: {json.dumps(err)}\n\n".encode()


class UnsupportedMediaType(InvalidArgument):
    """A body that is not declared JSON (HTTP 415: the adapter's own status, not the table's)."""


async def json_body(request: web.Request) -> dict[str, Any]:
    # The body must say it is JSON: a form or text body parsed as JSON would be a guess.
    if request.content_type != "application/json":
        raise UnsupportedMediaType(f"send the body as JSON with 'Content-Type: application/json' "
                                   f"(got {request.content_type or 'none'!r})")
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument("the request body is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise InvalidArgument("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def number(v: Any, name: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise InvalidArgument(f"{name} must be a number")
    try:
        return float(v)
    except (ValueError, OverflowError):          # "abc", or an integer of 400 digits
        raise InvalidArgument(f"{name} must be a number, got {str(v)[:40]!r}") from None


def _names(v: Any, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",") if x.strip())
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise InvalidArgument(f"{name} must be a list of backend names")


def knobs(request: web.Request, body: dict[str, Any], known: set[str]) -> KnobsInput:
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
    unknown = set(extra) - {*_HEADER_KNOBS.values(), "allowed_backends", "denied_backends", "budget_key", "cache"}
    if unknown:
        raise InvalidArgument(f"unknown routing knob(s): {', '.join(sorted(unknown))}")
    raw.update({k: v for k, v in extra.items() if k != "cache"})      # cache: a generation setting (gen_params)
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
    return KnobsInput(cost_weight=number(raw.get("cost_weight"), "cost_weight"),
                      min_quality=number(raw.get("min_quality"), "min_quality"),
                      max_cost=number(raw.get("max_cost"), "max_cost"), allowed=allowed,
                      denied=_names(raw.get("denied_backends"), "denied_backends"),
                      budget=number(raw.get("budget_per_request"), "budget_per_request"), budget_key=key,
                      max_queue_ms=number(raw.get("max_queue_ms"), "max_queue_ms"))


def _content(c: Any) -> str:
    """OpenAI message content: a string, or a list of parts of which the text ones count."""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = [p.get("text") for p in c if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(t, str) for t in parts):
            raise InvalidArgument("a text content part needs a string 'text'")
        return "".join(t for t in parts if isinstance(t, str))
    if c is None:
        return ""
    raise InvalidArgument("message content must be a string or a list of content parts")


def chat_messages(body: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The (role, text) reading of OpenAI chat messages, which routing embeds: "developer" is a
    system message, an assistant turn that only calls tools reads as its calls, a tool result as
    its text. The messages themselves go to OpenAI-speaking backends untouched (``raw_messages``)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidArgument("messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument("each message needs a role and content")
        role = "system" if m["role"] == "developer" else m["role"]
        text = _content(m.get("content"))
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise InvalidArgument(f"messages[{i}].tool_calls must be a list of tool calls on an assistant message")
            text = "\n".join([text] * bool(text) + [_call_text(c) for c in calls])
        out.append((role, text))
    return tuple(out)


def _call_text(call: dict[str, Any]) -> str:
    fn = call.get("function")
    fn = fn if isinstance(fn, dict) else {}
    return f"[tool call] {fn.get('name', '')}({fn.get('arguments', '')})"


def gen_params(body: dict[str, Any], *, chat: bool = True) -> GenParams:
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
    extra = {k: body[k] for k in PASS_THROUGH if body.get(k) is not None}
    if not chat:
        extra.pop("tools", None)        # completions have no tools
        if extra.get("logprobs") in (0, False):
            extra.pop("logprobs")       # completions' logprobs is an integer (0: none)
        elif "logprobs" in extra and not isinstance(extra["logprobs"], bool) and isinstance(extra["logprobs"], int):
            extra["logprobs"] = True    # asks for them, as a chat request's true does
    _check_extra(extra)
    raw = body["messages"] if chat and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls") or m.get("role") == "developer"
                                 or not isinstance(m.get("content"), str)) for m in body["messages"]) else None
    return GenParams(max_tokens=mt, temperature=None if temp is None else number(temp, "temperature"),
                     stop=tuple(stop), seed=body.get("seed"), extra=extra, raw_messages=raw, cache=_cache(body))


def _cache(body: dict[str, Any]) -> bool:
    """Whether the answer cache may serve (and keep) this answer: ``"caprouter": {"cache": false}``
    opts out (the ``x-caprouter-cache: off`` header is read by the adapter into the body)."""
    extra = body.get("caprouter")
    v = extra.get("cache", True) if isinstance(extra, dict) else True
    if not isinstance(v, bool):
        raise InvalidArgument("caprouter.cache must be true or false")
    return v


def _check_extra(extra: dict[str, Any]) -> None:
    """The shapes OpenAI documents, checked here so that a malformed request is a 400 from
    caprouter, not a failure of whichever backend it was routed to."""
    tools = extra.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools)):
        raise InvalidArgument("tools must be a list of {type: function, function: {name, parameters}} objects")
    fmt = extra.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in ("text", "json_object", "json_schema")):
        raise InvalidArgument("response_format must be {type: text | json_object | json_schema}")
    if fmt == {"type": "text"}:
        del extra["response_format"]    # the default: asks nothing of the backend
    for name in ("top_p", "presence_penalty", "frequency_penalty"):
        if name in extra:
            number(extra[name], name)
    if "logprobs" in extra and not isinstance(extra["logprobs"], bool):
        raise InvalidArgument("logprobs must be a boolean")
    if extra.get("logprobs") is False:
        del extra["logprobs"]
    if "user" in extra and not isinstance(extra["user"], str):
        raise InvalidArgument("user must be a string")
    # Values that ask for nothing (what many client wrappers send by default) are not needs: a
    # backend that does not take the parameter serves them as it is.
    for name, neutral in _NEUTRAL.items():
        if name in extra and extra[name] == neutral:
            del extra[name]


_NEUTRAL: dict[str, Any] = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                            "parallel_tool_calls": True, "tool_choice": "none", "store": False, "metadata": {}}


def delta(ev: TextChunk) -> dict[str, Any]:
    """A streamed chat chunk's delta: its text, and the tool-call fragments passed through."""
    out: dict[str, Any] = {"content": ev.text} if ev.text or not ev.tool_calls else {}
    if ev.tool_calls:
        out["tool_calls"] = [dict(c) for c in ev.tool_calls]
    return out


class Answer:
    """A whole (non-streamed) answer assembled from its chunks: the text, tool calls merged
    from their fragments by index (the id, type and name come once, the arguments in pieces),
    and the logprobs' token lists concatenated."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.tokens: dict[str, list[Any]] = {}

    def add(self, ev: TextChunk) -> None:
        self.parts.append(ev.text)
        for frag in ev.tool_calls:
            call = self.calls.setdefault(int(frag.get("index", len(self.calls))),
                                         {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            call["id"] = frag.get("id") or call["id"]
            call["type"] = frag.get("type") or call["type"]
            fn = frag.get("function") or {}
            call["function"]["name"] += fn.get("name") or ""
            call["function"]["arguments"] += fn.get("arguments") or ""
        for key, items in (ev.logprobs or {}).items():
            if isinstance(items, list):
                self.tokens.setdefault(key, []).extend(items)

    def text(self) -> str:
        return "".join(self.parts)

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.text() or (None if self.calls else "")}
        if self.calls:
            msg["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return msg

    def logprobs(self) -> dict[str, Any] | None:
        return dict(self.tokens) if self.tokens else None


def capabilities(c: Capabilities) -> dict[str, Any]:
    return {"context_window": c.context_window, "max_output_tokens": c.max_output_tokens, "tools": c.tools,
            "json_mode": c.json_mode, "params": sorted(c.params)}


def decision_info(d: Decision, ev: GenStart | None, unit: str) -> dict[str, Any]:
    chosen = next((s for s in d.selection.ranked if s.backend == (ev.backend if ev else d.backend)), d.selection.chosen)
    return {"decision_id": d.decision_id, "backend": chosen.backend, "predicted_quality": chosen.quality,
            "predicted_cost": chosen.cost, "cost_unit": unit, "cost_weight": d.selection.cost_weight,
            "candidates": [{"backend": s.backend, "predicted_quality": s.quality, "predicted_cost": s.cost,
                            "utility": s.utility, "rank": s.rank} for s in d.selection.ranked],
            "excluded": [{"backend": e.backend, "reason": e.reason} for e in d.selection.excluded],
            "fallbacks": [{"backend": b, "error": e} for b, e in (ev.fallbacks if ev else ())],
            "cache": None if ev is None or ev.cache is None else {"hit": ev.cache.kind,
                                                                   "similarity": ev.cache.similarity}}


def decision_headers(info: dict[str, Any]) -> dict[str, str]:
    cache = {"x-caprouter-cache": info["cache"]["hit"]} if info.get("cache") else {}
    return {**cache, "x-caprouter-backend": info["backend"], "x-caprouter-decision-id": info["decision_id"],
            "x-caprouter-predicted-quality": f"{info['predicted_quality']:.6f}",
            "x-caprouter-predicted-cost": f"{info['predicted_cost']:.6g}", "x-caprouter-cost-unit": info["cost_unit"]}


