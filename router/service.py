"""RouterService: the core of caprouter, free of grpc and ray.

It validates requests, embeds the prompt, asks the datastore for each backend's predicted quality
and cost, applies the selection policy, remembers decisions for Feedback, and dispatches
generation with fallback. Adapters (gRPC today) translate their wire types to the plain
dataclasses here and map CaprouterError codes to status codes.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from backends.base import Backend, Finished, GenerationRequest, Status, TextChunk
from encoders.base import PromptEncoder, prompt_text
from router import __version__
from router.config import AppConfig
from router.errors import (BackendError, CaprouterError, FailedPrecondition, InvalidArgument, NoEligibleBackend,
                           NotFound, Unavailable, UnknownBackend)
from router.budget import BudgetWindows, assign
from router.policy import Knobs, KnobsInput, Selection, promote, select
from router.telemetry import Telemetry

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

    def __init__(self, model: Any, backends: Sequence[str], compute: Any = None, *, config: Any = None) -> None:
        from router.compute import Inline

        from encoders.capability import FrozenCapability

        self.model, self.backends = model, list(backends)
        self.config = config            # the model's CapabilityConfig (needed to grow it)
        self._compute = compute or Inline()
        # Serving runs the numpy copy on the calling thread: no torch dispatch, no thread hop.
        self._frozen = self._compute.run(FrozenCapability, model)

    def with_backend(self, name: str, X: npt.NDArray[np.float32], y: npt.NDArray[np.float32],
                     ds_cfg: Any, datastore: Any) -> "Capability":
        """A copy that also predicts ``name`` (or predicts it anew), its vector fitted to the
        aptitude results X (m, d), y (m,) with the prompt side frozen. Where the datastore holds
        the trained backends' own outcomes on those prompts, their residuals correct the fit for
        the luck of the sample (``encoders.capability.onboard``)."""
        from encoders.capability import add_backend, replace_backend
        from router.training import fit_backend, peer_residuals

        rec = datastore.recorded(X)
        # The backend being fitted is nobody's peer (re-onboarded, its old vector is in the model).
        cols = [rec.column(b) if b != name else None for b in self.backends]
        recorded = np.stack([rec.quality[:, c] if c is not None else np.full(len(X), np.nan, np.float32)
                             for c in cols], 1)
        R = peer_residuals(recorded, self.predict_many(X, datastore.estimate_many(X, self.scales)))

        def fit() -> Any:
            g, b, h, w = fit_backend(self.model, X, y, ds_cfg, peer_residuals=R)
            if name in self.backends:
                return replace_backend(self.model, self.backends.index(name), g, b, h, self.config, w)
            return add_backend(self.model, g, b, h, self.config, w)

        model = self._compute.run(fit)
        names = self.backends if name in self.backends else [*self.backends, name]
        return Capability(model, names, self._compute, config=self.config)

    @property
    def scales(self) -> list[tuple[float, float]]:
        """The datastore neighbourhoods the model takes as input, in its order."""
        return [(float(k), float(t)) for k, t in (getattr(self.model, "knn_scales", None) or [[0, 0]])]

    def predict(self, embedding: npt.NDArray[np.float32], estimates: Sequence[Any]) -> dict[str, float]:
        """embedding: (d,); estimates: the datastore's Estimate for it at each of ``scales`` ->
        quality per backend."""
        q = self.predict_many(embedding[None, :], estimates)[0]
        return dict(zip(self.backends, map(float, q)))

    def predict_many(self, X: npt.NDArray[np.float32], estimates: Sequence[Any]) -> npt.NDArray[np.float32]:
        """X: (n, d); estimates: the datastore's Estimate for X at each of ``scales`` -> (n, B)
        quality in ``backends`` order (a backend the datastore has not seen: the mean of the others)."""
        cols = []
        for est in estimates:
            mean = est.quality.mean(1) if est.quality.shape[1] else np.full(len(X), 0.5, np.float32)
            cols.append([est.quality[:, c] if (c := est.column(b)) is not None else mean for b in self.backends])
        k = np.asarray(cols, dtype=np.float32).transpose(2, 1, 0)                    # (n, B, S)
        return self._frozen.predict(X, k)


class RouterService:
    def __init__(self, config: AppConfig, encoder: PromptEncoder, datastore: Any,
                 backends: Mapping[str, Backend], *, capability: Capability | None = None,
                 telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.encoder = encoder
        self.datastore = datastore
        self.backends = dict(backends)
        r = config.routing
        self.defaults = Knobs(r.cost_weight, r.min_quality, r.max_cost)
        self._decisions: OrderedDict[str, Decision] = OrderedDict()
        self._dlock = threading.Lock()
        self.capability = capability
        self.version = __version__
        # Backends the config defines (and can dispatch to) cannot be replaced by Onboard.
        self._configured = {n for n, b in self.backends.items() if b.kind != "route-only"}
        self._registered: dict[str, Any] = {}      # name -> onboarding.Registration
        self._registry_log: Any = None
        self._olock = threading.Lock()
        self._budgets = BudgetWindows(r.budget_window)
        self.telemetry = telemetry or Telemetry()
        self.telemetry.watch_datastore(lambda: len(self.datastore))

    @property
    def names(self) -> list[str]:
        return list(self.backends)

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
    def unavailable(self, backends: Mapping[str, Backend] | None = None) -> dict[str, str]:
        out = {}
        for name, b in (self.backends if backends is None else backends).items():
            st, detail = b.status()
            if st != Status.READY:
                out[name] = f"{st.value}: {detail}"
        return out

    def predict(self, embedding: npt.NDArray[np.float32], prompt_chars: int,
                backends: Mapping[str, Backend] | None = None) -> tuple[list[float], list[float], list[float]]:
        """Quality, cost and support for every backend (of ``backends``, default: the current
        set), in their order."""
        backends = self.backends if backends is None else backends
        names = list(backends)
        capability = self.capability
        scales = capability.scales if capability is not None else [(0.0, 0.0)]
        if (0.0, 0.0) not in scales:
            scales = [(0.0, 0.0), *scales]
        ests = self.datastore.estimate_many(embedding[None, :], scales)
        est = ests[scales.index((0.0, 0.0))]
        # A configured backend with no outcome yet: the mean of the others' estimates.
        prior = float(est.quality.mean()) if est.quality.size else 0.5
        quality, cost, support = [], [], []
        for name in names:
            col = est.column(name)
            q = float(est.quality[0, col]) if col is not None else prior
            c = float(est.cost[0, col]) if col is not None else math.nan
            if math.isnan(c):
                c = backends[name].cost_model().predict(prompt_chars)
            quality.append(q)
            cost.append(c)
            support.append(float(est.support[0, col]) if col is not None else 0.0)
        if capability is not None:
            enc = capability.predict(embedding, [ests[scales.index(s)] for s in capability.scales])
            quality = [enc.get(n, q) for n, q in zip(names, quality)]
        return quality, cost, support

    def route(self, query: Query, *, dispatch: bool = False) -> Decision:
        """Decide for one prompt. dispatch: the decision is for Generate, so route-only backends
        (which caprouter cannot call) are not eligible."""
        rpc = "Generate" if dispatch else "Route"
        try:
            d = self._route(query, dispatch)
        except CaprouterError as e:
            self.telemetry.request(rpc, "", e.code.value.lower())
            raise
        self.telemetry.routing(d.timings.total_ms / 1e3)
        if not dispatch:
            self.telemetry.request(rpc, d.backend, "ok")
        c = d.selection.chosen
        log.info("routed to %s (quality %.3f, cost %.3g, %.1f ms)", d.backend, c.quality, c.cost, d.timings.total_ms,
                 extra={"decision_id": d.decision_id, "backend": d.backend, "rpc": rpc})
        return d

    def _route(self, query: Query, dispatch: bool) -> Decision:
        t0 = time.perf_counter()
        msgs = self._messages(query.prompt, query.messages)
        backends = self.backends      # one consistent set for this request, whatever Onboard does meanwhile
        names = list(backends)
        knobs = query.knobs.resolve(self.defaults, names)
        text = prompt_text(None, msgs)
        emb = self.encoder.encode([text])[0]
        t1 = time.perf_counter()
        quality, cost, support = self.predict(emb, sum(len(c) for _, c in msgs), backends)
        unavailable = self.unavailable(backends)
        route_only = sorted(n for n, b in backends.items() if b.kind == "route-only") if dispatch else []
        if dispatch:
            unavailable.update({n: "route-only (caprouter chooses it, the app calls it)" for n in route_only})
        try:
            selection = select(names, quality, cost, knobs, support=support, unavailable=unavailable)
            if knobs.budget is not None:
                selection = self._window_budget(knobs, names, quality, cost, support, unavailable, selection)
        except NoEligibleBackend:
            if route_only and len(route_only) == len(names):
                listed = ", ".join(map(repr, route_only))
                raise FailedPrecondition(
                    f"every backend of this server is route-only ({listed}): caprouter can choose them but cannot "
                    "call them. Use Route and call the chosen model yourself") from None
            raise
        t2 = time.perf_counter()
        decision = Decision(uuid.uuid4().hex, selection, Timings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3),
                            msgs, text, emb)
        self._remember(decision)
        return decision

    def _window_budget(self, knobs: Knobs, names: list[str], quality: list[float], cost: list[float],
                       support: list[float], unavailable: dict[str, str], eligible: Selection) -> Selection:
        ok = {s.backend for s in eligible.ranked}
        idx, lam = self._budgets.decide(knobs.budget_key, names, np.array(quality), np.array(cost), knobs.budget,
                                        np.array([n in ok for n in names]))
        sel = select(names, quality, cost, replace(knobs, cost_weight=lam), support=support, unavailable=unavailable)
        sel = promote(sel, names[idx])
        self._budgets.commit(knobs.budget_key, names, sel.chosen.cost)
        return sel

    def route_batch(self, items: Sequence[Query], knobs_in: KnobsInput) -> "BatchDecision":
        """Route prompts together. With a budget, the batch's average predicted cost keeps to it:
        one assignment problem over the batch (router.budget.assign), each prompt's assigned
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
        knobs = knobs_in.resolve(self.defaults, names)
        texts = [prompt_text(None, m) for m in msgs]
        embs = self.encoder.encode(texts)
        t1 = time.perf_counter()
        unavailable = self.unavailable(backends)
        preds, sels = [], []
        for i, (m, e) in enumerate(zip(msgs, embs)):
            q, c, s = self.predict(e, sum(len(x) for _, x in m), backends)
            try:
                sels.append(select(names, q, c, replace(knobs, cost_weight=0.0), support=s, unavailable=unavailable))
            except NoEligibleBackend as err:
                raise NoEligibleBackend(f"items[{i}]: {err}") from None
            preds.append((q, c, s))
        Q = np.array([p[0] for p in preds], dtype=np.float64)
        C = np.array([p[1] for p in preds], dtype=np.float64)
        eligible = np.array([[n in {x.backend for x in sel.ranked} for n in names] for sel in sels])
        lam = knobs.cost_weight
        if knobs.budget is not None:
            choice, lam = assign(Q, C, knobs.budget, eligible=eligible)
        else:
            choice = None
        t2 = time.perf_counter()
        decisions = []
        for i, ((q, c, s), m, text, e) in enumerate(zip(preds, msgs, texts, embs)):
            sel = select(names, q, c, replace(knobs, cost_weight=float(lam)), support=s, unavailable=unavailable)
            if choice is not None:
                sel = promote(sel, names[int(choice[i])])
            d = Decision(uuid.uuid4().hex, sel, Timings((t1 - t0) * 1e3 / len(items), (t2 - t1) * 1e3 / len(items),
                                                        (t2 - t0) * 1e3 / len(items)), m, text, e)
            self._remember(d)
            decisions.append(d)
        chosen = [d.selection.chosen for d in decisions]
        return BatchDecision(tuple(decisions), float(lam), float(np.mean([x.cost for x in chosen])),
                             float(np.mean([x.quality for x in chosen])))

    def _remember(self, d: Decision) -> None:
        with self._dlock:
            self._decisions[d.decision_id] = d
            while len(self._decisions) > self.config.routing.decision_cache_size:
                self._decisions.popitem(last=False)

    # ---- Generate ------------------------------------------------------------------------------
    def _gen_request(self, msgs: Sequence[tuple[str, str]], p: GenParams, embedding: Any = None) -> GenerationRequest:
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
        return GenerationRequest(messages=list(msgs), max_tokens=mt, temperature=temp, stop=list(p.stop), seed=p.seed,
                                 embedding=embedding)

    async def generate(self, query: Query, params: GenParams) -> AsyncIterator[GenStart | TextChunk | GenEnd]:
        """Route, then stream from the best backend; fall back down the ranking while nothing has
        been streamed yet. After the first chunk a failure ends the stream with BackendError."""
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        msgs = self._messages(query.prompt, query.messages)
        self._gen_request(msgs, params)  # validate before spending time on routing
        decision = await loop.run_in_executor(None, functools.partial(self.route, query, dispatch=True))
        fallbacks: list[tuple[str, str]] = []
        for cand in decision.selection.ranked:
            backend = self.backends[cand.backend]
            req = self._gen_request(msgs, params, decision.embedding)
            stream = backend.generate(req)
            started = False
            try:
                async for ev in stream:
                    if not started:
                        started = True
                        ttft = (time.perf_counter() - t0) * 1e3
                        yield GenStart(decision, cand.backend, tuple(fallbacks))
                    if isinstance(ev, Finished):
                        total = (time.perf_counter() - t0) * 1e3
                        self.telemetry.generation(cand.backend, total / 1e3, ttft / 1e3, ev.completion_tokens,
                                                  ev.tokens_per_second)
                        self.telemetry.request("Generate", cand.backend, "ok")
                        log.info("generated %d tokens in %.0f ms", ev.completion_tokens, total,
                                 extra={"decision_id": decision.decision_id, "backend": cand.backend, "rpc": "Generate"})
                        yield GenEnd(cand.backend, ev, total, ttft)
                        return
                    yield ev
                if not started:
                    raise BackendError(cand.backend, "ended without a result")
                raise BackendError(cand.backend, "stream ended without a finish event", tokens_streamed=1)
            except BackendError as e:
                if started:
                    self.telemetry.request("Generate", cand.backend, "unavailable")
                    raise BackendError(cand.backend, f"{e} (after streaming began; no fallback possible)",
                                       tokens_streamed=1) from e
                log.warning("backend %s failed before streaming, falling back: %s", cand.backend, e,
                            extra={"decision_id": decision.decision_id, "backend": cand.backend, "rpc": "Generate"})
                self.telemetry.fallback(cand.backend)
                fallbacks.append((cand.backend, str(e)))
            finally:
                req.cancel.set()
                await stream.aclose()
        tried = "; ".join(f"{b}: {err}" for b, err in fallbacks)
        self.telemetry.request("Generate", "", "unavailable")
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
        self.telemetry.request("Feedback", backend, "ok")
        return FeedbackResult(rid, backend)

    # ---- Onboard -------------------------------------------------------------------------------
    def attach_registry(self, registry: Any) -> int:
        """Use ``registry`` (an AppendLog of registrations) for Onboard, and replay what it holds.
        Returns the number of backends restored."""
        from router import onboarding as ob

        n = 0
        for e in ob.latest(registry.replayed):
            if e["backend"] in self._configured:
                log.warning("onboarded backend %s is now defined in the config; its registration is ignored",
                            e["backend"])
                continue
            emb = ob.entry_embeddings(e, self.encoder.model_id, self.encoder.dim, self.encoder)
            self._apply(ob.Registration.from_entry(e), emb)
            n += 1
        self._registry_log = registry
        return n

    def onboard(self, spec: Any) -> Any:
        """Register a backend, or replace an earlier registration, from its aptitude results.
        Durable once it returns; routable at once."""
        from router import onboarding as ob

        if self._registry_log is None:
            raise FailedPrecondition("this server has no state folder for registrations")
        if spec.backend in self._configured:
            raise FailedPrecondition(f"backend {spec.backend!r} is defined in the server's config; onboarding "
                                     "registers new route-only backends (send its outcomes with Feedback instead)")
        reg = ob.validate(spec, self._suite, max_prompt_chars=self.config.limits.max_prompt_chars)
        emb = self.encoder.encode(list(reg.prompts))
        with self._olock:
            created = reg.backend not in self.backends
            self._registry_log.append([reg.to_entry(self.encoder.model_id, emb)])   # durable from here on
            fitted = self._apply(reg, emb)
        log.info("onboarded backend %s (%s) from %d aptitude results, mean score %.3f", reg.backend,
                 "new" if created else "updated", len(reg.scores), float(np.mean(reg.scores)))
        return ob.OnboardResult(reg.backend, created, len(reg.scores), float(np.mean(reg.scores)), fitted)

    def _apply(self, reg: Any, emb: npt.NDArray[np.float32]) -> bool:
        from backends.route_only import RouteOnlyBackend
        from router.config import BackendConfig

        # Fitted first, while the datastore holds only the trained backends' outcomes on these
        # prompts (their residuals correct the fit; see Capability.with_backend).
        capability = None if self.capability is None else self.capability.with_backend(
            reg.backend, emb, np.asarray(reg.scores, dtype=np.float32), self.config.datastore, self.datastore)
        prev = self._registered.get(reg.backend)
        if prev is not None:
            self.datastore.retract(prev.record_ids(), reg.backend)
        self.datastore.insert(emb, reg.records())
        backend = RouteOnlyBackend(BackendConfig(name=reg.backend, kind="route-only", description=reg.description,
                                                 cost=reg.cost), cost_unit=self.config.routing.cost_unit)
        # Copy-on-write: a Route running concurrently sees the old set or the new one, never half.
        self.backends = {**self.backends, reg.backend: backend}
        self._registered[reg.backend] = reg
        if capability is None:
            return False
        self.capability = capability
        return True

    @functools.cached_property
    def _suite(self) -> dict[str, str]:
        """The aptitude suite's prompts by item id (read on the first Onboard)."""
        from router.aptitude.runner import suite_path
        from router.onboarding import load_suite_prompts

        return load_suite_prompts(suite_path(self.config.aptitude.suite))

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
        if self._registry_log is not None:
            self._registry_log.close()


__all__ = ["RouterService", "Query", "GenParams", "Decision", "GenStart", "GenEnd", "BackendView",
           "FeedbackResult", "CaprouterError"]
