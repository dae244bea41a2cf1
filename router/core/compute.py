"""One thread for all of a process's torch work.

Why: ATen parallelizes with OpenMP, whose worker pool belongs to the calling thread. When the
encoder runs on one thread and a decode loop on another, each keeps its own team of spinning
workers, and on a small CPU they steal each other's cores. Measured here (2 cores, SmolLM2-135M):
decode 19.2 tokens/s when every torch call comes from one thread, 12.5 tokens/s when a second
thread had run torch work before. So every model call is funnelled through one executor thread;
callers submit small units (one encode, one decode step), so Route requests interleave with
running generations between two tokens instead of queueing behind them.
"""
from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Compute(Protocol):
    """Where model work runs: ``ComputeThread`` in a server, ``Inline`` for components used alone."""

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def shutdown(self) -> None: ...


class ComputeThread:
    def __init__(self, name: str = "torch") -> None:
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._mark)
        self._ident: int | None = None

    def _mark(self) -> None:
        self._ident = threading.get_ident()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the compute thread and wait for it (inline when already there)."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._ex.submit(fn, *args, **kwargs).result()

    def shutdown(self) -> None:
        self._ex.shutdown(wait=False, cancel_futures=True)


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking core work (embedding, search, fsync) off the event loop, for the adapters."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args, **kwargs))


class Inline:
    """Runs work on the calling thread: for components used alone (tests, scripts)."""

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def shutdown(self) -> None:
        pass
