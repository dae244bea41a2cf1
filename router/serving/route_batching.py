"""Batched routing: concurrent Route, Generate and RouteBatch calls share one encoder call and one
prediction (one FAISS search) instead of each embedding its prompt alone.

Why: MiniLM embeds a batch of 16 short prompts at several times its one-at-a-time rate on this
CPU (``benchmarks/load.py`` prints both next to the Route figures), and the kNN search and the
capability blend are matrix operations that cost about the same for 1 or 64 rows.

How (dynamic batching, as Triton's dynamic batcher or TF Serving's batching session): callers
submit their prompts and get a future; one thread takes whatever is queued, waits up to
``window_s`` for more while other callers are known to be on their way in (between entering the
service and submitting) or fewer are queued than the last batch held, then embeds and predicts
the lot. A lone caller is never held back: with nobody else arriving and a last batch of one, it
runs at once. While a batch computes, newcomers queue and form the
next one, so under load batches grow by themselves.

Bounded: at most ``max_pending`` prompts wait; beyond that a caller is refused at once with
Overloaded (RESOURCE_EXHAUSTED), the expected wait being the queue over the measured rate.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from router.core.errors import Overloaded
from router.prediction.predictor import Prediction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routed:
    """What one submission gets back: its rows of the batch's embeddings and predictions."""

    embeddings: npt.NDArray[np.float32]     # (n, d), unit rows
    prediction: Prediction                   # n prompts over the submission's backends (empty when none)
    embedding_ms: float                      # the batch's encoder call
    prediction_ms: float                     # the batch's prediction
    batch_prompts: int                       # prompts in the batch it rode in
    # Wall-clock times (time.time_ns) of the batch, for traces: taken from the queue, embedded,
    # predicted.
    started_ns: int = 0
    embedded_ns: int = 0
    predicted_ns: int = 0


@dataclass(eq=False)
class _Item:
    texts: Sequence[str]
    chars: Sequence[int]
    backends: Mapping[str, Any] | None      # None: embed only (Feedback)
    future: Future[Routed] | asyncio.Future[Routed]
    loop: asyncio.AbstractEventLoop | None = None     # set: ``future`` is that loop's


def _resolve(done: list[tuple[asyncio.Future[Routed], Routed | BaseException]]) -> None:
    """On the event loop: hand each waiting coroutine its result (one wake-up for a whole batch)."""
    for fut, res in done:
        if fut.done():                  # its caller was cancelled meanwhile
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


Encode = Callable[[Sequence[str]], npt.NDArray[np.float32]]
Predict = Callable[[npt.NDArray[np.float32], Sequence[int], Mapping[str, Any]], Prediction]


