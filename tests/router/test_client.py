"""router.client against the real server over real gRPC: typed results, streaming, deadlines,
retries with backoff on UNAVAILABLE."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest

from router.client import AptitudeResult, AsyncClient, Client, CostModel, Retry

pytestmark = pytest.mark.slow


def test_route_generate_feedback_and_backends(live_server):
    with Client(live_server.address) as c:
        d = c.route("What is 7 + 5?", cost_weight=0.04)
        assert d.decision_id and d.backend == d.candidates[0].backend and d.cost_unit == "GFLOP"
        assert [x.rank for x in d.candidates] == list(range(1, len(d.candidates) + 1))
        forced = c.route(messages=[("user", "Hi there")], allowed=["smollm2-135m"])
        assert forced.backend == "smollm2-135m"
        chunks = list(c.generate("What is the capital of France?", max_tokens=8, allowed=["smollm2-135m"]))
        assert chunks[0].decision is not None and chunks[0].backend == "smollm2-135m"
        assert chunks[-1].finish_reason in ("stop", "length") and 1 <= chunks[-1].completion_tokens <= 8
        assert "Paris" in "".join(x.text for x in chunks)
        c.feedback(d.decision_id, 1.0)
        with pytest.raises(grpc.RpcError) as e:
            c.feedback("no-such-decision", 1.0)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        names = {b.name: b for b in c.list_backends()}
        assert names["smollm2-135m"].status == "ready" and names["smollm2-135m"].kind == "transformers"
        with pytest.raises(ValueError, match="exactly one"):
            c.route()


def test_async_client(live_server):
    async def go():
        async with AsyncClient(live_server.address) as c:
            d = await c.route("Name a colour.")
            text = [x.text async for x in c.generate("Name a colour.", max_tokens=6)]
            await c.feedback(d.decision_id, 0.5)
            return d, text, await c.list_backends()

    d, text, backends = asyncio.run(go())
    assert d.backend and "".join(text).strip() and len(backends) == 2


def test_deadline_is_passed_to_the_server(live_server):
    with Client(live_server.address) as c:
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate("Write a long story about a ship.", max_tokens=400, timeout=0.5))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unavailable_is_retried_with_backoff_then_raised():
    retry = Retry(attempts=3, initial_s=0.2, factor=2.0)
    with Client(f"127.0.0.1:{_free_port()}", timeout=2, retry=retry) as c:
        t = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            c.route("hello")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.perf_counter() - t >= 0.1 + 0.2     # two jittered waits, at least half of 0.2 and 0.4


def test_a_loading_server_is_waited_for(tmp_path, models_dir):
    from tests.conftest import LiveServer, default_config

    srv = LiveServer(default_config(tmp_path, models_dir))    # listening, still loading: UNAVAILABLE
    try:
        threading.Thread(target=lambda: srv.call(srv.server.load_and_serve()), daemon=True).start()
        with Client(srv.address, retry=Retry(attempts=60, initial_s=0.2, max_s=1.0)) as c:
            assert c.route("What is 2 + 2?").backend
            # The calls the CLI is built on, on a server of this test's own (Onboard adds a backend).
            results = ([AptitudeResult(score=1.0, item_id=f"arithmetic-{i:03d}") for i in range(10)]
                       + [AptitudeResult(score=0.0, prompt=f"Name a colour, number {i}.", cost=3.0) for i in range(5)])
            ob = c.onboard("calc@lab", results, cost=CostModel.of(price_in=0.2, price_out=0.6), description="calc")
            assert ob.created and ob.results_used == 15 and ob.backend.name == "calc@lab"
            assert ob.backend.kind == "route-only" and "per million tokens" in ob.backend.cost
            b = c.route_batch(["What is 4 + 9?", [("user", "Write a haiku about tea.")]], cost_weight=0.0)
            assert len(b.decisions) == 2 and b.cost_unit == "GFLOP"
            assert all({x.backend for x in d.candidates} >= {"calc@lab"} for d in b.decisions)
            fb = c.feedback("", 0.0, prompt="What is 4 + 9?", backend="calc@lab", cost=1.5)
            assert fb.backend == "calc@lab" and fb.record_id
            assert {x.name: x.outcomes for x in c.list_backends()}["calc@lab"] == 16

            async def asynchronous():
                async with AsyncClient(srv.address) as ac:
                    again = await ac.onboard("calc@lab", results[:10], cost=CostModel.of(per_request=2.0))
                    batch = await ac.route_batch(["What is 1 + 1?"], allowed=["calc@lab"])
                    return again, batch
            again, batch = asyncio.run(asynchronous())
            assert not again.created and again.results_used == 10 and batch.decisions[0].backend == "calc@lab"
    finally:
        srv.stop()
