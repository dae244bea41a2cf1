"""RouterService: the core of caprouter, free of grpc and ray.

It validates requests, embeds the prompt, asks the predictor (``router.prediction``) for each
backend's quality and cost, applies the selection policy (``router.policy``), remembers
decisions for Feedback, and dispatches generation with fallback. Adapters translate their wire
types to the plain dataclasses here and map CaprouterError codes to status codes.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from backends.base import (
    Backend,
    Capabilities,
    Finished,
    FinishReason,
    GenerationRequest,
    QueueStats,
    Status,
    TextChunk,
)
from backends.route_only import RouteOnlyBackend
from datastore.base import Datastore
from datastore.storage import RecordLog
from encoders.base import PromptEncoder
from router import __version__
from router.core.config import AppConfig, BackendConfig
from router.core.costs import CostModel
from router.core.errors import (
    BackendError,
    CaprouterError,
    FailedPrecondition,
    InvalidArgument,
    NoEligibleBackend,
    NotFound,
    Overloaded,
    Unavailable,
    UnknownBackend,
)
from router.core.ids import RandomIds
from router.core.messages import ROLES, Message, prompt_text
from router.policy.budget import BudgetWindows, assign
from router.policy.eligibility import Needs, ineligible
from router.policy.selection import Knobs, KnobsInput, Selection, promote, select
from router.prediction.onboarding import fit_capability
from router.prediction.predictor import Capability, Ensemble, Prediction, Predictor
from router.serving import registrations as reg
from router.serving.access import Access
from router.serving.answer_cache import AnswerCache, CachedAnswer, Hit, params_of, request_key
from router.serving.keys import OPEN, Caller
from router.serving.route_batching import RouteBatcher, Routed
from router.serving.telemetry import Telemetry
from router.serving.tracing import BACKEND, DECISION_ID, failed, span_between

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Query:
    """A routed request as the core sees it: exactly one of prompt / messages."""

    prompt: str = ""
    messages: Sequence[Message] = ()
    knobs: KnobsInput = field(default_factory=KnobsInput)
    caller: Caller = OPEN
    needs: Needs | None = None       # what the request asks of a backend (eligibility); None: nothing


@dataclass(frozen=True)
class _Routing:
    """A validated routing request, waiting for its batch's embedding and prediction."""

    t0: float
    msgs: tuple[Message, ...]
    backends: Mapping[str, Backend]
    knobs: Knobs
    text: str
    chars: int
    caller: Caller
    budget_capped: bool = False        # knobs.max_cost is what is left of the caller's budget ("fit")
    needs: Needs | None = None


# Parameters that eligibility checks as capabilities of their own (tools, JSON mode), not as params.
_CAPABILITY_PARAMS = frozenset({"tools", "tool_choice", "parallel_tool_calls", "response_format"})


@dataclass(frozen=True)
class GenParams:
    max_tokens: int | None = None
    temperature: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    deadline: float | None = None      # time.monotonic() when the caller stops waiting
    # PASS_THROUGH parameters (OpenAI chat) for the backend, verbatim; and the OpenAI messages as
    # sent (tool calls and results), where the (role, text) messages lose something.
    extra: Mapping[str, Any] = field(default_factory=dict)
    raw_messages: Sequence[Mapping[str, Any]] | None = None
    cache: bool = True                 # False: neither read nor write the answer cache

    def needs(self, max_tokens: int) -> Needs:
        """What these parameters ask of a backend."""
        fmt = self.extra.get("response_format")
        json_mode = isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema")
        tools = bool(self.extra.get("tools")) or any(
            m.get("role") == "tool" or m.get("tool_calls") for m in self.raw_messages or ())
        return Needs(max_tokens=max_tokens, tools=tools, json_mode=json_mode,
                     params=frozenset(self.extra) - _CAPABILITY_PARAMS)


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
    messages: tuple[Message, ...]
    text: str                                  # what was embedded
    embedding: npt.NDArray[np.float32]         # (d,), unit norm

    @property
    def backend(self) -> str:
        return self.selection.chosen.backend


@dataclass(frozen=True)
class BatchDecision:
    decisions: tuple[Decision, ...]
    cost_weight: float
    mean_cost: float
    mean_quality: float


@dataclass(frozen=True)
class GenStart:
    decision: Decision
    backend: str
    fallbacks: tuple[tuple[str, str], ...]
    cache: Hit | None = None           # the answer comes from the answer cache


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
    cost_model: CostModel
    prior_quality: float
    outcomes: int
    queue: QueueStats | None = None
    capabilities: Capabilities = Capabilities()


@dataclass(frozen=True)
class FeedbackResult:
    record_id: str
    backend: str


def _rpc(dispatch: bool) -> str:
    return "Generate" if dispatch else "Route"


