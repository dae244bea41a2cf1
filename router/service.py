"""RouterService: the core of caprouter, free of grpc and ray.

It validates requests, embeds the prompt, asks the datastore for each backend's predicted quality
and cost, applies the selection policy, remembers decisions for Feedback, and dispatches
generation with fallback. Adapters (gRPC today) translate their wire types to the plain
dataclasses here and map CaprouterError codes to status codes.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from backends.base import Backend, Finished, GenerationRequest, Status, TextChunk
from encoders.base import PromptEncoder, prompt_text
from router import __version__
from router.config import AppConfig
from router.errors import BackendError, CaprouterError, InvalidArgument, NotFound, Unavailable, UnknownBackend
from router.policy import Knobs, KnobsInput, Selection, select

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Query:
    """A routed request as the core sees it: exactly one of prompt / messages."""

    prompt: str = ""
    messages: Sequence[tuple[str, str]] = ()
    knobs: KnobsInput = field(default_factory=KnobsInput)


@dataclass(frozen=True)
class GenParams:
    max_tokens: int | None = None
    temperature: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Timings:
    embedding_ms: float
    prediction_ms: float
    total_ms: float


@dataclass(frozen=True)
class Decision:
    decision_id: str
    selection: Selection
    timings: Timings
    messages: tuple[tuple[str, str], ...]
    text: str                                  # what was embedded
    embedding: npt.NDArray[np.float32]         # (d,), unit norm

    @property
    def backend(self) -> str:
        return self.selection.chosen.backend


@dataclass(frozen=True)
class GenStart:
    decision: Decision
    backend: str
    fallbacks: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class GenEnd:
    backend: str
    finished: Finished
    latency_ms: float
    ttft_ms: float


@dataclass(frozen=True)
class BackendView:
    name: str
    kind: str
    description: str
    status: Status
    detail: str
    cost_model: Any
    prior_quality: float
    outcomes: int


@dataclass(frozen=True)
class FeedbackResult:
    record_id: str
    backend: str


class Capability:
    """A trained capability encoder served next to the datastore. It takes the datastore's kNN
    estimates as input (its learned per-backend weights are the blend), so Feedback, which lands
    in the datastore, keeps moving decisions without retraining."""

    def __init__(self, model: Any, backends: Sequence[str], compute: Any = None) -> None:
        from router.compute import Inline

        self.model, self.backends = model, list(backends)
        self._compute = compute or Inline()

    def predict(self, embedding: npt.NDArray[np.float32], knn: Mapping[str, float]) -> dict[str, float]:
        """embedding: (d,); knn: the datastore's quality estimate per backend -> quality per backend."""
        from encoders.capability import predict

        k = np.array([[knn[b] for b in self.backends]], dtype=np.float32)
        q = self._compute.run(predict, self.model, embedding[None, :], k)[0]
        return dict(zip(self.backends, map(float, q)))


