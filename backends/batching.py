"""Continuous batching for the local causal LMs: requests join and leave the running batch
between two decode steps (iteration-level scheduling, as in Orca, vLLM and TGI).

Why our own scheduler rather than transformers' ``ContinuousBatchingManager`` (5.24): measured
here (2 cores, SmolLM2-135M fp32, 8 requests of 32 tokens), the manager decoded 16.2 tokens/s in
all, a padded ``DynamicCache`` batch 78.7 tokens/s and batch 1 14.2 tokens/s; its sampler draws
from one global generator (no per-request seed), and it has no hook to run per-request code
before a forward, which the MoE kind needs to install a request's expert weights.

How it works. Each backend has one scheduler and one driver thread; every model call still goes
through the process's compute thread (``router.core.compute``), so routing work interleaves with
decoding between two steps. A *batch* is the set of running requests that share weights (one for
a plain model; one per expert set for the MoE kind) with one KV cache, left-padded: row i's real
tokens are the last ``n_i`` columns, ``mask`` marks them, and each row's positions count only its
own tokens, so a row computes what it would alone, up to float rounding of the batched matmuls.
An iteration:

1. admits waiting requests while running + prefilling < ``max_batch`` (a cancelled request, or
   one whose deadline passed while it waited, never starts);
2. prefills newcomers, at most ``prefill_chunk`` prompt tokens per iteration: several short
   prompts in one left-padded forward, or one long prompt a chunk at a time, so a newcomer
   delays the running batch by one bounded forward, not by its whole prompt;
3. runs one decode step of every batch; a finished or cancelled row leaves at once and the
   columns no row needs any more are dropped.

Bounded queue: at most ``max_queue`` requests wait; one more is refused at once with
``Overloaded`` (RESOURCE_EXHAUSTED) carrying the expected wait, which ``stats()`` also reports.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.base import Finished, FinishReason, GenerationRequest, QueueStats, TextChunk
from router.core.errors import BackendError, DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)

Emit = Callable[[Any], None]    # receives TextChunk, Finished or an exception; must not block


@dataclass(eq=False)
class Row:
    """One request's decoding state."""

    req: GenerationRequest
    emit: Emit
    enqueued: float
    ids: list[int] = field(default_factory=list)    # prompt token ids (after truncation)
    key: Hashable = None                             # requests with equal keys share a batch
    member: Any = None                               # the backend that submitted it, when not ops'
    setup: Callable[[], None] | None = None          # run before each forward of its batch
    gen: Any = None                                  # torch.Generator when sampling
    prefilled: int = 0                               # prompt tokens already in a cache
    cache: Any = None                                # its cache while a long prompt is prefilled
    out_ids: list[int] = field(default_factory=list)
    sent: int = 0                                    # characters emitted so far
    t_start: float = 0.0
    t_first: float | None = None
    last: int = -1                                   # the token to feed at the next step


@dataclass(eq=False)
class Batch:
    """Rows decoding together: one cache of (B, heads, T, dim) per layer and mask (B, T)."""

    key: Hashable
    setup: Callable[[], None] | None
    rows: list[Row]
    cache: Any
    mask: Any


