"""What the service reports as it works (``Telemetry``), and its Prometheus implementation.

The core calls the interface; it never imports prometheus_client. ``PrometheusTelemetry`` keeps
its own registry (no process globals), exposed by the HTTP adapter on ``/metrics``:

    caprouter_requests_total{rpc, backend, status}      Route / Generate / Feedback outcomes
    caprouter_routing_seconds                           embed + predict + select, per decision
    caprouter_generation_seconds{backend}               request arrival to last token
    caprouter_time_to_first_token_seconds{backend}
    caprouter_generated_tokens_total{backend}
    caprouter_decode_tokens_per_second{backend}         per generation
    caprouter_fallbacks_total{backend}                  dispatches that failed before the first token
    caprouter_datastore_records                         outcomes the predictions draw on
"""
from __future__ import annotations

from collections.abc import Callable


class Telemetry:
    """No-op base: every hook is optional for a caller that wants none."""

    def request(self, rpc: str, backend: str, status: str) -> None: ...

    def routing(self, seconds: float) -> None: ...

    def generation(self, backend: str, seconds: float, ttft_s: float, tokens: int, tokens_per_s: float) -> None: ...

    def fallback(self, backend: str) -> None: ...

    def watch_datastore(self, size: Callable[[], int]) -> None: ...

    def exposition(self) -> tuple[bytes, str]:
        return b"", "text/plain"


class PrometheusTelemetry(Telemetry):
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self._requests = Counter("caprouter_requests", "Requests by RPC, backend and outcome",
                                 ["rpc", "backend", "status"], registry=r)
        self._routing = Histogram("caprouter_routing_seconds", "Time to decide (embed, predict, select)",
                                  buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        lat = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self._gen = Histogram("caprouter_generation_seconds", "Generate: arrival to last token", ["backend"],
                              buckets=lat, registry=r)
        self._ttft = Histogram("caprouter_time_to_first_token_seconds", "Generate: arrival to first token",
                               ["backend"], buckets=lat, registry=r)
        self._tokens = Counter("caprouter_generated_tokens", "Completion tokens generated", ["backend"], registry=r)
        self._tps = Histogram("caprouter_decode_tokens_per_second", "Decode speed of each generation", ["backend"],
                              buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 640), registry=r)
        self._fallbacks = Counter("caprouter_fallbacks", "Dispatches that failed before the first token",
                                  ["backend"], registry=r)
        self._ds = Gauge("caprouter_datastore_records", "Outcomes in the datastore", registry=r)

    def request(self, rpc: str, backend: str, status: str) -> None:
        self._requests.labels(rpc, backend or "-", status).inc()

    def routing(self, seconds: float) -> None:
        self._routing.observe(seconds)

    def generation(self, backend: str, seconds: float, ttft_s: float, tokens: int, tokens_per_s: float) -> None:
        self._gen.labels(backend).observe(seconds)
        self._ttft.labels(backend).observe(ttft_s)
        self._tokens.labels(backend).inc(tokens)
        if tokens_per_s > 0:
            self._tps.labels(backend).observe(tokens_per_s)

    def fallback(self, backend: str) -> None:
        self._fallbacks.labels(backend).inc()

    def watch_datastore(self, size: Callable[[], int]) -> None:
        self._ds.set_function(lambda: float(size()))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