class RouterService:
    def __init__(self, config: AppConfig, encoder: PromptEncoder, datastore: Any,
                 backends: Mapping[str, Backend], *, capability: Capability | None = None) -> None:
        self.config = config
        self.encoder = encoder
        self.datastore = datastore
        self.backends = dict(backends)
        self.names = list(self.backends)
        r = config.routing
        self.defaults = Knobs(r.cost_weight, r.min_quality, r.max_cost)
        self._decisions: OrderedDict[str, Decision] = OrderedDict()
        self._dlock = threading.Lock()
        self.capability = capability
        self.version = __version__

    # ---- validation ----------------------------------------------------------------------------
    def _messages(self, q_prompt: str, q_messages: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        lim = self.config.limits
        if q_prompt and q_messages:
            raise InvalidArgument("set either prompt or messages, not both")
        if q_messages:
            if len(q_messages) > lim.max_messages:
                raise InvalidArgument(f"too many messages: {len(q_messages)} > limit {lim.max_messages}")
            for i, (role, content) in enumerate(q_messages):
                if role not in ROLES:
                    raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
                if not content or not content.strip():
                    raise InvalidArgument(f"messages[{i}].content is empty")
            if not any(r == "user" for r, _ in q_messages):
                raise InvalidArgument("messages must contain at least one 'user' message")
            msgs = tuple((r, c) for r, c in q_messages)
        else:
            if not q_prompt or not q_prompt.strip():
                raise InvalidArgument("prompt is empty: send a non-empty prompt or a messages list")
            msgs = (("user", q_prompt),)
        total = sum(len(c) for _, c in msgs)
        if total > lim.max_prompt_chars:
            raise InvalidArgument(f"prompt too long: {total} characters > limit {lim.max_prompt_chars}")
        return msgs

    # ---- Route ---------------------------------------------------------------------------------
    def unavailable(self) -> dict[str, str]:
        out = {}
        for name, b in self.backends.items():
            st, detail = b.status()
            if st != Status.READY:
                out[name] = f"{st.value}: {detail}"
        return out

    def predict(self, embedding: npt.NDArray[np.float32], prompt_chars: int) -> tuple[list[float], list[float], list[float]]:
        """Quality, cost and support for every configured backend, in configured order."""
        est = self.datastore.estimate(embedding[None, :])
        # A configured backend with no outcome yet: the mean of the others' estimates.
        prior = float(est.quality.mean()) if est.quality.size else 0.5
        quality, cost, support = [], [], []
        for name in self.names:
            col = est.column(name)
            q = float(est.quality[0, col]) if col is not None else prior
            c = float(est.cost[0, col]) if col is not None else math.nan
            if math.isnan(c):
                c = self.backends[name].cost_model().predict(prompt_chars)
            quality.append(q)
            cost.append(c)
            support.append(float(est.support[0, col]) if col is not None else 0.0)
        if self.capability is not None:
            knn = dict(zip(self.names, quality))
            enc = self.capability.predict(embedding, {b: knn.get(b, prior) for b in self.capability.backends})
            quality = [enc.get(n, q) for n, q in zip(self.names, quality)]
        return quality, cost, support

    def route(self, query: Query) -> Decision:
        t0 = time.perf_counter()
        msgs = self._messages(query.prompt, query.messages)
        knobs = query.knobs.resolve(self.defaults, self.names)
        text = prompt_text(None, msgs)
        emb = self.encoder.encode([text])[0]
        t1 = time.perf_counter()
        quality, cost, support = self.predict(emb, sum(len(c) for _, c in msgs))
        selection = select(self.names, quality, cost, knobs, support=support, unavailable=self.unavailable())
        t2 = time.perf_counter()
        decision = Decision(uuid.uuid4().hex, selection, Timings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3),
                            msgs, text, emb)
        self._remember(decision)
        return decision

    def _remember(self, d: Decision) -> None:
        with self._dlock:
            self._decisions[d.decision_id] = d
            while len(self._decisions) > self.config.routing.decision_cache_size:
                self._decisions.popitem(last=False)

    # ---- Generate ------------------------------------------------------------------------------
    def _gen_request(self, msgs: Sequence[tuple[str, str]], p: GenParams) -> GenerationRequest:
        lim = self.config.limits
        gen = self.config.generation
        mt = gen.max_tokens if p.max_tokens is None else p.max_tokens
        if not 1 <= mt <= lim.max_tokens:
            raise InvalidArgument(f"max_tokens must be in [1, {lim.max_tokens}], got {mt}")
        temp = gen.temperature if p.temperature is None else p.temperature
        if not math.isfinite(temp) or not 0 <= temp <= 5:
            raise InvalidArgument(f"temperature must be in [0, 5], got {temp}")
        if len(p.stop) > lim.max_stop_sequences:
            raise InvalidArgument(f"too many stop sequences: {len(p.stop)} > {lim.max_stop_sequences}")
        if any(not s for s in p.stop):
            raise InvalidArgument("stop sequences must be non-empty strings")
        return GenerationRequest(messages=list(msgs), max_tokens=mt, temperature=temp, stop=list(p.stop), seed=p.seed)

    async def generate(self, query: Query, params: GenParams) -> AsyncIterator[GenStart | TextChunk | GenEnd]:
        """Route, then stream from the best backend; fall back down the ranking while nothing has
        been streamed yet. After the first chunk a failure ends the stream with BackendError."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        msgs = self._messages(query.prompt, query.messages)
        self._gen_request(msgs, params)  # validate before spending time on routing
        decision = await loop.run_in_executor(None, self.route, query)
        fallbacks: list[tuple[str, str]] = []
        for cand in decision.selection.ranked:
            backend = self.backends[cand.backend]
            req = self._gen_request(msgs, params)
            stream = backend.generate(req)
            started = False
            try:
                async for ev in stream:
                    if not started:
                        started = True
                        ttft = (time.perf_counter() - t0) * 1e3
                        yield GenStart(decision, cand.backend, tuple(fallbacks))
                    if isinstance(ev, Finished):
                        yield GenEnd(cand.backend, ev, (time.perf_counter() - t0) * 1e3, ttft)
                        return
                    yield ev
                if not started:
                    raise BackendError(cand.backend, "ended without a result")
                raise BackendError(cand.backend, "stream ended without a finish event", tokens_streamed=1)
            except BackendError as e:
                if started:
                    raise BackendError(cand.backend, f"{e} (after streaming began; no fallback possible)",
                                       tokens_streamed=1) from e
                log.warning("backend %s failed before streaming, falling back: %s", cand.backend, e)
                fallbacks.append((cand.backend, str(e)))
            finally:
                req.cancel.set()
                await stream.aclose()
        tried = "; ".join(f"{b}: {err}" for b, err in fallbacks)
        raise Unavailable(f"every eligible backend failed before answering ({tried})")

    # ---- Feedback ------------------------------------------------------------------------------
    def feedback(self, decision_id: str, score: float, *, backend: str = "", prompt: str = "",
                 messages: Sequence[tuple[str, str]] = (), cost: float | None = None) -> FeedbackResult:
        if isinstance(score, bool) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise InvalidArgument(f"score must be in [0, 1], got {score}")
        if cost is not None and (not math.isfinite(cost) or cost < 0):
            raise InvalidArgument(f"cost must be a finite number >= 0, got {cost}")
        if decision_id:
            if prompt or messages:
                raise InvalidArgument("send either decision_id or prompt/messages with Feedback, not both")
            with self._dlock:
                d = self._decisions.get(decision_id)
            if d is None:
                raise NotFound(f"unknown decision_id {decision_id!r} (expired or never issued); "
                               "send the prompt and backend instead")
            backend = backend or d.backend
            text, emb = d.text, d.embedding
        else:
            if not backend:
                raise InvalidArgument("Feedback needs a decision_id, or a prompt/messages and a backend")
            msgs = self._messages(prompt, messages)
            text = prompt_text(None, msgs)
            emb = self.encoder.encode([text])[0]
        if backend not in self.backends:
            raise UnknownBackend(f"unknown backend {backend!r}; configured: {', '.join(self.names)}")
        rec: dict[str, Any] = {"prompt": text, "scores": {backend: float(score)}, "source": "feedback"}
        if decision_id:
            rec["decision_id"] = decision_id
        if cost is not None:
            rec["cost"] = {backend: float(cost)}
        rid = self.datastore.add(emb[None, :], [rec])[0]
        return FeedbackResult(rid, backend)

    # ---- ListBackends --------------------------------------------------------------------------
    def list_backends(self) -> list[BackendView]:
        stats = self.datastore.stats()
        out = []
        for name, b in self.backends.items():
            st, detail = b.status()
            s = stats.get(name)
            out.append(BackendView(name, b.kind, b.description, st, detail, b.cost_model(),
                                   s.mean_score if s else math.nan, s.outcomes if s else 0))
        return out

    async def close(self) -> None:
        for b in self.backends.values():
            await b.close()
        self.datastore.close()


__all__ = ["RouterService", "Query", "GenParams", "Decision", "GenStart", "GenEnd", "BackendView",
           "FeedbackResult", "CaprouterError"]