class DecodeScheduler:
    """The continuous-batching loop of one local backend (see the module docstring).

    ``model_ops`` is the backend: it supplies ``tokenize(messages) -> list[int]``,
    ``prepare(req) -> (key, setup)``, ``generator(req)`` (its sampler state),
    ``forward(ids, mask, cache, setup, members) -> (last-position logits (B, V), cache)`` and
    ``pick(logits, rows) -> tokens`` (both run on the compute thread), ``eos`` (token ids),
    ``decode(ids) -> str`` and ``step_hook``. ``members`` names, per row, the backend that
    submitted it (None: ``model_ops`` itself): architecture codes of one base model share their
    base's scheduler (backends/shared_base.py), and its forward runs each row as its code.
    """

    def __init__(self, name: str, model_ops: Any, compute: Any, *, max_batch: int, max_queue: int,
                 prefill_chunk: int) -> None:
        self.name = name
        self.ops = model_ops
        self.compute = compute
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._cond = threading.Condition()
        self._waiting: collections.deque[Row] = collections.deque()
        self._prefilling: list[Row] = []
        self._batches: dict[Hashable, Batch] = {}
        self._closed = False
        self._thread: threading.Thread | None = None
        # Mean seconds a request holds a slot (EWMA), for the expected wait; seeded by start().
        self._service_s = 1.0

    # ---- the caller's side ----------------------------------------------------------------------
    def submit(self, req: GenerationRequest, emit: Emit, member: Any = None) -> None:
        """Queue a request; its events go to ``emit`` from the driver thread. Raises Overloaded
        at once when ``max_queue`` requests already wait. ``member``: the backend submitting it
        when that is not ``model_ops`` (a code sharing its base's batch)."""
        with self._cond:
            if self._closed:
                raise BackendError(self.name, "shutting down")
            if len(self._waiting) >= self.max_queue:
                wait = self._expected_wait_locked(len(self._waiting) + 1)
                raise Overloaded(f"backend {self.name!r} is saturated: {len(self._waiting)} requests wait "
                                 f"(max_queue {self.max_queue}), expected wait {wait:.1f} s; retry later or "
                                 "allow another backend", retry_after_s=wait)
            self._waiting.append(Row(req, emit, time.monotonic(), member=member))
            self._cond.notify()

    def _running(self) -> int:
        return len(self._prefilling) + sum(len(b.rows) for b in self._batches.values())

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._batches)

    def stats(self) -> QueueStats:
        with self._cond:
            running = self._running()
            waiting = len(self._waiting)
            wait = self._expected_wait_locked(waiting + 1) if running + waiting >= self.max_batch else 0.0
            return QueueStats(running, waiting, self.max_batch, self.max_queue, wait)

    def _expected_wait_locked(self, ahead: int) -> float:
        # Slots free up at about max_batch per mean service time; ``ahead`` requests take them first.
        return ahead * self._service_s / self.max_batch

    def start(self, service_s: float) -> None:
        self._service_s = service_s
        self._thread = threading.Thread(target=self._drive, name=f"batch-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the driver ---------------------------------------------------------------------------
    def _drive(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._busy():
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self.iterate()
            except Exception as e:
                # The step's own failures are handled where they happen; this is what escaped
                # them (cache surgery running out of memory, say). The started requests fail,
                # the queued ones stay, and the driver goes on: a dead driver would hang them all.
                _fail(self._drop(waiting=False), self.name, e)
        _fail(self._drop(waiting=True), self.name, BackendError(self.name, "shutting down"))

    def _drop(self, *, waiting: bool) -> list[Row]:
        """Take the started requests (and, with ``waiting``, the queued ones) out of the scheduler."""
        with self._cond:
            rows = self._prefilling + [r for b in self._batches.values() for r in b.rows]
            if waiting:
                rows += list(self._waiting)
                self._waiting.clear()
            self._prefilling.clear()
            self._batches.clear()
        return rows

    def run_until_idle(self, requests: Sequence[GenerationRequest] = ()) -> list[tuple[str, Finished]]:
        """Serve ``requests`` together on the calling thread (warm-up, tests, benchmarks; never
        while the driver runs) and return each one's (text, Finished)."""
        if self._thread is not None:
            raise RuntimeError("run_until_idle is for a scheduler whose driver is not started")
        out: list[list[Any]] = [[[], None] for _ in requests]

        def collect(i: int) -> Emit:
            def emit(ev: Any) -> None:
                if isinstance(ev, TextChunk):
                    out[i][0].append(ev.text)
                else:
                    out[i][1] = ev
            return emit
        for i, req in enumerate(requests):
            self._waiting.append(Row(req, collect(i), time.monotonic()))
        while self._busy():
            self.iterate()
        for _, ev in out:
            if isinstance(ev, BaseException):
                raise ev
        return [("".join(t), f) for t, f in out]

    def iterate(self) -> None:
        """One scheduling iteration: admit, prefill one bounded chunk, decode every batch once."""
        self._admit()
        if self._prefilling:
            self._prefill()
        for b in list(self._batches.values()):
            self._decode(b)

    def _admit(self) -> None:
        now = time.monotonic()
        while True:
            with self._cond:
                if self._running() >= self.max_batch or not self._waiting:
                    return
                row = self._waiting.popleft()
            req = row.req
            if req.cancel.is_set():
                _send(row, Finished(FinishReason.CANCELLED, 0, 0, 0.0))
                continue
            if req.deadline is not None and now >= req.deadline:
                _send(row, DeadlineExceeded(f"the deadline passed after {now - row.enqueued:.2f} s in backend "
                                            f"{self.name!r}'s queue; the request was not started"))
                continue
            try:
                ops = row.member or self.ops
                row.ids = ops.tokenize(req.messages)
                row.key, row.setup = ops.prepare(req)
                row.gen = ops.generator(req)
            except Exception as e:
                _fail([row], self.name, e)
                continue
            row.t_start = time.monotonic()
            req.started_ns = time.time_ns()
            self._prefilling.append(row)

    # ---- prefill ------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """Prefill the oldest newcomers within ``prefill_chunk`` prompt tokens: whole short prompts
        of one key together, or the next chunk of one long prompt."""
        for r in [r for r in self._prefilling if r.req.cancel.is_set()]:
            self._prefilling.remove(r)        # gone before its first token: drop its partial cache
            _send(r, Finished(FinishReason.CANCELLED, len(r.ids), 0, 0.0))
        if not self._prefilling:
            return
        head = self._prefilling[0]
        group = [head]
        budget = self.prefill_chunk - (len(head.ids) - head.prefilled)
        if head.prefilled == 0 and budget >= 0:
            for r in self._prefilling[1:]:
                need = len(r.ids)
                if r.key == head.key and r.prefilled == 0 and need <= budget:
                    group.append(r)
                    budget -= need
        try:
            if len(group) == 1:
                done = self._prefill_chunk(head)
            else:
                self._prefill_together(group)
                done = True
        except Exception as e:
            for r in group:
                self._prefilling.remove(r)
            _fail(group, self.name, e)
            return
        if not done:
            return
        for r in group:
            self._prefilling.remove(r)

    # Every torch call below, tensor building and cache surgery included, runs on the compute
    # thread: a second thread that touches torch gets an OpenMP pool of its own, and two pools on
    # two cores slow each other (router/core/compute.py). Measured: with the small tensor work on
    # this driver thread, 8 concurrent Generate calls decoded 24 tokens/s in all against 71 for
    # the model alone at batch 8.
    def _prefill_chunk(self, row: Row) -> bool:
        """Feed the next chunk of one prompt; True when the whole prompt is in."""
        chunk = row.ids[row.prefilled:row.prefilled + self.prefill_chunk]
        total = row.prefilled + len(chunk)
        last = total == len(row.ids)

        def run() -> tuple[list[int], Any, Any]:
            import torch

            ids = torch.tensor([chunk], dtype=torch.long)
            mask = torch.ones((1, total), dtype=torch.long)
            toks, cache = self._forward(ids, mask, row.cache, row.setup, [row], pick=last)
            return toks, cache, mask
        toks, row.cache, mask = self.compute.run(run)
        row.prefilled = total
        if not last:
            return False
        cache, row.cache = row.cache, None
        self._join(Batch(row.key, row.setup, [row], cache, mask), toks)
        return True

    def _prefill_together(self, rows: list[Row]) -> None:
        def run() -> tuple[list[int], Any, Any]:
            import torch

            width = max(len(r.ids) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r.ids):] = torch.tensor(r.ids)
                mask[i, width - len(r.ids):] = 1
            toks, cache = self._forward(ids, mask, None, rows[0].setup, rows, pick=True)
            return toks, cache, mask
        toks, cache, mask = self.compute.run(run)
        for r in rows:
            r.prefilled = len(r.ids)
        self._join(Batch(rows[0].key, rows[0].setup, list(rows), cache, mask), toks)

    def _join(self, new: Batch, first_tokens: list[int]) -> None:
        """Take each newcomer's first token, then merge the survivors into their key's batch."""
        keep = []
        for i, (r, tok) in enumerate(zip(new.rows, first_tokens)):
            if self._take(r, tok):
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(new.rows):
            self.compute.run(_select, new, keep)
        cur = self._batches.get(new.key)
        if cur is not None:
            self.compute.run(_concat, cur, new)
        else:
            with self._cond:
                self._batches[new.key] = new

    # ---- decode -------------------------------------------------------------------------------
    def _decode(self, b: Batch) -> None:
        def run() -> tuple[list[int], Any, Any]:
            import torch

            ids = torch.tensor([[r.last] for r in b.rows], dtype=torch.long)
            mask = torch.cat([b.mask, torch.ones((len(b.rows), 1), dtype=torch.long)], dim=1)
            toks, cache = self._forward(ids, mask, b.cache, b.setup, b.rows, pick=True)
            return toks, cache, mask
        try:
            toks, b.cache, b.mask = self.compute.run(run)
        except Exception as e:
            with self._cond:
                self._batches.pop(b.key, None)
            _fail(b.rows, self.name, e)
            return
        keep = [i for i, (r, t) in enumerate(zip(b.rows, toks)) if self._take(r, t)]
        if len(keep) == len(b.rows):
            return
        if keep:
            self.compute.run(_select, b, keep)
        else:
            with self._cond:
                self._batches.pop(b.key, None)

    def _forward(self, ids: Any, mask: Any, cache: Any, setup: Callable[[], None] | None,
                 rows: Sequence[Row], *, pick: bool) -> tuple[list[int], Any]:
        """One forward of ``rows`` and, with ``pick``, their next tokens: one compute-thread call."""
        logits, cache = self.ops.forward(ids, mask, cache, setup, tuple(r.member for r in rows))
        return (self.ops.pick(logits, rows) if pick else []), cache

    def _take(self, r: Row, tok: int) -> bool:
        """Give a row its next token: stream what is safe to show; False when it finished
        (its Finished or error sent)."""
        req = r.req
        step = len(r.out_ids)
        reason: FinishReason | None = None
        try:
            if req.cancel.is_set() or (req.deadline is not None and time.monotonic() >= req.deadline):
                reason = FinishReason.CANCELLED
            else:
                if self.ops.step_hook is not None:
                    self.ops.step_hook(step)
                if tok in self.ops.eos and not req.ignore_eos:
                    reason = FinishReason.STOP
                else:
                    reason = self._append(r, tok)
                    if reason is None and len(r.out_ids) >= req.max_tokens:
                        reason = FinishReason.LENGTH
        except Exception as e:
            _fail([r], self.name, e)
            return False
        if reason is None:
            r.last = tok
            return True
        if reason not in (FinishReason.CANCELLED, FinishReason.STOP_SEQUENCE) and r.out_ids:
            text = self.ops.decode(r.out_ids)
            if len(text) > r.sent:
                _send(r, TextChunk(text[r.sent:]))
        now = time.monotonic()
        self._service_s = 0.9 * self._service_s + 0.1 * (now - r.t_start)
        _send(r, Finished(reason, len(r.ids), len(r.out_ids), now - r.t_first if r.t_first else 0.0))
        return False

    def _append(self, r: Row, tok: int) -> FinishReason | None:
        r.out_ids.append(tok)
        if r.t_first is None:
            r.t_first = time.monotonic()
        stops = [s for s in r.req.stop if s]
        text = self.ops.decode(r.out_ids)
        cut = min((i for i in (text.find(s, max(0, r.sent - len(s))) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut > r.sent:
                _send(r, TextChunk(text[r.sent:cut]))
            return FinishReason.STOP_SEQUENCE
        # Hold back a possible start of a stop string, and a half-decoded UTF-8 character.
        safe = len(text) - (max((len(s) for s in stops), default=1) - 1)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > r.sent:
            _send(r, TextChunk(text[r.sent:safe]))
            r.sent = safe
        return None


# ---- cache surgery (on the compute thread; tensors only, no model call) ---------------------------
def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _select(b: Batch, keep: list[int]) -> None:
    """Keep rows ``keep`` of a batch and drop the leading columns no remaining row uses."""
    import torch

    idx = torch.tensor(keep, dtype=torch.long)
    mask = b.mask.index_select(0, idx)
    used = mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else mask.shape[1]
    for layer in _layers(b.cache):
        layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
        layer.values = layer.values.index_select(0, idx)[:, :, first:]
    b.mask = mask[:, first:]
    b.rows = [b.rows[i] for i in keep]


def _concat(a: Batch, n: Batch) -> None:
    """Append batch ``n``'s rows to ``a``, left-padding the shorter of the two."""
    import torch
    import torch.nn.functional as F

    ta, tn = a.mask.shape[1], n.mask.shape[1]
    t = max(ta, tn)
    for la, ln in zip(_layers(a.cache), _layers(n.cache)):
        la.keys = torch.cat([F.pad(la.keys, (0, 0, t - ta, 0)), F.pad(ln.keys, (0, 0, t - tn, 0))], dim=0)
        la.values = torch.cat([F.pad(la.values, (0, 0, t - ta, 0)), F.pad(ln.values, (0, 0, t - tn, 0))], dim=0)
    a.mask = torch.cat([F.pad(a.mask, (t - ta, 0)), F.pad(n.mask, (t - tn, 0))], dim=0)
    a.rows = a.rows + n.rows


def _send(r: Row, ev: Any) -> None:
    try:
        r.emit(ev)
    except RuntimeError:      # the caller's event loop is gone: nobody is listening any more
        r.req.cancel.set()


def _fail(rows: Sequence[Row], name: str, e: Exception) -> None:
    if not isinstance(e, BackendError):
        log.exception("backend %s failed during generation", name, exc_info=e)
        e = BackendError(name, f"{type(e).__name__}: {e}")
    for r in rows:
        _send(r, e)


def seeded_generator(req: GenerationRequest, device: str) -> Any:
    """The request's own sampler state (None when greedy): a seed reproduces its text whatever
    else runs in the batch."""
    import torch

    if req.temperature <= 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little"))
    return gen
