"""Python client for the caprouter gRPC service, sync (``Client``) and async (``AsyncClient``).

    from router.client import Client
    with Client("127.0.0.1:50051") as c:
        d = c.route("What is 7 + 5?", cost_weight=0.04)
        print(d.backend, d.candidates[0].predicted_quality)
        for chunk in c.generate("Name three fruits.", max_tokens=32):
            print(chunk.text, end="")
        c.feedback(d.decision_id, 1.0)

Every RPC of caprouter.v1.Router: route, route_batch, generate, feedback (by decision id, or by
prompt and backend), list_backends, onboard, retract_feedback. Typed results (dataclasses, not protobuf messages);
every call has a deadline (``timeout``); calls that change nothing (Route, RouteBatch,
ListBackends), Feedback by decision id (idempotent per decision for the router's purposes; by
prompt it is not, and is not retried) and Onboard (a second registration under the same name
replaces the first) are retried with exponential backoff on UNAVAILABLE (a server still loading, a restart); Generate is retried only until the
first chunk arrived, never after.

On a server with API keys: ``Client(address, api_key=...)`` (sent as ``authorization: Bearer``);
over TLS: ``tls=Tls(ca="ca.pem")``, with ``cert``/``key`` for mutual TLS.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from caprouter.v1 import router_pb2 as pb
from caprouter.v1 import router_pb2_grpc

T = TypeVar("T")
Messages = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Candidate:
    backend: str
    predicted_quality: float
    predicted_cost: float
    utility: float
    rank: int
    support: float = 0.0


@dataclass(frozen=True)
class Timings:
    embedding_ms: float = 0.0
    prediction_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Decision:
    decision_id: str
    backend: str
    candidates: list[Candidate]
    excluded: dict[str, str]
    cost_unit: str
    cost_weight: float
    request_id: str
    timings: Timings = field(default_factory=Timings)
    # The wire message it was read from (RouteResponse, GenerateStart), for a caller that wants
    # every field as sent (`caprouter route --json`).
    response: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class BatchDecision:
    """RouteBatch: one Decision per item, in order, and the batch's lambda and predicted means."""

    decisions: list[Decision]
    cost_weight: float
    predicted_mean_cost: float
    predicted_mean_quality: float
    cost_unit: str
    response: Any = field(default=None, repr=False, compare=False)     # the RouteBatchResponse


@dataclass(frozen=True)
class Chunk:
    """One piece of a generation: ``start`` (the decision) on the first, ``text`` on every one
    that carries text, ``finish_reason``/``usage`` and speed on the last."""

    text: str = ""
    backend: str = ""
    decision: Decision | None = None
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kind: str
    status: str
    detail: str
    description: str
    cost: str = ""                 # the cost model in words
    prior_quality: float = 0.0     # mean score over the datastore's outcomes
    outcomes: int = 0


@dataclass(frozen=True)
class FeedbackResult:
    record_id: str
    backend: str


@dataclass(frozen=True)
class AptitudeResult:
    """One answered aptitude item: ``item_id`` of the server's suite, or the ``prompt`` itself."""

    score: float
    item_id: str = ""
    prompt: str = ""
    cost: float | None = None


@dataclass(frozen=True)
class CostModel:
    """A backend's cost model for Onboard, in the server's cost unit: ``per_request`` (a flat
    price), ``per_token`` (prices per million input / output tokens) or ``compute`` (2 x active
    parameters x tokens). ``CostModel.of(...)`` picks the kind from what is given."""

    kind: str = "per_request"
    per_request: float = 0.0
    input_per_million_tokens: float = 0.0
    output_per_million_tokens: float = 0.0
    active_parameters: int = 0
    expected_output_tokens: int = 0      # 0: the server's default

    @classmethod
    def of(cls, *, per_request: float | None = None, price_in: float | None = None, price_out: float | None = None,
           active_parameters: int | None = None, expected_output_tokens: int | None = None) -> CostModel:
        n = expected_output_tokens or 0
        if active_parameters:
            return cls("compute", active_parameters=active_parameters, expected_output_tokens=n)
        if price_in is not None or price_out is not None:
            return cls("per_token", input_per_million_tokens=price_in or 0.0, output_per_million_tokens=price_out or 0.0,
                       expected_output_tokens=n)
        return cls("per_request", per_request=per_request or 0.0, expected_output_tokens=n)


