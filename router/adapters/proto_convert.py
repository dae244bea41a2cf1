"""Conversion between caprouter.v1 wire messages and the core's dataclasses. The only module
that knows both sides."""
from __future__ import annotations

import math
import time
import uuid
from typing import Any

from backends.base import FinishReason, Status, TextChunk
from caprouter.v1 import router_pb2 as pb
from router.policy.selection import KnobsInput
from router.serving.keys import OPEN, Caller
from router.serving.registrations import AptitudeResult, OnboardResult, OnboardSpec
from router.serving.service import (
    BackendView,
    BatchDecision,
    Decision,
    GenEnd,
    GenParams,
    GenStart,
    Query,
    RouterService,
)

API_VERSION = "caprouter.v1"

FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
STATUS = {
    Status.READY: pb.BACKEND_STATUS_READY,
    Status.LOADING: pb.BACKEND_STATUS_LOADING,
    Status.UNAVAILABLE: pb.BACKEND_STATUS_UNAVAILABLE,
}


def metadata(svc: RouterService) -> pb.ResponseMetadata:
    return pb.ResponseMetadata(request_id=uuid.uuid4().hex, server_version=svc.version, api_version=API_VERSION,
                               embedder=svc.encoder.model_id, datastore_records=len(svc.datastore),
                               served_at_unix_ms=int(time.time() * 1000))


def knobs(k: pb.RoutingKnobs) -> KnobsInput:
    return KnobsInput(
        cost_weight=k.cost_weight if k.HasField("cost_weight") else None,
        min_quality=k.min_quality if k.HasField("min_quality") else None,
        max_cost=k.max_cost if k.HasField("max_cost") else None,
        allowed=tuple(k.allowed_backends), denied=tuple(k.denied_backends),
        budget=k.budget_per_request if k.HasField("budget_per_request") else None, budget_key=k.budget_key,
        max_queue_ms=k.max_queue_ms if k.HasField("max_queue_ms") else None)


def query(req: Any, caller: Caller = OPEN) -> Query:
    """RouteRequest or GenerateRequest (and who sent it) -> Query."""
    return Query(prompt=req.prompt, messages=messages(req), knobs=knobs(req.knobs), caller=caller)


def messages(req: Any) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, m.content) for m in req.messages)


def gen_params(p: pb.GenerationParams, time_remaining: float | None = None) -> GenParams:
    """``time_remaining``: seconds left of the caller's deadline (None: none set)."""
    return GenParams(max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
                     temperature=p.temperature if p.HasField("temperature") else None,
                     stop=tuple(p.stop), seed=p.seed if p.HasField("seed") else None,
                     deadline=None if time_remaining is None else time.monotonic() + time_remaining,
                     cache=p.cache if p.HasField("cache") else True)


def _candidates(d: Decision) -> list[pb.Candidate]:
    return [pb.Candidate(backend=s.backend, predicted_quality=s.quality, predicted_cost=s.cost, utility=s.utility,
                         rank=s.rank, support=s.support) for s in d.selection.ranked]


def _excluded(d: Decision) -> list[pb.Exclusion]:
    return [pb.Exclusion(backend=e.backend, reason=e.reason) for e in d.selection.excluded]


def _timings(d: Decision) -> pb.Timings:
    t = d.timings
    return pb.Timings(embedding_ms=t.embedding_ms, prediction_ms=t.prediction_ms, total_ms=t.total_ms)


def route_response(svc: RouterService, d: Decision) -> pb.RouteResponse:
    return pb.RouteResponse(metadata=metadata(svc), decision_id=d.decision_id, backend=d.backend,
                            candidates=_candidates(d), excluded=_excluded(d), timings=_timings(d),
                            cost_unit=svc.config.routing.cost_unit, cost_weight=d.selection.cost_weight)


def batch_items(req: pb.RouteBatchRequest) -> list[Query]:
    return [Query(prompt=it.prompt, messages=messages(it)) for it in req.items]


