"""Batched routing: concurrent callers share encoder calls and predictions, and get the
decisions they get alone; a lone caller is not held back; a full queue refuses at once."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backends.base import QueueStats
from datastore.store import FaissKnnDatastore
from router.core.config import AppConfig
from router.core.errors import Overloaded
from router.policy.selection import KnobsInput
from router.prediction.predictor import Prediction
from router.serving.route_batching import RouteBatcher
from router.serving.service import Query, RouterService
from tests.fakes import OUTCOMES, ScriptedBackend, WordEncoder, write_outcomes

PROMPTS = ["What is 40 + 2?", "Write a poem about the stars.", "Compute 7 times 6.", "A haiku on rain, please.",
           "Solve 3x = 12.", "Tell a story about a fox.", "What is 9 - 4?", "Describe the sea in verse."] * 2


class CountingEncoder(WordEncoder):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.delay = delay

    def encode(self, texts):
        self.batches.append(len(texts))
        time.sleep(self.delay)         # a real encoder's time, so that callers pile up behind it
        return super().encode(texts)


@pytest.fixture
def make_service(tmp_path):
    def make(encoder, backends=None, **routing):
        src = write_outcomes(tmp_path / "o.jsonl", OUTCOMES)
        ds = FaissKnnDatastore.open(tmp_path / "state", WordEncoder(), [src], k=8, progress=False)
        cfg = AppConfig.model_validate({"routing": {"cost_unit": "USD", "decision_cache_size": 1000, **routing}})
        backends = backends or [ScriptedBackend("mathy"), ScriptedBackend("wordy", per_request=0.5)]
        return RouterService(cfg, encoder, ds, {b.name: b for b in backends})
    return make


def _summary(d):
    return [(c.backend, round(c.quality, 5), round(c.cost, 9), c.rank) for c in d.selection.ranked]


def test_concurrent_routes_share_encoder_calls_and_decide_as_alone(make_service):
    alone_svc = make_service(CountingEncoder())
    alone = [_summary(alone_svc.route(Query(prompt=p, knobs=KnobsInput(cost_weight=0.1)))) for p in PROMPTS]
    enc = CountingEncoder(delay=0.02)
    svc = make_service(enc, batch_window_ms=5)
    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(lambda p: _summary(svc.route(Query(prompt=p, knobs=KnobsInput(cost_weight=0.1)))),
                          PROMPTS))
    assert got == alone
    assert sum(enc.batches) == len(PROMPTS) and max(enc.batches) > 1 and len(enc.batches) < len(PROMPTS)


def test_route_batch_and_async_routes_ride_the_same_batcher(make_service):
    import asyncio

    enc = CountingEncoder(delay=0.02)
    svc = make_service(enc)
    alone = [_summary(make_service(CountingEncoder()).route(Query(prompt=p))) for p in PROMPTS[:4]]

    async def many():
        return await asyncio.gather(*(svc.route_async(Query(prompt=p)) for p in PROMPTS[:4]))
    ds = asyncio.run(many())
    assert [_summary(d) for d in ds] == alone
    assert sum(enc.batches) == 4 and len(enc.batches) < 4       # they shared encoder calls
    b = svc.route_batch([Query(prompt=p) for p in PROMPTS[:4]], KnobsInput())
    assert [d.backend for d in b.decisions] == [a[0][0] for a in alone]


def test_a_lone_caller_is_not_held_for_the_window(make_service):
    svc = make_service(CountingEncoder(), batch_window_ms=500)
    svc.route(Query(prompt="warm up"))
    t = time.perf_counter()
    svc.route(Query(prompt="What is 40 + 2?"))
    assert time.perf_counter() - t < 0.25          # nobody else was arriving: no 500 ms wait


def _pred(X, chars, backends):
    n = len(chars)
    return Prediction(tuple(backends), np.zeros((n, len(backends)), np.float32),
                      np.zeros((n, len(backends))), np.zeros((n, len(backends)), np.float32))


def test_the_window_waits_for_callers_on_their_way_in():
    calls: list[int] = []

    def encode(texts):
        calls.append(len(texts))
        return np.zeros((len(texts), 4), np.float32)
    b = RouteBatcher(encode, _pred, window_s=0.5, max_prompts=64, max_pending=100)
    b.arrive()
    b.arrive()
    f1 = b.submit(["a"], [1], {"x": None}, arrived=True)
    time.sleep(0.05)                    # the second caller is still validating
    f2 = b.submit(["b"], [1], {"x": None}, arrived=True)
    assert f1.result(5).batch_prompts == f2.result(5).batch_prompts == 2 and calls == [2]
    b.close()


def test_a_full_routing_queue_refuses_at_once_and_errors_reach_every_caller():
    gate, entered = threading.Event(), threading.Event()

    def encode(texts):
        entered.set()
        gate.wait(5)
        if "boom" in texts:
            raise RuntimeError("encoder boom")
        return np.zeros((len(texts), 4), np.float32)
    b = RouteBatcher(encode, _pred, window_s=0.0, max_prompts=4, max_pending=3)
    first = b.submit(["a"], [1], {"x": None})
    assert entered.wait(5)              # "a" is being encoded; the next three wait
    waiting = [b.submit([t], [1], {"x": None}) for t in ("boom", "c", "d")]
    t = time.perf_counter()
    with pytest.raises(Overloaded, match="routing is saturated") as e:
        b.submit(["e"], [1], {"x": None})
    assert time.perf_counter() - t < 0.05 and e.value.retry_after_s > 0
    gate.set()
    assert first.result(5).embeddings.shape == (1, 4)
    for f in waiting:                   # one batch of three, failed together
        with pytest.raises(RuntimeError, match="encoder boom"):
            f.result(5)
    assert b.submit(["later"], [1], {"x": None}).result(5).batch_prompts == 1     # the thread goes on
    b.close()


def test_async_callers_get_their_rows_errors_and_cancellation_in_one_wake_up():
    import asyncio

    gate = threading.Event()

    def encode(texts):
        gate.wait(5)
        if "boom" in texts:
            raise RuntimeError("encoder boom")
        return np.array([[float(t == "b"), 1.0, 0.0, 0.0] for t in texts], np.float32)
    b = RouteBatcher(encode, _pred, window_s=0.0, max_prompts=8, max_pending=100)

    async def main():
        first = b.submit_async(["a"], [1], {"x": None})            # taken alone; the rest queue behind it
        await asyncio.sleep(0.05)
        mine = [b.submit_async([t], [1], {"x": None}) for t in ("a", "b", "c")]
        gone = b.submit_async(["d"], [1], {"x": None})
        gone.cancel()                                              # its caller left while queued
        gate.set()
        got = await asyncio.gather(first, *mine)
        assert [r.embeddings[0, 0] for r in got] == [0.0, 0.0, 1.0, 0.0]   # each caller its own row
        assert [r.batch_prompts for r in got] == [1, 4, 4, 4]              # the cancelled one still rode
        failed = [b.submit_async([t], [1], {"x": None}) for t in ("boom", "e")]
        for f in failed:
            with pytest.raises(RuntimeError, match="encoder boom"):
                await f
    asyncio.run(main())
    b.close()


class QueuedBackend(ScriptedBackend):
    def __init__(self, name, wait_s, waiting=6, **kw):
        super().__init__(name, **kw)
        self.wait_s, self.waiting = wait_s, waiting

    def queue_stats(self):
        return QueueStats(4, self.waiting, 4, 32, self.wait_s)


def test_max_queue_ms_skips_a_saturated_backend_for_the_next_best(make_service):
    svc = make_service(CountingEncoder(), [QueuedBackend("mathy", 2.0), QueuedBackend("wordy", 0.01)])
    q = "What is 40 + 2?"
    assert svc.route(Query(prompt=q)).backend == "mathy"
    d = svc.route(Query(prompt=q, knobs=KnobsInput(max_queue_ms=500)))
    assert d.backend == "wordy"
    why = dict((e.backend, e.reason) for e in d.selection.excluded)
    assert "saturated" in why["mathy"] and "2000 ms > max_queue_ms 500" in why["mathy"]
    assert make_service(CountingEncoder(), [QueuedBackend("mathy", 2.0), QueuedBackend("wordy", 0.01)],
                        max_queue_ms=100).route(Query(prompt=q)).backend == "wordy"      # the config default
    views = {v.name: v for v in svc.list_backends()}
    assert views["mathy"].queue.expected_wait_s == 2.0


def test_generate_is_refused_before_routing_when_every_eligible_queue_is_full(make_service):
    import asyncio

    from router.serving.service import GenParams

    enc = CountingEncoder()
    full, free = QueuedBackend("mathy", 2.0, waiting=32), QueuedBackend("wordy", 0.1, waiting=32)
    svc = make_service(enc, [full, free])

    async def gen(**knobs):
        return [ev async for ev in svc.generate(Query(prompt="What is 40 + 2?", knobs=KnobsInput(**knobs)),
                                                GenParams(max_tokens=2))]
    with pytest.raises(Overloaded, match="every eligible backend is saturated") as e:
        asyncio.run(gen())
    assert enc.batches == [] and e.value.retry_after_s == 0.1          # refused before any embedding
    free.waiting = 0
    assert asyncio.run(gen())                                          # one with room: served
    with pytest.raises(Overloaded):
        asyncio.run(gen(allowed=("mathy",)))                          # only the full one allowed