@dataclass(frozen=True)
class OnboardResult:
    backend: BackendInfo
    created: bool                  # False: an earlier registration was replaced
    results_used: int
    mean_score: float
    capability_fitted: bool
    response: Any = field(default=None, repr=False, compare=False)     # the OnboardResponse


@dataclass(frozen=True)
class Retry:
    """Backoff on UNAVAILABLE and RESOURCE_EXHAUSTED: attempts in all, first delay, factor, cap
    (seconds); jittered; after a refusal, at least the server's retry-after hint."""

    attempts: int = 4
    initial_s: float = 0.2
    factor: float = 2.0
    max_s: float = 3.0

    def delays(self) -> Iterator[float]:
        d = self.initial_s
        for _ in range(self.attempts - 1):
            yield d * (0.5 + random.random() / 2)
            d = min(d * self.factor, self.max_s)


def _knobs(cost_weight: float | None = None, min_quality: float | None = None, max_cost: float | None = None,
           allowed: Sequence[str] = (), denied: Sequence[str] = (), budget_per_request: float | None = None,
           budget_key: str = "", max_queue_ms: float | None = None) -> pb.RoutingKnobs:
    k = pb.RoutingKnobs(allowed_backends=list(allowed), denied_backends=list(denied), budget_key=budget_key)
    for name, v in (("cost_weight", cost_weight), ("min_quality", min_quality), ("max_cost", max_cost),
                    ("budget_per_request", budget_per_request), ("max_queue_ms", max_queue_ms)):
        if v is not None:
            setattr(k, name, v)
    return k


def _messages(messages: Messages) -> list[pb.Message]:
    return [pb.Message(role=r, content=c) for r, c in messages]


def _input(prompt: str | None, messages: Messages | None) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if prompt is not None:
        return {"prompt": prompt}
    assert messages is not None
    return {"messages": _messages(messages)}


def _decision(m: Any, decision_id: str, backend: str, request_id: str) -> Decision:
    t = m.timings
    return Decision(decision_id, backend,
                    [Candidate(c.backend, c.predicted_quality, c.predicted_cost, c.utility, c.rank, c.support)
                     for c in m.candidates],
                    {e.backend: e.reason for e in m.excluded}, m.cost_unit, m.cost_weight, request_id,
                    Timings(t.embedding_ms, t.prediction_ms, t.total_ms), m)


def _route_decision(r: pb.RouteResponse) -> Decision:
    return _decision(r, r.decision_id, r.backend, r.metadata.request_id)


def _batch(r: pb.RouteBatchResponse) -> BatchDecision:
    return BatchDecision([_route_decision(d) for d in r.decisions], r.cost_weight, r.predicted_mean_cost,
                         r.predicted_mean_quality, r.cost_unit, r)


def _chunk(c: pb.GenerateChunk) -> Chunk:
    if c.HasField("start"):
        s = c.start
        return Chunk(text=c.text, backend=s.backend, decision=_decision(s, s.decision_id, s.backend, c.metadata.request_id),
                     fallbacks=[(f.backend, f.error) for f in s.fallbacks])
    if c.HasField("end"):
        e = c.end
        return Chunk(text=c.text, backend=e.backend, finish_reason=pb.FinishReason.Name(e.finish_reason)
                     .removeprefix("FINISH_REASON_").lower(), prompt_tokens=e.usage.prompt_tokens,
                     completion_tokens=e.usage.completion_tokens, latency_ms=e.latency_ms,
                     time_to_first_token_ms=e.time_to_first_token_ms, tokens_per_second=e.tokens_per_second)
    return Chunk(text=c.text)


