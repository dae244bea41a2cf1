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
    caprouter_queue_running{backend}                    requests decoding in a local backend's batch
    caprouter_queue_waiting{backend}                    requests queued behind it
    caprouter_queue_expected_wait_seconds{backend}      how long a request arriving now would wait
    caprouter_routing_pending                           prompts waiting for the routing batcher
    caprouter_routing_expected_wait_seconds
Refusals under overload count in caprouter_requests_total with status="resource_exhausted".
"""
from __future__ import annotations

from collections.abc import Callable


class Telemetry:
    """No-op base: every hook is optional for a caller that wants none."""

    def request(self, rpc: str, backend: str, status: str) -> None: ...

    def routing(self, seconds: float) -> None: ...

    def generation(self, backend: str, seconds: float, ttft_s: float, tokens: int, tokens_per_s: float) -> None: ...

    def fallback(self, backend: str) -> None: ...

    def cache(self, backend: str, result: str) -> None:
        """An answer-cache lookup: result "exact", "semantic" (hits) or "miss"."""

    def watch_datastore(self, size: Callable[[], int]) -> None: ...

    def watch_queues(self, backends: Callable[[], dict[str, tuple[int, int, float]]],
                     routing: Callable[[], tuple[int, float]]) -> None:
        """backends(): {name: (running, waiting, expected wait s)} of the backends that queue;
        routing(): (prompts pending, expected wait s). Read at scrape time."""

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
        self._cache = Counter("caprouter_answer_cache_lookups", "Answer-cache lookups by result (exact, semantic, miss)",
                              ["backend", "result"], registry=r)

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

    def cache(self, backend: str, result: str) -> None:
        self._cache.labels(backend, result).inc()

    def watch_datastore(self, size: Callable[[], int]) -> None:
        self._ds.set_function(lambda: float(size()))

    def watch_queues(self, backends: Callable[[], dict[str, tuple[int, int, float]]],
                     routing: Callable[[], tuple[int, float]]) -> None:
        from prometheus_client.metrics_core import GaugeMetricFamily

        class Queues:
            def collect(self):
                names = ("running", "waiting", "expected_wait_seconds")
                fams = [GaugeMetricFamily(f"caprouter_queue_{n}", f"Local backend queue: {n.replace('_', ' ')}",
                                          labels=["backend"]) for n in names]
                for b, values in backends().items():
                    for fam, v in zip(fams, values):
                        fam.add_metric([b], float(v))
                pending, wait = routing()
                yield from fams
                yield GaugeMetricFamily("caprouter_routing_pending", "Prompts waiting for the routing batcher",
                                        value=float(pending))
                yield GaugeMetricFamily("caprouter_routing_expected_wait_seconds",
                                        "Expected wait of a prompt arriving at the routing batcher now", value=wait)
        self.registry.register(Queues())

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
