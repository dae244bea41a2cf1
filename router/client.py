"""Python client for the caprouter gRPC service, sync (``Client``) and async (``AsyncClient``).

    from router.client import Client
    with Client("127.0.0.1:50051") as c:
        d = c.route("What is 7 + 5?", cost_weight=0.04)
        print(d.backend, d.candidates[0].predicted_quality)
        for chunk in c.generate("Name three fruits.", max_tokens=32):
            print(chunk.text, end="")
        c.feedback(d.decision_id, 1.0)

Typed results (dataclasses, not protobuf messages); every call has a deadline (``timeout``);
calls that change nothing (Route, ListBackends) and Feedback (idempotent per decision for the
router's purposes) are retried with exponential backoff on UNAVAILABLE (a server still loading,
a restart); Generate is retried only until the first chunk arrived, never after.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence, TypeVar

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


@dataclass(frozen=True)
class Decision:
    decision_id: str
    backend: str
    candidates: list[Candidate]
    excluded: dict[str, str]
    cost_unit: str
    cost_weight: float
    request_id: str


@dataclass(frozen=True)
class Chunk:
    """One piece of a generation: ``start`` (the decision) on the first, ``text`` on every one
    that carries text, ``finish_reason``/``usage`` on the last."""

    text: str = ""
    backend: str = ""
    decision: Decision | None = None
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kind: str
    status: str
    detail: str
    description: str


@dataclass(frozen=True)
class Retry:
    """Backoff on UNAVAILABLE: attempts in all, first delay, factor, cap (seconds); jittered."""

    attempts: int = 4
    initial_s: float = 0.2
    factor: float = 2.0
    max_s: float = 3.0

    def delays(self) -> Iterator[float]:
        d = self.initial_s
        for _ in range(self.attempts - 1):
            yield d * (0.5 + random.random() / 2)
            d = min(d * self.factor, self.max_s)


def _knobs(cost_weight=None, min_quality=None, max_cost=None, allowed=(), denied=(), budget_per_request=None,
           budget_key="") -> pb.RoutingKnobs:
    k = pb.RoutingKnobs(allowed_backends=list(allowed), denied_backends=list(denied), budget_key=budget_key)
    for name, v in (("cost_weight", cost_weight), ("min_quality", min_quality), ("max_cost", max_cost),
                    ("budget_per_request", budget_per_request)):
        if v is not None:
            setattr(k, name, v)
    return k


def _input(prompt: str | None, messages: Messages | None) -> dict:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if prompt is not None:
        return {"prompt": prompt}
    return {"messages": [pb.Message(role=r, content=c) for r, c in messages]}


def _decision(m, decision_id: str, backend: str, request_id: str) -> Decision:
    return Decision(decision_id, backend,
                    [Candidate(c.backend, c.predicted_quality, c.predicted_cost, c.utility, c.rank) for c in m.candidates],
                    {e.backend: e.reason for e in m.excluded}, m.cost_unit, m.cost_weight, request_id)


def _chunk(c: pb.GenerateChunk) -> Chunk:
    if c.HasField("start"):
        s = c.start
        return Chunk(text=c.text, backend=s.backend, decision=_decision(s, s.decision_id, s.backend, c.metadata.request_id),
                     fallbacks=[(f.backend, f.error) for f in s.fallbacks])
    if c.HasField("end"):
        e = c.end
        return Chunk(text=c.text, backend=e.backend, finish_reason=pb.FinishReason.Name(e.finish_reason)
                     .removeprefix("FINISH_REASON_").lower(), prompt_tokens=e.usage.prompt_tokens,
                     completion_tokens=e.usage.completion_tokens, latency_ms=e.latency_ms)
    return Chunk(text=c.text)


def _gen_request(prompt: str | None, messages: Messages | None, max_tokens: int | None, temperature: float | None,
                 stop: Sequence[str], seed: int | None, knobs: dict) -> pb.GenerateRequest:
    params = pb.GenerationParams(stop=list(stop))
    for name, v in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if v is not None:
            setattr(params, name, v)
    return pb.GenerateRequest(knobs=_knobs(**knobs), params=params, **_input(prompt, messages))


def _backends(r: pb.ListBackendsResponse) -> list[BackendInfo]:
    return [BackendInfo(b.name, b.kind, pb.BackendStatus.Name(b.status).removeprefix("BACKEND_STATUS_").lower(),
                        b.status_detail, b.description) for b in r.backends]


def _unavailable(e: grpc.RpcError) -> bool:
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE


def _backoff(e: grpc.RpcError, delays: Iterator[float], *, started: bool = False) -> float:
    """How long to wait before trying again after ``e``, or ``e`` re-raised: only UNAVAILABLE is
    retried, only before a stream has yielded anything, and only while the policy has delays."""
    delay = next(delays, None)
    if started or not _unavailable(e) or delay is None:
        raise e
    return delay


class Client:
    """Synchronous client. ``timeout``: default deadline of every call, in seconds."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float = 30.0, retry: Retry = Retry(),
                 channel: grpc.Channel | None = None) -> None:
        self._channel = channel or grpc.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.retry = retry

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Callable[[], T]) -> T:
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                time.sleep(_backoff(e, delays))

    def route(self, prompt: str | None = None, *, messages: Messages | None = None, timeout: float | None = None,
              **knobs) -> Decision:
        req = pb.RouteRequest(knobs=_knobs(**knobs), **_input(prompt, messages))
        r = self._call(lambda: self._stub.Route(req, timeout=timeout or self.timeout))
        return _decision(r, r.decision_id, r.backend, r.metadata.request_id)

    def generate(self, prompt: str | None = None, *, messages: Messages | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, stop: Sequence[str] = (), seed: int | None = None,
                 timeout: float | None = None, **knobs) -> Iterator[Chunk]:
        req = _gen_request(prompt, messages, max_tokens, temperature, stop, seed, knobs)
        delays = self.retry.delays()
        while True:
            started = False
            try:
                for c in self._stub.Generate(req, timeout=timeout or self.timeout):
                    started = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                time.sleep(_backoff(e, delays, started=started))

    def feedback(self, decision_id: str, score: float, *, backend: str = "", timeout: float | None = None) -> None:
        req = pb.FeedbackRequest(decision_id=decision_id, score=score, backend=backend)
        self._call(lambda: self._stub.Feedback(req, timeout=timeout or self.timeout))

    def list_backends(self, *, timeout: float | None = None) -> list[BackendInfo]:
        return _backends(self._call(lambda: self._stub.ListBackends(pb.ListBackendsRequest(),
                                                                    timeout=timeout or self.timeout)))