def _gen_request(prompt: str | None, messages: Messages | None, max_tokens: int | None, temperature: float | None,
                 stop: Sequence[str], seed: int | None, knobs: dict[str, Any]) -> pb.GenerateRequest:
    params = pb.GenerationParams(stop=list(stop))
    for name, v in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if v is not None:
            setattr(params, name, v)
    return pb.GenerateRequest(knobs=_knobs(**knobs), params=params, **_input(prompt, messages))


def _batch_request(items: Sequence[str | Messages], knobs: dict[str, Any]) -> pb.RouteBatchRequest:
    """items: prompts (str) or chats ((role, content) pairs)."""
    return pb.RouteBatchRequest(knobs=_knobs(**knobs), items=[
        pb.BatchItem(prompt=it) if isinstance(it, str) else pb.BatchItem(messages=_messages(it)) for it in items])


def _feedback_request(decision_id: str, score: float, backend: str, prompt: str | None, messages: Messages | None,
                      cost: float | None) -> pb.FeedbackRequest:
    req = pb.FeedbackRequest(decision_id=decision_id, score=score, backend=backend, prompt=prompt or "",
                             messages=_messages(messages or ()))
    if cost is not None:
        req.cost = cost
    return req


def _backend(b: pb.BackendInfo) -> BackendInfo:
    return BackendInfo(b.name, b.kind, pb.BackendStatus.Name(b.status).removeprefix("BACKEND_STATUS_").lower(),
                       b.status_detail, b.description, b.cost_model.summary, b.prior_quality, b.outcomes)


def _backends(r: pb.ListBackendsResponse) -> list[BackendInfo]:
    return [_backend(b) for b in r.backends]


def _onboard_request(name: str, results: Sequence[AptitudeResult], cost: CostModel,
                     description: str) -> pb.OnboardRequest:
    cm = pb.CostModel(kind=cost.kind, per_request=cost.per_request,
                      input_per_million_tokens=cost.input_per_million_tokens,
                      output_per_million_tokens=cost.output_per_million_tokens,
                      active_parameters=cost.active_parameters, expected_output_tokens=cost.expected_output_tokens)
    out = []
    for r in results:
        m = pb.AptitudeResult(item_id=r.item_id, prompt=r.prompt, score=r.score)
        if r.cost is not None:
            m.cost = r.cost
        out.append(m)
    return pb.OnboardRequest(backend=name, description=description, cost_model=cm, results=out)


def _onboarded(r: pb.OnboardResponse) -> OnboardResult:
    return OnboardResult(_backend(r.backend), r.created, r.results_used, r.mean_score, r.capability_fitted, r)


def _unavailable(e: grpc.RpcError) -> bool:
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE


def _retry_after_s(e: grpc.RpcError) -> float | None:
    """The server's hint on a RESOURCE_EXHAUSTED refusal (trailer ``retry-after-ms``), if any."""
    try:
        meta = dict(e.trailing_metadata() or ())
        return int(meta["retry-after-ms"]) / 1e3
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


def _backoff(e: grpc.RpcError, delays: Iterator[float], *, started: bool = False) -> float:
    """How long to wait before trying again after ``e``, or ``e`` re-raised. Retried: UNAVAILABLE
    (loading, restarting) and RESOURCE_EXHAUSTED (a full queue refused the call before doing
    anything; the wait is at least the server's hint), only before a stream has yielded anything,
    and only while the policy has delays."""
    delay = next(delays, None)
    overloaded = isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    if started or not (_unavailable(e) or overloaded) or delay is None:
        raise e
    hint = _retry_after_s(e) if overloaded else None
    if hint is not None and hint > _LONGEST_HINT_S:
        raise e                     # a spent budget renews in hours: waiting here helps nobody
    return delay if hint is None else max(delay, hint)


_LONGEST_HINT_S = 30.0