def batch_response(svc: RouterService, b: BatchDecision) -> pb.RouteBatchResponse:
    return pb.RouteBatchResponse(metadata=metadata(svc), decisions=[route_response(svc, d) for d in b.decisions],
                                 cost_weight=b.cost_weight, predicted_mean_cost=b.mean_cost,
                                 predicted_mean_quality=b.mean_quality, cost_unit=svc.config.routing.cost_unit)


def onboard_spec(req: pb.OnboardRequest) -> OnboardSpec:
    c = req.cost_model
    cost: dict[str, Any] = {"kind": c.kind or "per_request", "per_request": c.per_request,
                            "input_per_million_tokens": c.input_per_million_tokens,
                            "output_per_million_tokens": c.output_per_million_tokens,
                            "active_parameters": c.active_parameters or None,
                            "price_per_gflop": c.price_per_gflop or 1.0}
    if c.expected_output_tokens:
        cost["expected_output_tokens"] = c.expected_output_tokens
    results = [AptitudeResult(score=r.score, item_id=r.item_id, prompt=r.prompt,
                              cost=r.cost if r.HasField("cost") else None) for r in req.results]
    return OnboardSpec(backend=req.backend, results=results, cost=cost, description=req.description)


def onboard_response(svc: RouterService, r: OnboardResult) -> pb.OnboardResponse:
    view = next(v for v in svc.list_backends() if v.name == r.backend)
    return pb.OnboardResponse(metadata=metadata(svc), backend=backend_info(view), created=r.created,
                              results_used=r.results, mean_score=r.mean_score, capability_fitted=r.capability_fitted)


def generate_chunk(svc: RouterService, ev: GenStart | TextChunk | GenEnd) -> pb.GenerateChunk:
    if isinstance(ev, GenStart):
        d = ev.decision
        start = pb.GenerateStart(decision_id=d.decision_id, backend=ev.backend, candidates=_candidates(d),
                                 excluded=_excluded(d), timings=_timings(d), cost_unit=svc.config.routing.cost_unit,
                                 cost_weight=d.selection.cost_weight,
                                 fallbacks=[pb.FallbackAttempt(backend=b, error=e) for b, e in ev.fallbacks],
                                 cache=ev.cache.kind if ev.cache else "",
                                 cache_similarity=ev.cache.similarity if ev.cache else 0.0)
        return pb.GenerateChunk(metadata=metadata(svc), start=start)
    if isinstance(ev, TextChunk):
        return pb.GenerateChunk(text=ev.text)
    f = ev.finished
    return pb.GenerateChunk(end=pb.GenerateEnd(
        finish_reason=FINISH[f.reason], usage=pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens),
        latency_ms=ev.latency_ms, time_to_first_token_ms=ev.ttft_ms, tokens_per_second=f.tokens_per_second, backend=ev.backend))


def backend_info(v: BackendView) -> pb.BackendInfo:
    c = v.cost_model
    cm = pb.CostModel(kind=c.kind, unit=c.unit, per_request=c.per_request,
                      input_per_million_tokens=c.input_per_million_tokens,
                      output_per_million_tokens=c.output_per_million_tokens, active_parameters=c.active_parameters,
                      expected_output_tokens=c.expected_output_tokens, summary=c.summary(),
                      price_per_gflop=c.price_per_gflop if c.kind == "compute" else 0.0)
    q, c2 = v.queue, v.capabilities
    queue = None if q is None else pb.QueueInfo(running=q.running, waiting=q.waiting, max_batch=q.max_batch,
                                                max_queue=q.max_queue, expected_wait_ms=q.expected_wait_s * 1e3)
    return pb.BackendInfo(name=v.name, kind=v.kind, cost_model=cm, status=STATUS[v.status], description=v.description,
                          status_detail=v.detail, prior_quality=0.0 if math.isnan(v.prior_quality) else v.prior_quality,
                          outcomes=v.outcomes, queue=queue, capabilities=pb.Capabilities(
                              context_window=c2.context_window or 0, max_output_tokens=c2.max_output_tokens or 0,
                              tools=c2.tools, json_mode=c2.json_mode, params=sorted(c2.params)))