class AsyncClient:
    """The same calls for asyncio (``grpc.aio``); ``generate`` is an async iterator."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float = 30.0, retry: Retry = Retry()) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.retry = retry

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn):
        delays = self.retry.delays()
        while True:
            try:
                return await fn()
            except grpc.RpcError as e:
                await asyncio.sleep(_backoff(e, delays))

    async def route(self, prompt: str | None = None, *, messages: Messages | None = None,
                    timeout: float | None = None, **knobs) -> Decision:
        req = pb.RouteRequest(knobs=_knobs(**knobs), **_input(prompt, messages))
        r = await self._call(lambda: self._stub.Route(req, timeout=timeout or self.timeout))
        return _decision(r, r.decision_id, r.backend, r.metadata.request_id)

    async def generate(self, prompt: str | None = None, *, messages: Messages | None = None,
                       max_tokens: int | None = None, temperature: float | None = None, stop: Sequence[str] = (),
                       seed: int | None = None, timeout: float | None = None, **knobs) -> AsyncIterator[Chunk]:
        req = _gen_request(prompt, messages, max_tokens, temperature, stop, seed, knobs)
        delays = self.retry.delays()
        while True:
            started = False
            try:
                async for c in self._stub.Generate(req, timeout=timeout or self.timeout):
                    started = True
                    yield _chunk(c)
                return
            except grpc.RpcError as e:
                await asyncio.sleep(_backoff(e, delays, started=started))

    async def feedback(self, decision_id: str, score: float, *, backend: str = "", timeout: float | None = None) -> None:
        req = pb.FeedbackRequest(decision_id=decision_id, score=score, backend=backend)
        await self._call(lambda: self._stub.Feedback(req, timeout=timeout or self.timeout))

    async def list_backends(self, *, timeout: float | None = None) -> list[BackendInfo]:
        return _backends(await self._call(lambda: self._stub.ListBackends(pb.ListBackendsRequest(),
                                                                          timeout=timeout or self.timeout)))
