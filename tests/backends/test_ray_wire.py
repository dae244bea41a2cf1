"""What crosses the Ray boundary for a generation: the deadline as seconds left, and a replica's
refusal as RESOURCE_EXHAUSTED on the router's side (Ray itself is exercised in
tests/router/adapters/test_ray_serve.py)."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from backends.base import GenerationRequest
from backends.ray_serve import BackendReplica, RayBackend, _request_dict
from router.core.errors import Overloaded


def test_the_deadline_travels_as_seconds_left_and_comes_back_as_a_local_deadline():
    req = GenerationRequest(messages=[("user", "hi")], deadline=time.monotonic() + 5.0)
    wire = _request_dict(req)
    assert 4.5 < wire["seconds_left"] <= 5.0
    assert _request_dict(GenerationRequest(messages=[("user", "hi")]))["seconds_left"] is None

    seen = {}

    class Saturated:
        async def generate(self, r):
            seen["deadline"] = r.deadline
            raise Overloaded("queue full", retry_after_s=0.7)
            yield  # pragma: no cover - an async generator that refuses at once

    async def replica_events():
        return [ev async for ev in BackendReplica.generate(SimpleNamespace(backend=Saturated()), dict(wire))]
    t = time.monotonic()
    assert asyncio.run(replica_events()) == [("overloaded", "queue full", 0.7)]
    after = time.monotonic()
    # the replica's deadline: its own clock when the request arrived, plus the seconds left
    assert 4.0 < seen["deadline"] - t <= 5.0 + (after - t)


def test_a_replica_refusal_is_overloaded_on_the_router_side():
    class Stream:
        def __init__(self, events):
            self.events = events

        def remote(self, _req):
            events = self.events

            class Gen:                       # what a Serve streaming handle call returns
                def __aiter__(self):
                    async def gen():
                        for ev in events:
                            yield ev
                    return gen()

                def cancel(self):
                    pass
            return Gen()

    b = RayBackend.__new__(RayBackend)
    b.name = "dense"
    b._ray = SimpleNamespace(chunk_timeout_s=5, first_chunk_timeout_s=5)
    b._stream = SimpleNamespace(generate=Stream([("overloaded", "backend 'dense' is saturated", 1.5)]))

    async def run():
        return [ev async for ev in b.generate(GenerationRequest(messages=[("user", "hi")]))]
    with pytest.raises(Overloaded, match="saturated") as e:
        asyncio.run(run())
    assert e.value.retry_after_s == 1.5