@dataclass(frozen=True)
class Tls:
    """TLS to the server: ``ca`` (PEM file) verifies the server's certificate (None: the system's
    roots); ``cert`` and ``key`` present a client certificate (mutual TLS); ``server_name``
    overrides the name checked against the certificate (when connecting by IP address)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Every call's metadata: the API key as a bearer token (caprouter keys are ASCII)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Synchronous client. ``timeout``: default deadline of every call, in seconds."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float = 30.0, retry: Retry = Retry(),
                 channel: grpc.Channel | None = None, api_key: str | None = None, tls: Tls | None = None) -> None:
        if channel is None:
            channel = (grpc.secure_channel(address, tls.credentials(), tls.options()) if tls
                       else grpc.insecure_channel(address))
        self._channel = channel
        self._md = _auth_metadata(api_key)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.retry = retry

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Callable[[], T], *, retry: bool = True) -> T:
        delays = self.retry.delays() if retry else iter(())
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                time.sleep(_backoff(e, delays))

    def route(self, prompt: str | None = None, *, messages: Messages | None = None, timeout: float | None = None,
              **knobs: Any) -> Decision:
        req = pb.RouteRequest(knobs=_knobs(**knobs), **_input(prompt, messages))
        return _route_decision(self._call(lambda: self._stub.Route(req, timeout=timeout or self.timeout, metadata=self._md)))

    def route_batch(self, items: Sequence[str | Messages], *, timeout: float | None = None,
                    **knobs: Any) -> BatchDecision:
        """items: prompts, or chats as (role, content) pairs; knobs bind every item (with
        ``budget_per_request``, the batch's average)."""
        req = _batch_request(items, knobs)
        return _batch(self._call(lambda: self._stub.RouteBatch(req, timeout=timeout or self.timeout, metadata=self._md)))

    def generate(self, prompt: str | None = None, *, messages: Messages | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                 timeout: float | None = None, **knobs: Any) -> Iterator[Chunk]:
        req = _gen_request(prompt, messages, max_tokens, temperature, stop, seed, knobs)
        delays = self.retry.delays()
        while True:
            started = False
            call = self._stub.Generate(req, timeout=timeout or self.timeout, metadata=self._md)
            try:
                for c in call:
                    started = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                time.sleep(_backoff(e, delays, started=started))
            finally:
                # A caller that stops reading (a closed pipe, a break) stops the generation now.
                call.cancel()

    def feedback(self, decision_id: str, score: float, *, backend: str = "", prompt: str | None = None,
                 messages: Messages | None = None, cost: float | None = None,
                 timeout: float | None = None) -> FeedbackResult:
        """A score in [0, 1] for a decision (``decision_id``; the backend defaults to the chosen
        one), or for a ``prompt`` / ``messages`` answered by ``backend`` (decision_id ""). Only the
        first is retried: a second record for the same prompt would count it twice."""
        req = _feedback_request(decision_id, score, backend, prompt, messages, cost)
        r = self._call(lambda: self._stub.Feedback(req, timeout=timeout or self.timeout, metadata=self._md), retry=bool(decision_id))
        return FeedbackResult(r.record_id, r.backend)

    def list_backends(self, *, timeout: float | None = None) -> list[BackendInfo]:
        return _backends(self._call(lambda: self._stub.ListBackends(pb.ListBackendsRequest(),
                                                                    timeout=timeout or self.timeout, metadata=self._md)))

    def onboard(self, name: str, results: Sequence[AptitudeResult], *, cost: CostModel | None = None,
                description: str = "", timeout: float | None = None) -> OnboardResult:
        """Register (or update) a route-only backend from its aptitude results, with its cost model
        (default: free per request)."""
        req = _onboard_request(name, results, cost or CostModel(), description)
        return _onboarded(self._call(lambda: self._stub.Onboard(req, timeout=timeout or self.timeout, metadata=self._md)))


    def retract_feedback(self, key: str, *, since_unix: float | None = None, timeout: float | None = None) -> int:
        """Withdraw the feedback API key ``key`` (by name) sent, since a time; needs an admin key.
        Returns how many records were withdrawn."""
        req = pb.RetractFeedbackRequest(key=key, since_unix=since_unix)
        return int(self._call(lambda: self._stub.RetractFeedback(req, timeout=timeout or self.timeout,
                                                                 metadata=self._md)).retracted)


class AsyncClient:
    """The same calls for asyncio (``grpc.aio``); ``generate`` is an async iterator."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float = 30.0, retry: Retry = Retry(),
                 api_key: str | None = None, tls: Tls | None = None) -> None:
        self._channel = (grpc.aio.secure_channel(address, tls.credentials(), tls.options()) if tls
                         else grpc.aio.insecure_channel(address))
        self._md = _auth_metadata(api_key)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.retry = retry

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        delays = self.retry.delays() if retry else iter(())
        while True:
            try:
                return await fn()
            except grpc.RpcError as e:
                await asyncio.sleep(_backoff(e, delays))

    async def route(self, prompt: str | None = None, *, messages: Messages | None = None,
                    timeout: float | None = None, **knobs: Any) -> Decision:
        req = pb.RouteRequest(knobs=_knobs(**knobs), **_input(prompt, messages))
        return _route_decision(await self._call(lambda: self._stub.Route(req, timeout=timeout or self.timeout, metadata=self._md)))

    async def route_batch(self, items: Sequence[str | Messages], *, timeout: float | None = None,
                          **knobs: Any) -> BatchDecision:
        req = _batch_request(items, knobs)
        return _batch(await self._call(lambda: self._stub.RouteBatch(req, timeout=timeout or self.timeout, metadata=self._md)))

    async def generate(self, prompt: str | None = None, *, messages: Messages | None = None,
                       max_tokens: int | None = None, temperature: float | None = None, stop: Sequence[str] = (),
                       seed: int | None = None, timeout: float | None = None, **knobs: Any) -> AsyncIterator[Chunk]:
        req = _gen_request(prompt, messages, max_tokens, temperature, stop, seed, knobs)
        delays = self.retry.delays()
        while True:
            started = False
            call = self._stub.Generate(req, timeout=timeout or self.timeout, metadata=self._md)
            try:
                async for c in call:
                    started = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                await asyncio.sleep(_backoff(e, delays, started=started))
            finally:
                call.cancel()

    async def feedback(self, decision_id: str, score: float, *, backend: str = "", prompt: str | None = None,
                       messages: Messages | None = None, cost: float | None = None,
                       timeout: float | None = None) -> FeedbackResult:
        req = _feedback_request(decision_id, score, backend, prompt, messages, cost)
        r = await self._call(lambda: self._stub.Feedback(req, timeout=timeout or self.timeout, metadata=self._md),
                             retry=bool(decision_id))
        return FeedbackResult(r.record_id, r.backend)

    async def list_backends(self, *, timeout: float | None = None) -> list[BackendInfo]:
        return _backends(await self._call(lambda: self._stub.ListBackends(pb.ListBackendsRequest(),
                                                                          timeout=timeout or self.timeout, metadata=self._md)))

    async def onboard(self, name: str, results: Sequence[AptitudeResult], *, cost: CostModel | None = None,
                      description: str = "", timeout: float | None = None) -> OnboardResult:
        req = _onboard_request(name, results, cost or CostModel(), description)
        return _onboarded(await self._call(lambda: self._stub.Onboard(req, timeout=timeout or self.timeout, metadata=self._md)))

    async def retract_feedback(self, key: str, *, since_unix: float | None = None,
                               timeout: float | None = None) -> int:
        req = pb.RetractFeedbackRequest(key=key, since_unix=since_unix)
        return int((await self._call(lambda: self._stub.RetractFeedback(req, timeout=timeout or self.timeout,
                                                                        metadata=self._md))).retracted)