class RouterService:
    def __init__(self, config: AppConfig, encoder: PromptEncoder, datastore: Datastore,
                 backends: Mapping[str, Backend], *, capability: Capability | Ensemble | None = None,
                 telemetry: Telemetry | None = None, access: Access | None = None,
                 tracer: trace.Tracer | None = None) -> None:
        self.config = config
        self._tracer = tracer or trace.NoOpTracer()
        self.cache = AnswerCache(config.cache, encoder.dim) if config.cache.enabled else None
        self.access = access or Access(config.auth)
        self.encoder = encoder
        self.datastore = datastore
        self.predictor = Predictor(datastore, capability, repeats=config.datastore.repeats)
        self.backends = dict(backends)
        r = config.routing
        self.defaults = Knobs(r.cost_weight, r.min_quality, r.max_cost, max_queue_ms=r.max_queue_ms)
        self.batcher = RouteBatcher(self.encoder.encode, self.predict, window_s=r.batch_window_ms / 1e3,
                                    max_prompts=r.batch_max_prompts, max_pending=r.max_pending)
        # decision id -> (embedded text, chosen backend, row of _embeddings): what Feedback by id
        # needs, and no more. Whole Decisions took 2.8 KB each (RSS +16% in a 10-minute soak at
        # 154 routes/s, the cache filling); embedding again on Feedback instead capped Feedback at
        # the encoder's rate (191/s at 16 callers against 793). So the embeddings sit in a ring
        # of decision_cache_size rows, written at start: its memory is taken once, not as it fills.
        self._decisions: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._embeddings = np.zeros((r.decision_cache_size, encoder.dim), dtype=np.float32)
        self._embeddings.fill(0.0)     # touch every page now
        self._next_row = 0
        self._dlock = threading.Lock()
        self._ids = RandomIds()
        self.version = __version__
        # Backends the config defines (and can dispatch to) cannot be replaced by Onboard.
        self._configured = {n for n, b in self.backends.items() if b.kind != "route-only"}
        self._registered: dict[str, reg.Registration] = {}
        self._registry_log: RecordLog | None = None
        self._olock = threading.Lock()
        self._stop_following = threading.Event()
        self._follower: threading.Thread | None = None
        self._budgets = BudgetWindows(r.budget_window)
        self.telemetry = telemetry or Telemetry()
        self.telemetry.watch_datastore(lambda: len(self.datastore))
        self.telemetry.watch_queues(self._queue_figures, lambda: (self.batcher.pending, self.batcher.expected_wait_s()))

    def _queue_figures(self) -> dict[str, tuple[int, int, float]]:
        out = {}
        for name, b in self.backends.items():
            q = b.queue_stats()
            if q is not None:
                out[name] = (q.running, q.waiting, q.expected_wait_s)
        return out

    @property
    def names(self) -> list[str]:
        return list(self.backends)

    @property
    def capability(self) -> Capability | Ensemble | None:
        return self.predictor.capability

    # ---- validation ----------------------------------------------------------------------------
    def _messages(self, q_prompt: str, q_messages: Sequence[Message]) -> tuple[Message, ...]:
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
    def unavailable(self, backends: Mapping[str, Backend] | None = None) -> dict[str, str]:
        out = {}
        for name, b in (self.backends if backends is None else backends).items():
            st, detail = b.status()
            if st != Status.READY:
                out[name] = f"{st.value}: {detail}"
        return out

    def predict(self, X: npt.NDArray[np.float32], prompt_chars: Sequence[int],
                backends: Mapping[str, Backend] | None = None) -> Prediction:
        """X: (n, d) embeddings of prompts of ``prompt_chars`` characters -> quality, cost and
        support over ``backends`` (default: the current set), in its order. Where the neighbours
        recorded no cost, a backend's cost model prices the prompt."""
        backends = self.backends if backends is None else backends
        fallback = np.array([[b.cost_model().predict(n) for b in backends.values()] for n in prompt_chars],
                            dtype=np.float64).reshape(len(prompt_chars), len(backends))
        return self.predictor.predict(X, list(backends), fallback)

    def route(self, query: Query, *, dispatch: bool = False) -> Decision:
        """Decide for one prompt (blocking). dispatch: the decision is for Generate, so route-only
        backends (which caprouter cannot call) are not eligible."""
        with self._tracer.start_as_current_span("caprouter.route") as span:
            submitted = time.time_ns()
            p = self._begin(query, dispatch)
            try:
                routed = self.batcher.submit([p.text], [p.chars], p.backends, arrived=True).result()
            except CaprouterError as e:
                self.telemetry.request(_rpc(dispatch), "", e.code.value.lower())
                raise
            d = self._finish_observed(p, dispatch, routed, span, submitted)
            if not dispatch and p.caller.limits.budget is not None:
                self.access.charge(p.caller, d.selection.chosen.cost)     # a route-only decision: its predicted cost
            return d

    async def route_async(self, query: Query, *, dispatch: bool = False, parent: trace.Span | None = None) -> Decision:
        """``route`` for the adapters: waits for its batch without holding a thread. ``parent``:
        the span to trace under (default: the current one)."""
        ctx = None if parent is None else trace.set_span_in_context(parent)
        with self._tracer.start_as_current_span("caprouter.route", context=ctx) as span:
            submitted = time.time_ns()
            p = self._begin(query, dispatch)
            try:
                routed = await self.batcher.submit_async([p.text], [p.chars], p.backends, arrived=True)
            except CaprouterError as e:
                self.telemetry.request(_rpc(dispatch), "", e.code.value.lower())
                raise
            d = self._finish_observed(p, dispatch, routed, span, submitted)
            if not dispatch and p.caller.limits.budget is not None:
                await asyncio.get_running_loop().run_in_executor(None, self.access.charge, p.caller,
                                                                 d.selection.chosen.cost)
            return d

    def _trace_route(self, span: trace.Span, submitted_ns: int, routed: Routed, decided_ns: int, d: Decision) -> None:
        """The route span's attributes and its children: the batch's times, this request's decision."""
        if not span.is_recording():
            return
        c = d.selection.chosen
        span.set_attributes({DECISION_ID: d.decision_id, BACKEND: d.backend, "caprouter.predicted_quality": c.quality,
                             "caprouter.predicted_cost": c.cost, "caprouter.batch_prompts": routed.batch_prompts,
                             "caprouter.excluded": len(d.selection.excluded)})
        t = self._tracer
        span_between(t, "caprouter.route.queue", submitted_ns, routed.started_ns, span)
        span_between(t, "caprouter.route.embed", routed.started_ns, routed.embedded_ns, span,
                     **{"caprouter.batch_prompts": routed.batch_prompts})
        span_between(t, "caprouter.route.predict", routed.embedded_ns, routed.predicted_ns, span)
        span_between(t, "caprouter.route.decide", decided_ns, time.time_ns(), span)

    def _begin(self, query: Query, dispatch: bool) -> _Routing:
        """Validate, telling the batcher a prompt is on its way (so it may wait the window for it)."""
        self.batcher.arrive()
        try:
            return self._prepare(query, dispatch)
        except CaprouterError as e:
            self.batcher.left()
            self.telemetry.request(_rpc(dispatch), "", e.code.value.lower())
            raise
        except BaseException:
            self.batcher.left()
            raise

    def _finish_observed(self, p: _Routing, dispatch: bool, routed: Routed, span: trace.Span,
                         submitted_ns: int) -> Decision:
        """Decide, then tell the metrics, the logs and the route span (submitted at ``submitted_ns``)."""
        rpc = _rpc(dispatch)
        decided = time.time_ns()
        try:
            d = self._decide(p, dispatch, routed)
        except CaprouterError as e:
            self.telemetry.request(rpc, "", e.code.value.lower())
            raise
        self._trace_route(span, submitted_ns, routed, decided, d)
        self.telemetry.routing(d.timings.total_ms / 1e3)
        if not dispatch:
            self.telemetry.request(rpc, d.backend, "ok")
        c = d.selection.chosen
        log.info("routed to %s (quality %.3f, cost %.3g, %.1f ms)", d.backend, c.quality, c.cost, d.timings.total_ms,
                 extra={"decision_id": d.decision_id, "backend": d.backend, "rpc": rpc})
        return d

    def _prepare(self, query: Query, dispatch: bool) -> _Routing:
        t0 = time.perf_counter()
        msgs = self._messages(query.prompt, query.messages)
        backends = self.backends      # one consistent set for this request, whatever Onboard does meanwhile
        knobs = query.knobs.resolve(self.defaults, list(backends))
        self.access.admit(query.caller, tokens=dispatch)
        budgeted = self.access.budgeted(query.caller, knobs)
        return _Routing(t0, msgs, backends, budgeted, prompt_text(None, msgs), sum(len(c) for _, c in msgs),
                        query.caller, budgeted.max_cost != knobs.max_cost, query.needs)

    def _decide(self, p: _Routing, dispatch: bool, routed: Routed) -> Decision:
        backends, knobs = p.backends, p.knobs
        names = list(backends)
        emb, pred = routed.embeddings[0], routed.prediction
        t1 = time.perf_counter()
        quality, cost, support = (pred.quality[0].tolist(), pred.cost[0].tolist(), pred.support[0].tolist())
        unavailable = self.unavailable(backends)
        route_only = sorted(n for n, b in backends.items() if b.kind == "route-only") if dispatch else []
        if dispatch:
            unavailable.update({n: "route-only (caprouter chooses it, the app calls it)" for n in route_only})
        if knobs.max_queue_ms is not None:
            unavailable.update(self.saturated(backends, knobs.max_queue_ms, exclude=unavailable))
        lacking = ineligible(p.needs, backends, p.msgs) if p.needs is not None else {}
        try:
            selection = select(names, quality, cost, knobs, support=support, unavailable=unavailable,
                               ineligible=lacking)
            if knobs.budget is not None:
                selection = self._window_budget(knobs, knobs.budget, names, quality, cost, support, unavailable,
                                                selection, lacking)
        except NoEligibleBackend as e:
            permitted = [n for n in names if (not knobs.allowed or n in knobs.allowed) and n not in knobs.denied]
            if lacking and permitted and all(n in lacking for n in permitted):
                # What the request asks is the reason, not the server's state: a 400 naming it.
                why = "; ".join(f"{n}: {r}" for n, r in lacking.items())
                raise InvalidArgument(f"no backend of this server can serve this request ({why}). Drop what they "
                                      "lack from the request, or add a backend that has it") from None
            if p.budget_capped:
                raise self.access.over_budget(p.caller, f"has too little left ({knobs.max_cost:.4g}) for any eligible "
                                              f"backend ({e}) of its budget") from None
            if route_only and len(route_only) == len(names):
                listed = ", ".join(map(repr, route_only))
                raise FailedPrecondition(
                    f"every backend of this server is route-only ({listed}): caprouter can choose them but cannot "
                    "call them. Use Route and call the chosen model yourself") from None
            raise
        t2 = time.perf_counter()
        # Embedding and prediction are the batch's; waiting for the batch counts in the total.
        decision = Decision(self._ids.next_hex(), selection,
                            Timings(routed.embedding_ms, routed.prediction_ms + (t2 - t1) * 1e3, (t2 - p.t0) * 1e3),
                            p.msgs, p.text, emb)
        self._remember(decision)
        return decision

    def _refuse_if_all_full(self, knobs: KnobsInput) -> None:
        """Overloaded at once, before routing, when every backend the request may go to keeps a
        queue and every such queue is full: under overload, routing first made refusals wait for
        a routing batch (p99 62 ms measured, against 5 ms at the p50)."""
        names = [n for n in (knobs.allowed or self.backends) if n in self.backends and n not in knobs.denied]
        stats = [self.backends[n].queue_stats() for n in names]
        if not names or any(q is None or q.waiting < q.max_queue for q in stats):
            return
        wait = min(q.expected_wait_s for q in stats if q is not None)
        self.telemetry.request("Generate", "", "resource_exhausted")
        raise Overloaded(f"every eligible backend is saturated ({', '.join(names)}: queues full); "
                         f"expected wait {wait:.1f} s; retry later", retry_after_s=wait)

    def saturated(self, backends: Mapping[str, Backend], max_queue_ms: float,
                  exclude: Mapping[str, str] = {}) -> dict[str, str]:
        """Backends whose queue would hold a request now for longer than ``max_queue_ms``."""
        out = {}
        for name, b in backends.items():
            q = b.queue_stats()
            if name not in exclude and q is not None and q.expected_wait_s * 1e3 > max_queue_ms:
                out[name] = (f"saturated: expected queue wait {q.expected_wait_s * 1e3:.0f} ms > max_queue_ms "
                             f"{max_queue_ms:g} ({q.running} running, {q.waiting} waiting)")
        return out

    def _window_budget(self, knobs: Knobs, budget: float, names: list[str], quality: list[float], cost: list[float],
                       support: list[float], unavailable: dict[str, str], eligible: Selection,
                       lacking: Mapping[str, str] | None = None) -> Selection:
        ok = {s.backend for s in eligible.ranked}
        idx, lam = self._budgets.decide(knobs.budget_key, names, np.array(quality), np.array(cost), budget,
                                        np.array([n in ok for n in names]))
        sel = select(names, quality, cost, replace(knobs, cost_weight=lam), support=support, unavailable=unavailable,
                     ineligible=lacking)
        sel = promote(sel, names[idx])
        self._budgets.commit(knobs.budget_key, names, sel.chosen.cost)
        return sel

    def route_batch(self, items: Sequence[Query], knobs_in: KnobsInput, *, caller: Caller = OPEN) -> BatchDecision:
        """Route prompts together. With a budget, the batch's average predicted cost keeps to it:
        one assignment problem over the batch (router.policy.budget.assign), each prompt's assigned
        backend ranked first, the rest by utility at the batch's lambda."""
        t0 = time.perf_counter()
        lim = self.config.limits
        if not items:
            raise InvalidArgument("RouteBatch needs at least one item")
        if len(items) > lim.max_batch:
            raise InvalidArgument(f"too many items: {len(items)} > limit {lim.max_batch}")
        msgs = []
        for i, q in enumerate(items):
            try:
                msgs.append(self._messages(q.prompt, q.messages))
            except InvalidArgument as e:
                raise InvalidArgument(f"items[{i}]: {e}") from None
        backends = self.backends
        names = list(backends)
        self.access.admit(caller)
        resolved = knobs_in.resolve(self.defaults, names)
        knobs = self.access.budgeted(caller, resolved)
        capped = knobs.max_cost != resolved.max_cost
        if capped:
            # "fit": what is left pays for the whole batch, not for each item (an average cap).
            assert knobs.max_cost is not None
            per = knobs.max_cost / len(items)
            knobs = replace(knobs, budget=per if knobs.budget is None else min(knobs.budget, per))
        texts = [prompt_text(None, m) for m in msgs]
        routed = self.batcher.submit(texts, [sum(len(x) for _, x in m) for m in msgs], backends).result()
        embs, pred = routed.embeddings, routed.prediction
        t1 = time.perf_counter()
        unavailable = self.unavailable(backends)
        preds = list(zip(pred.quality.tolist(), pred.cost.tolist(), pred.support.tolist()))
        sels = []
        for i, (q, c, s) in enumerate(preds):
            try:
                sels.append(select(names, q, c, replace(knobs, cost_weight=0.0), support=s, unavailable=unavailable))
            except NoEligibleBackend as err:
                if capped:
                    raise self.access.over_budget(caller, f"has too little left for items[{i}] ({err}) of its budget") \
                        from None
                raise NoEligibleBackend(f"items[{i}]: {err}") from None
        Q = np.array([p[0] for p in preds], dtype=np.float64)
        C = np.array([p[1] for p in preds], dtype=np.float64)
        eligible = np.array([[n in {x.backend for x in sel.ranked} for n in names] for sel in sels])
        lam = knobs.cost_weight
        if knobs.budget is not None:
            try:
                choice, lam = assign(Q, C, knobs.budget, eligible=eligible)
            except InvalidArgument as err:
                if capped:
                    raise self.access.over_budget(caller, f"has too little left for this batch ({err}) of its "
                                                  "budget") from None
                raise
        else:
            choice = None
        t2 = time.perf_counter()
        decisions = []
        for i, ((q, c, s), m, text, emb) in enumerate(zip(preds, msgs, texts, embs)):
            sel = select(names, q, c, replace(knobs, cost_weight=float(lam)), support=s, unavailable=unavailable)
            if choice is not None:
                sel = promote(sel, names[int(choice[i])])
            d = Decision(self._ids.next_hex(), sel, Timings((t1 - t0) * 1e3 / len(items), (t2 - t1) * 1e3 / len(items),
                                                        (t2 - t0) * 1e3 / len(items)), m, text, emb)
            self._remember(d)
            decisions.append(d)
        chosen = [d.selection.chosen for d in decisions]
        if caller.limits.budget is not None:
            self.access.charge(caller, float(sum(x.cost for x in chosen)))
        return BatchDecision(tuple(decisions), float(lam), float(np.mean([x.cost for x in chosen])),
                             float(np.mean([x.quality for x in chosen])))

    def _remember(self, d: Decision) -> None:
        with self._dlock:
            # FIFO eviction and round-robin rows: the row taken is the evicted decision's.
            row = self._next_row
            self._next_row = (row + 1) % len(self._embeddings)
            self._embeddings[row] = d.embedding
            self._decisions[d.decision_id] = (d.text, d.backend, row)
            while len(self._decisions) > self.config.routing.decision_cache_size:
                self._decisions.popitem(last=False)

    # ---- Generate ------------------------------------------------------------------------------
    def _gen_request(self, msgs: Sequence[Message], p: GenParams,
                     embedding: npt.NDArray[np.float32] | None = None) -> GenerationRequest:
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
        if any(len(s) > lim.max_stop_chars for s in p.stop):
            raise InvalidArgument(f"a stop sequence is longer than {lim.max_stop_chars} characters")
        if p.seed is not None and not -(2 ** 63) <= p.seed < 2 ** 63:
            raise InvalidArgument("seed must fit in 64 bits")
        return GenerationRequest(messages=list(msgs), max_tokens=mt, temperature=temp, stop=list(p.stop), seed=p.seed,
                                 embedding=embedding, deadline=p.deadline, extra=p.extra, raw_messages=p.raw_messages)

    async def generate(self, query: Query, params: GenParams) -> AsyncGenerator[GenStart | TextChunk | GenEnd]:
        """Route, then stream from the best backend; fall back down the ranking while nothing has
        been streamed yet. After the first chunk a failure ends the stream with BackendError.

        A key with a budget or a token limit is charged what the answer cost: on the finish event
        (before it goes out) for the tokens produced, and, for an answer cut off (cancelled,
        deadline, failure after streaming began), for the chunks streamed. While it runs, its
        worst case (max_tokens on the chosen backend) is held against the key's budget."""
        t0 = time.perf_counter()
        # Not the current span: this generator yields to its consumer between chunks, and a
        # context attached here would leak into the consumer's code meanwhile.
        gspan = self._tracer.start_span("caprouter.generate")
        events = self._generate(query, params, t0, gspan)
        try:
            async for ev in events:
                yield ev
        except BaseException as e:
            if not isinstance(e, (GeneratorExit, asyncio.CancelledError)):
                failed(gspan, e)
            else:
                gspan.set_attribute("caprouter.cancelled", True)
            raise
        finally:
            try:
                await events.aclose()       # now, not when collected: the backend stops at once
            finally:
                gspan.end()

    async def _generate(self, query: Query, params: GenParams, t0: float,
                        gspan: trace.Span) -> AsyncGenerator[GenStart | TextChunk | GenEnd]:
        msgs = self._messages(query.prompt, query.messages)
        first = self._gen_request(msgs, params)          # validate before spending time on routing
        max_tokens = first.max_tokens
        self._refuse_if_all_full(query.knobs)
        decision = await self.route_async(replace(query, needs=params.needs(max_tokens)), dispatch=True, parent=gspan)
        gspan.set_attribute(DECISION_ID, decision.decision_id)
        caller = query.caller
        # Logprobs are not kept with a cached answer: such requests go to the backend.
        cached = (self.cache is not None and params.cache and AnswerCache.cacheable(first.temperature, first.seed)
                  and not params.extra.get("logprobs"))
        if cached:
            hit = self._cache_get(caller, decision, msgs, params, first)
            if hit is not None:
                async for out in self._replay(decision, hit, t0, gspan):
                    yield out
                return
        owed = self.access.charges(caller)
        held = self.access.hold(caller, self.backends[decision.backend].cost_model().predict(
            len(decision.text), output_tokens=max_tokens)) if owed else 0.0
        loop = asyncio.get_running_loop()
        fallbacks: list[tuple[str, str]] = []
        streamed, answering = 0, ""
        try:
            for cand in decision.selection.ranked:
                backend = self.backends[cand.backend]
                req = self._gen_request(msgs, params, decision.embedding)
                dspan = self._tracer.start_span("caprouter.dispatch", context=trace.set_span_in_context(gspan),
                                                attributes={BACKEND: cand.backend, "caprouter.rank": cand.rank,
                                                            DECISION_ID: decision.decision_id})
                dispatched = first_ns = time.time_ns()
                stream = backend.generate(req)
                started = False
                parts: list[str] = []
                calls: list[Mapping[str, Any]] = []
                try:
                    async for ev in stream:
                        if not started:
                            started, answering = True, cand.backend
                            ttft = (time.perf_counter() - t0) * 1e3
                            first_ns = time.time_ns()
                            self._trace_start(dspan, dispatched, req.started_ns, first_ns)
                            yield GenStart(decision, cand.backend, tuple(fallbacks))
                        if isinstance(ev, Finished):
                            if owed:
                                # What the answer really cost: its prompt and the tokens it produced.
                                await loop.run_in_executor(None, self._settle, caller, cand.backend, decision.text,
                                                           ev.completion_tokens, held)
                                owed, held = False, 0.0
                            total = (time.perf_counter() - t0) * 1e3
                            self.telemetry.generation(cand.backend, total / 1e3, ttft / 1e3, ev.completion_tokens,
                                                      ev.tokens_per_second)
                            self.telemetry.request("Generate", cand.backend, "ok")
                            log.info("generated %d tokens in %.0f ms", ev.completion_tokens, total,
                                     extra={"decision_id": decision.decision_id, "backend": cand.backend,
                                            "rpc": "Generate"})
                            if cached and ev.reason != FinishReason.CANCELLED:
                                self._cache_put(caller, cand.backend, msgs, params, first, decision, parts, calls, ev)
                            if dspan.is_recording():
                                span_between(self._tracer, "caprouter.decode", first_ns, time.time_ns(), dspan,
                                             **{"gen_ai.usage.output_tokens": ev.completion_tokens})
                                gspan.set_attributes({BACKEND: cand.backend, "caprouter.fallbacks": len(fallbacks),
                                                      "gen_ai.usage.input_tokens": ev.prompt_tokens,
                                                      "gen_ai.usage.output_tokens": ev.completion_tokens,
                                                      "caprouter.finish_reason": ev.reason.value})
                            yield GenEnd(cand.backend, ev, total, ttft)
                            return
                        streamed += 1
                        if cached:
                            parts.append(ev.text)
                            calls.extend(ev.tool_calls)
                        yield ev
                    if not started:
                        raise BackendError(cand.backend, "ended without a result")
                    raise BackendError(cand.backend, "stream ended without a finish event", tokens_streamed=1)
                except Overloaded as e:
                    failed(dspan, e)
                    self.telemetry.request("Generate", cand.backend, "resource_exhausted")
                    raise
                except BackendError as e:
                    failed(dspan, e)
                    if started:
                        self.telemetry.request("Generate", cand.backend, "unavailable")
                        raise BackendError(cand.backend, f"{e} (after streaming began; no fallback possible)",
                                           tokens_streamed=1) from e
                    log.warning("backend %s failed before streaming, falling back: %s", cand.backend, e,
                                extra={"decision_id": decision.decision_id, "backend": cand.backend,
                                       "rpc": "Generate"})
                    self.telemetry.fallback(cand.backend)
                    fallbacks.append((cand.backend, str(e)))
                finally:
                    req.cancel.set()
                    await stream.aclose()
                    dspan.end()
            tried = "; ".join(f"{b}: {err}" for b, err in fallbacks)
            self.telemetry.request("Generate", "", "unavailable")
            raise Unavailable(f"every eligible backend failed before answering ({tried})")
        finally:
            if owed:
                # Cut off, or nothing produced: charge the chunks that went out (a cancelled task
                # cannot await, so the charge runs on its own; it gives the hold back after it).
                loop.run_in_executor(None, self._settle, caller, answering, decision.text, streamed, held)

    # ---- the answer cache ----------------------------------------------------------------------
    def _cache_keys(self, caller: Caller, backend: str, msgs: Sequence[Message], params: GenParams,
                    req: GenerationRequest) -> tuple[str, str]:
        tenant = caller.key.id if caller.key is not None else ""       # never across API keys
        messages = params.raw_messages if params.raw_messages is not None else [list(m) for m in msgs]
        # A semantic hit may vary only the last user turn's text (what the routing embedding stands
        # for): the system prompt, the other turns (tool calls and results), content parts must
        # match, so they are part of the scope.
        last = max((i for i, (r, _) in enumerate(msgs) if r == "user"), default=-1)
        context: list[Any] = [list(m) for i, m in enumerate(msgs) if i != last]
        if params.raw_messages is not None:
            context.append(json.dumps(params.raw_messages, sort_keys=True, default=str))
        return request_key(tenant, backend, messages,
                           {**params_of(req.max_tokens, req.temperature, req.stop, req.seed, req.extra),
                            "context": context})

    def _cache_get(self, caller: Caller, decision: Decision, msgs: Sequence[Message], params: GenParams,
                   req: GenerationRequest) -> Hit | None:
        assert self.cache is not None
        exact, scope = self._cache_keys(caller, decision.backend, msgs, params, req)
        hit = self.cache.get(exact, scope, decision.embedding, semantic=req.temperature == 0)
        self.telemetry.cache(decision.backend, hit.kind if hit else "miss")
        return hit

    def _cache_put(self, caller: Caller, backend: str, msgs: Sequence[Message], params: GenParams,
                   req: GenerationRequest, decision: Decision, parts: list[str], calls: list[Mapping[str, Any]],
                   fin: Finished) -> None:
        assert self.cache is not None
        exact, scope = self._cache_keys(caller, backend, msgs, params, req)
        self.cache.put(exact, scope, decision.embedding, CachedAnswer("".join(parts), tuple(calls), fin.reason.value,
                                                                      fin.prompt_tokens, fin.completion_tokens))

    async def _replay(self, decision: Decision, hit: Hit, t0: float,
                      gspan: trace.Span) -> AsyncGenerator[GenStart | TextChunk | GenEnd]:
        """A cached answer as a stream: the decision, the whole text at once, the end."""
        a = hit.answer
        ttft = (time.perf_counter() - t0) * 1e3
        gspan.set_attributes({BACKEND: decision.backend, "caprouter.cache": hit.kind,
                              "caprouter.cache_similarity": hit.similarity})
        yield GenStart(decision, decision.backend, (), hit)
        if a.text or a.tool_calls:
            yield TextChunk(a.text, tool_calls=a.tool_calls)
        total = (time.perf_counter() - t0) * 1e3
        self.telemetry.request("Generate", decision.backend, "ok")
        log.info("answered from the cache (%s, similarity %.3f)", hit.kind, hit.similarity,
                 extra={"decision_id": decision.decision_id, "backend": decision.backend, "rpc": "Generate"})
        yield GenEnd(decision.backend, Finished(FinishReason(a.finish_reason), a.prompt_tokens, a.completion_tokens,
                                                0.0), total, ttft)

    def _trace_start(self, span: trace.Span, dispatched_ns: int, started_ns: int | None, first_ns: int) -> None:
        """A dispatch's queue span (a backend that queues says when the request started) and its
        first-token span."""
        if not span.is_recording():
            return
        if started_ns is not None:
            span_between(self._tracer, "caprouter.queue", dispatched_ns, started_ns, span)
        span_between(self._tracer, "caprouter.first_token", started_ns or dispatched_ns, first_ns, span)

    def _settle(self, caller: Caller, backend: str, text: str, tokens: int, held: float) -> None:
        """Charge a generation's realized cost (blocking: the ledger's fsync), then give back what
        was held for it."""
        try:
            if backend and tokens:
                cost = self.backends[backend].cost_model().predict(len(text), output_tokens=tokens)
                self.access.charge(caller, cost, tokens)
        finally:
            self.access.release(caller, held)

    # ---- Feedback ------------------------------------------------------------------------------
    def feedback(self, decision_id: str, score: float, *, backend: str = "", prompt: str = "",
                 messages: Sequence[Message] = (), cost: float | None = None, caller: Caller = OPEN) -> FeedbackResult:
        self.access.admit(caller)
        if isinstance(score, bool) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise InvalidArgument(f"score must be in [0, 1], got {score}")
        if cost is not None and (not math.isfinite(cost) or cost < 0):
            raise InvalidArgument(f"cost must be a finite number >= 0, got {cost}")
        if decision_id:
            if prompt or messages:
                raise InvalidArgument("send either decision_id or prompt/messages with Feedback, not both")
            with self._dlock:      # one hold: a newer decision may take the row once this is evicted
                remembered = self._decisions.get(decision_id)
                emb = None if remembered is None else self._embeddings[remembered[2]].copy()
            if remembered is None or emb is None:
                raise NotFound(f"unknown decision_id {decision_id!r} (expired or never issued); "
                               "send the prompt and backend instead")
            text, chosen, _ = remembered
            backend = backend or chosen
        else:
            if not backend:
                raise InvalidArgument("Feedback needs a decision_id, or a prompt/messages and a backend")
            msgs = self._messages(prompt, messages)
            text = prompt_text(None, msgs)
            # Embedded with the concurrent Routes (one encoder call for all).
            emb = self.batcher.submit([text], [len(text)], None).result().embeddings[0]
        if backend not in self.backends:
            raise UnknownBackend(f"unknown backend {backend!r}; configured: {', '.join(self.names)}")
        rec: dict[str, Any] = {"prompt": text, "scores": {backend: float(score)}, "source": "feedback"}
        if decision_id:
            rec["decision_id"] = decision_id
        if cost is not None:
            rec["cost"] = {backend: float(cost)}
        weight = 1.0
        if caller.key is not None:        # provenance: which key taught the router this
            rec["key"] = caller.name
            rec["key_id"] = caller.key.id
            weight = self.config.auth.feedback_weights.get(caller.name, 1.0)
            if weight < 1.0:
                rec["weight"] = weight
        rid = self.datastore.add(emb[None, :], [rec])[0] if weight > 0 else ""
        if caller.key is not None:
            self.access.audit.write(caller, "feedback", decision_id=decision_id, backend=backend, score=float(score),
                                    record_id=rid, weight=weight,
                                    **({"prompt": text} if self.config.auth.audit_prompts else {}))
        self.telemetry.request("Feedback", backend, "ok")
        return FeedbackResult(rid, backend)

    def retract_feedback(self, key: str, since: float | None = None, *, caller: Caller = OPEN) -> int:
        """Withdraw the feedback API key ``key`` sent (at or after ``since``): durable, and gone
        from routing at once. Returns how many records were withdrawn."""
        self.access.admit(caller)
        if not key:
            raise InvalidArgument("name the API key whose feedback to retract")
        if since is not None and not math.isfinite(since):
            raise InvalidArgument(f"since must be a finite unix time, got {since}")
        n = self.datastore.retract_feedback(key, since)
        self.access.audit.write(caller, "feedback.retract", retracted_key=key, since=since, records=n)
        log.info("retracted %d feedback records of key %s", n, key)
        return n

    # ---- Onboard -------------------------------------------------------------------------------
    def attach_registry(self, registry: RecordLog) -> int:
        """Use ``registry`` (the system of record's stream of registrations) for Onboard, and
        replay what it holds.
        Returns the number of backends restored."""
        n = 0
        for e in reg.latest(registry.replayed):
            if e["backend"] in self._configured:
                log.warning("onboarded backend %s is now defined in the config; its registration is ignored",
                            e["backend"])
                continue
            self._apply(reg.Registration.from_entry(e), reg.entry_embeddings(e, self.encoder))
            n += 1
        self._registry_log = registry
        return n

    def onboard(self, spec: reg.OnboardSpec, *, caller: Caller = OPEN) -> reg.OnboardResult:
        """Register a backend, or replace an earlier registration, from its aptitude results.
        Durable once it returns; routable at once."""
        self.access.admit(caller)
        if self._registry_log is None:
            raise FailedPrecondition("this server has no state folder for registrations")
        if spec.backend in self._configured:
            raise FailedPrecondition(f"backend {spec.backend!r} is defined in the server's config; onboarding "
                                     "registers new route-only backends (send its outcomes with Feedback instead)")
        r = reg.validate(spec, self._suite, max_prompt_chars=self.config.limits.max_prompt_chars)
        if caller.key is not None:
            r = replace(r, key=caller.name)
        emb = self.encoder.encode(list(r.prompts))
        with self._olock:
            created = r.backend not in self.backends
            self._registry_log.append([r.to_entry(self.encoder.model_id, emb)])   # durable from here on
            fitted = self._apply(r, emb)
        log.info("onboarded backend %s (%s) from %d aptitude results, mean score %.3f", r.backend,
                 "new" if created else "updated", len(r.scores), float(np.mean(r.scores)))
        if caller.key is not None:
            self.access.audit.write(caller, "onboard", backend=r.backend, created=created, results=len(r.scores))
        return reg.OnboardResult(r.backend, created, len(r.scores), float(np.mean(r.scores)), fitted)

    def _apply(self, r: reg.Registration, emb: npt.NDArray[np.float32]) -> bool:
        # Fitted first, while the datastore holds only the trained backends' outcomes on these
        # prompts (their residuals correct the fit; see prediction.onboarding.fit_capability).
        cap = self.predictor.capability
        capability = None if cap is None else fit_capability(
            cap, r.backend, emb, np.asarray(r.scores, dtype=np.float32), self.config.datastore, self.datastore)
        prev = self._registered.get(r.backend)
        if prev is not None:
            self.datastore.retract(prev.record_ids(), r.backend)
        self.datastore.insert(emb, r.records())
        backend = RouteOnlyBackend(BackendConfig(name=r.backend, kind="route-only", description=r.description,
                                                 cost=r.cost), cost_unit=self.config.routing.cost_unit)
        # Copy-on-write: a Route running concurrently sees the old set or the new one, never half.
        self.backends = {**self.backends, r.backend: backend}
        self._registered[r.backend] = r
        if capability is None:
            return False
        self.predictor = self.predictor.with_capability(capability)
        return True

    # ---- replicas ------------------------------------------------------------------------------
    def follow_replicas(self) -> int:
        """Take in what other replicas sharing the system of record wrote since the last call:
        their feedback and retractions into the index, their registrations as backends. Returns
        how many entries arrived."""
        n = self.datastore.follow(self.encoder)
        if self._registry_log is not None:
            entries = self._registry_log.follow()
            for e in reg.latest(entries):
                if e["backend"] in self._configured:
                    continue
                with self._olock:
                    self._apply(reg.Registration.from_entry(e), reg.entry_embeddings(e, self.encoder))
                log.info("backend %s registered by another replica", e["backend"])
            n += len(entries)
        return n

    def start_following(self, interval_s: float) -> None:
        """Call ``follow_replicas`` every ``interval_s`` on a thread of its own, until ``close``."""
        def loop() -> None:
            while not self._stop_following.wait(interval_s):
                try:
                    self.follow_replicas()
                except Exception:          # a database hiccup: try again next time, say so
                    log.exception("following the other replicas failed; retrying in %.1f s", interval_s)
        self._follower = threading.Thread(target=loop, name="replica-follower", daemon=True)
        self._follower.start()

    @functools.cached_property
    def _suite(self) -> dict[str, str]:
        """The aptitude suite's prompts by item id (read on the first Onboard)."""
        return reg.load_suite_prompts(reg.suite_path(self.config.aptitude.suite))

    # ---- ListBackends --------------------------------------------------------------------------
    def list_backends(self) -> list[BackendView]:
        stats = self.datastore.stats()
        out = []
        for name, b in self.backends.items():
            st, detail = b.status()
            s = stats.get(name)
            out.append(BackendView(name, b.kind, b.description, st, detail, b.cost_model(),
                                   s.mean_score if s else math.nan, s.outcomes if s else 0, b.queue_stats(),
                                   b.capabilities()))
        return out

    async def close(self) -> None:
        self._stop_following.set()
        if self._follower is not None:
            self._follower.join(timeout=10)
        self.batcher.close()
        self.access.close()
        for b in self.backends.values():
            await b.close()
        self.datastore.close()
        if self._registry_log is not None:
            self._registry_log.close()


__all__ = ["RouterService", "Query", "GenParams", "Decision", "GenStart", "GenEnd", "BackendView",
           "FeedbackResult", "CaprouterError"]
