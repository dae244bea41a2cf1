"""Traces: OpenTelemetry spans of the request path, so that a slow request can be broken down.

    caprouter.route           one Route, or the routing of a Generate (decision id, backend, scores)
      caprouter.route.queue   waiting for a routing batch (batched routing, route_batching.py)
      caprouter.route.embed   the batch's encoder call (attribute: prompts in the batch)
      caprouter.route.predict the batch's kNN search and capability blend
      caprouter.route.decide  eligibility and the policy, for this request
    caprouter.generate        a whole Generate (decision id, backend that answered, tokens)
      caprouter.route         as above
      caprouter.dispatch      one attempt on one backend (a failed one before a fallback too)
        caprouter.queue       in the backend's queue, until its scheduler starts the request
        caprouter.first_token from the start (or dispatch) to the first streamed chunk
        caprouter.decode      from the first chunk to the last

The gRPC server's own span (opentelemetry-instrumentation-grpc's interceptor) and the HTTP
server's (``router.adapters.http_server``'s middleware) are their parents, with W3C trace context taken from the caller's
metadata or headers. Batch work is shared by the requests of one batch: each request's embed and
predict spans carry the batch's times.

Off by default (``tracing.enabled``): the tracer is then OpenTelemetry's no-op one. Spans are
exported over OTLP/gRPC when ``tracing.otlp_endpoint`` is set, and to whatever processor the
composition root adds (the tests use the SDK's in-memory exporter).
"""
from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Status, StatusCode

from router import __version__
from router.core.config import TracingConfig

log = logging.getLogger(__name__)

DECISION_ID = "caprouter.decision_id"
BACKEND = "caprouter.backend"


def tracer_provider(cfg: TracingConfig) -> trace.TracerProvider:
    """The provider the config asks for: the no-op one when tracing is off."""
    if not cfg.enabled:
        return trace.NoOpTracerProvider()
    provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name,
                                                        "service.version": __version__}),
                              sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
    if cfg.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint,
                                                                        insecure=cfg.otlp_insecure)))
        log.info("exporting traces to %s over OTLP/gRPC", cfg.otlp_endpoint)
    return provider


def span_between(tracer: trace.Tracer, name: str, start_ns: int, end_ns: int, parent: trace.Span,
                 **attributes: Any) -> None:
    """A finished span of known times under ``parent`` (work done elsewhere: a shared batch)."""
    ctx = trace.set_span_in_context(parent)
    span = tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(end_ns, start_ns))


def failed(span: trace.Span, e: BaseException) -> None:
    span.record_exception(e)
    span.set_status(Status(StatusCode.ERROR, str(e)[:200]))