class RouteBatcher:
    def __init__(self, encode: Encode, predict: Predict, *, window_s: float, max_prompts: int,
                 max_pending: int) -> None:
        self._encode = encode
        self._predict = predict
        self.window_s = window_s
        self.max_prompts = max_prompts
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending = 0               # prompts queued
        self._arriving = 0              # callers between arrive() and submit()
        self._closed = False
        self._s_per_prompt = 0.005      # EWMA of batch seconds per prompt, for the expected wait
        self._last_batch = 1            # prompts in the last batch taken
        self.batches = 0
        self.prompts = 0
        self._thread: threading.Thread | None = None     # started by the first submission

    # ---- callers ----------------------------------------------------------------------------
    def arrive(self) -> None:
        """A caller is on its way (validating): the batcher may wait the window for it."""
        with self._cond:
            self._arriving += 1

    def submit(self, texts: Sequence[str], chars: Sequence[int], backends: Mapping[str, Any] | None, *,
               arrived: bool = False) -> Future[Routed]:
        """Queue prompts for the next batch (``backends`` None: embeddings only, no prediction).
        ``arrived``: this caller called ``arrive`` first."""
        fut: Future[Routed] = Future()
        self._enqueue(_Item(texts, chars, backends, fut), arrived)
        return fut

    def submit_async(self, texts: Sequence[str], chars: Sequence[int], backends: Mapping[str, Any] | None, *,
                     arrived: bool = False) -> asyncio.Future[Routed]:
        """``submit`` for a coroutine: a future of the running loop. The batcher resolves all of a
        batch's futures of one loop in one ``call_soon_threadsafe``: one per future (what
        ``asyncio.wrap_future`` does) wrote the loop's self-pipe once per caller, each write
        giving up the GIL and waiting to get it back behind the other threads (profiled at 16
        callers: a quarter of this thread's time)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Routed] = loop.create_future()
        self._enqueue(_Item(texts, chars, backends, fut, loop), arrived)
        return fut

    def _enqueue(self, item: _Item, arrived: bool) -> None:
        texts = item.texts
        with self._cond:
            if arrived:
                self._arriving -= 1
            if self._closed:
                raise RuntimeError("the route batcher is closed")
            if self._pending + len(texts) > self.max_pending and self._pending:
                wait = self._wait_locked()
                raise Overloaded(f"routing is saturated: {self._pending} prompts wait to be embedded "
                                 f"(max_pending {self.max_pending}), expected wait {wait * 1e3:.0f} ms; retry later",
                                 retry_after_s=wait)
            self._queue.append(item)
            self._pending += len(texts)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="route-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def left(self) -> None:
        """A caller that arrived but will not submit (its request was invalid)."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify()

    @property
    def pending(self) -> int:
        return self._pending

    def expected_wait_s(self) -> float:
        with self._cond:
            return self._wait_locked()

    def _wait_locked(self) -> float:
        return self._pending * self._s_per_prompt

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the batching thread ---------------------------------------------------------------
    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            # Wait up to the window while more prompts are on their way: callers already inside
            # the service, or, under load, as many as the last batch held (closed-loop callers
            # come back within a millisecond or two of their answer). A lone caller (last batch
            # of one, nobody arriving) never waits.
            until = time.monotonic() + self.window_s
            expect = min(self.max_prompts, self._last_batch)
            while (self._arriving > 0 or self._pending < expect) and self._pending < self.max_prompts:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            items: list[_Item] = []
            n = 0
            while self._queue and (not items or n + len(self._queue[0].texts) <= self.max_prompts):
                it = self._queue.popleft()
                items.append(it)
                n += len(it.texts)
            self._pending -= n
            self._last_batch = n
            return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            try:
                results: list[Routed | BaseException] = list(self._serve(items))
            except BaseException as e:         # every waiting caller hears of it; the thread goes on
                results = [e] * len(items)
            self._deliver(items, results)

    @staticmethod
    def _deliver(items: list[_Item], results: list[Routed | BaseException]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Routed], Routed | BaseException]]] = {}
        for it, res in zip(items, results, strict=True):
            if it.loop is not None:
                by_loop.setdefault(it.loop, []).append((it.future, res))   # type: ignore[arg-type]
            elif isinstance(res, BaseException):
                it.future.set_exception(res)
            else:
                it.future.set_result(res)
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, done)
            except RuntimeError:            # the loop closed: nobody waits any more
                pass

    def _serve(self, items: list[_Item]) -> list[Routed]:
        texts = [t for it in items for t in it.texts]
        ns0 = time.time_ns()
        t0 = time.perf_counter()
        X = self._encode(texts)
        t1 = time.perf_counter()
        ns1 = time.time_ns()
        # Usually one group: items differ in backends only when an Onboard lands between them.
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(id(it.backends), []).append(i)
        starts = np.cumsum([0] + [len(it.texts) for it in items])
        preds: dict[int, Prediction] = {}
        for idx in groups.values():
            backends = items[idx[0]].backends
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in idx])
            if backends is None:
                n = len(rows)
                preds[idx[0]] = Prediction((), np.empty((n, 0), np.float32), np.empty((n, 0)),
                                           np.empty((n, 0), np.float32))
                continue
            chars = [c for i in idx for c in items[i].chars]
            preds[idx[0]] = self._predict(X[rows], chars, backends)
        t2 = time.perf_counter()
        ns2 = time.time_ns()
        with self._cond:
            self._s_per_prompt = 0.8 * self._s_per_prompt + 0.2 * (t2 - t0) / len(texts)
        self.batches += 1
        self.prompts += len(texts)
        emb_ms, pred_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        out: list[Routed | None] = [None] * len(items)
        for idx in groups.values():
            p, off = preds[idx[0]], 0
            for i in idx:
                n = len(items[i].texts)
                part = Prediction(p.backends, p.quality[off:off + n], p.cost[off:off + n], p.support[off:off + n])
                out[i] = Routed(X[starts[i]:starts[i + 1]], part, emb_ms, pred_ms, len(texts), ns0, ns1, ns2)
                off += n
        return out  # type: ignore[return-value]
