"""Continuous batching for the local causal LMs: requests join and leave the running batch
between two decode steps (iteration-level scheduling, as in Orca, vLLM and TGI).

Why our own scheduler rather than transformers' ``ContinuousBatchingManager`` (5.24): measured
here (2 cores, SmolLM2-135M fp32, 8 requests of 32 tokens), the manager decoded 16.2 tokens/s in
all, a padded ``DynamicCache`` batch 78.7 tokens/s and batch 1 14.2 tokens/s; its sampler draws
from one global generator (no per-request seed), and it has no hook to run per-request code
before a forward, which the MoE kind needs to install a request's expert weights.

How it works. Each backend has one scheduler and one driver thread; every model call still goes
through the process's compute thread (``router.core.compute``), so routing work interleaves with
decoding between two steps. Each request has its own KV cache, and a forward is *packed*
(backends/packed.py): the new tokens of every row, one per decoding row and a prompt chunk per
newcomer, go through the model as one sequence, each row at its own positions and attending only
to its own cache, so a row computes what it would alone, up to float rounding of the batched
matmuls. Rows that share weights share a forward (one for a plain model; one per expert set for
the MoE kind). An iteration:

1. admits waiting requests while running + prefilling < ``max_batch`` (a cancelled request, or
   one whose deadline passed while it waited, never starts);
2. runs one packed forward per key: a decode step of its running rows plus at most
   ``prefill_chunk`` prompt tokens of newcomers (the oldest first; a long prompt a chunk per
   iteration), so a newcomer's prefill rides the running batch's step instead of stalling it
   with a forward of its own;
3. gives every row its token; a finished or cancelled row leaves at once and its cache is freed.

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
PREFIX_MIN = 4                  # a shorter shared head is not worth a cached copy
PREFIXES_KEPT = 16              # (key, member) heads kept: one per model or code, a few expert sets


@dataclass(eq=False)
class Row:
    """One request's decoding state."""

    req: GenerationRequest
    emit: Emit
    enqueued: float
    ids: list[int] = field(default_factory=list)    # prompt token ids (after truncation)
    key: Hashable = None                             # requests with equal keys share a forward
    member: Any = None                               # the backend that submitted it, when not ops'
    setup: Callable[[], None] | None = None          # run before each forward of its key
    gen: Any = None                                  # torch.Generator when sampling
    cache: Any = None                                # its own KV cache (ops.new_cache)
    prefilled: int = 0                               # prompt tokens already in its cache
    out_ids: list[int] = field(default_factory=list)
    sent: int = 0                                    # characters emitted so far
    t_start: float = 0.0
    t_first: float | None = None
    last: int = -1                                   # the token to feed at the next step


class DecodeScheduler:
    """The continuous-batching loop of one local backend (see the module docstring).

    ``model_ops`` is the backend: it supplies ``tokenize(messages) -> list[int]``,
    ``prepare(req) -> (key, setup)``, ``generator(req)`` (its sampler state),
    ``new_cache(reserve)`` (a request's empty KV cache), ``forward(tokens, starts, caches, setup,
    members, logits_at) -> logits (len(logits_at), V)`` (one packed forward; row i feeds
    ``tokens[i]`` after the ``starts[i]`` tokens in ``caches[i]``) and ``pick(logits, rows) ->
    tokens`` (both run on the compute thread), ``eos`` (token ids), ``decode(ids) -> str`` and
    ``step_hook``. ``members`` names, per row, the backend that submitted it (None: ``model_ops``
    itself): architecture codes of one base model share their base's scheduler
    (backends/shared_base.py), and its forward runs each row as its code.
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
        self._decoding: list[Row] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        # The chat template's head (system prompt and role markers) that every templated prompt
        # starts with, and its KV columns per (key, member): a newcomer starting with it copies
        # them and is prefilled from there on. Keyed by both because a code or an expert set
        # computes other keys and values for the same tokens.
        self._head: tuple[int, ...] | None = None
        self._prefixes: collections.OrderedDict[tuple[Hashable, Any], Any] = collections.OrderedDict()
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
        return len(self._prefilling) + len(self._decoding)

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

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
                # them (a cache that cannot grow, say). The started requests fail,
                # the queued ones stay, and the driver goes on: a dead driver would hang them all.
                _fail(self._drop(waiting=False), self.name, e)
        _fail(self._drop(waiting=True), self.name, BackendError(self.name, "shutting down"))

    def _drop(self, *, waiting: bool) -> list[Row]:
        """Take the started requests (and, with ``waiting``, the queued ones) out of the scheduler."""
        with self._cond:
            rows = self._prefilling + self._decoding
            if waiting:
                rows += list(self._waiting)
                self._waiting.clear()
            self._prefilling, self._decoding = [], []
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
        """One scheduling iteration: admit, then one packed forward per key that decodes its
        running rows once and feeds newcomers at most ``prefill_chunk`` prompt tokens."""
        self._admit()
        for r in [r for r in self._prefilling if r.req.cancel.is_set()]:
            with self._cond:
                self._prefilling.remove(r)     # gone before its first token: its cache goes with it
            _send(r, Finished(FinishReason.CANCELLED, len(r.ids), 0, 0.0))
        groups: dict[Hashable, tuple[list[Row], list[tuple[Row, int]]]] = {}
        for r in self._decoding:
            groups.setdefault(r.key, ([], []))[0].append(r)
        budget = self.prefill_chunk
        for r in self._prefilling:             # the oldest newcomers first
            if budget <= 0:
                break
            n = min(len(r.ids) - r.prefilled, budget)
            groups.setdefault(r.key, ([], []))[1].append((r, n))
            budget -= n
        for decoding, feeding in groups.values():
            self._step(decoding, feeding)

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
                prefix = self._prefix_for(row)
                row.cache = self.ops.new_cache(len(row.ids) + min(req.max_tokens, 256), prefix)
                row.prefilled = prefix.length if prefix is not None else 0
            except Exception as e:
                _fail([row], self.name, e)
                continue
            row.t_start = time.monotonic()
            req.started_ns = time.time_ns()
            with self._cond:
                self._prefilling.append(row)

    def _starts_with_head(self, ids: list[int]) -> bool:
        if self._head is None:
            head = getattr(self.ops, "prompt_head", None)
            self._head = tuple(head()) if head is not None else ()
        h = len(self._head)
        return h >= PREFIX_MIN and len(ids) > h and tuple(ids[:h]) == self._head

    def _prefix_for(self, row: Row) -> Any:
        """The cached head for this row's (key, member), when its prompt starts with the head."""
        if not self._starts_with_head(row.ids):
            return None
        prefix = self._prefixes.get((row.key, row.member))
        if prefix is not None:
            self._prefixes.move_to_end((row.key, row.member))
        return prefix

    def _remember_heads(self, feeding: list[tuple[Row, int]]) -> None:
        """Keep the head's columns of a newcomer fed from its first token (compute thread)."""
        h = len(self._head or ())
        for r, n in feeding:
            if r.prefilled == 0 and n >= h and (r.key, r.member) not in self._prefixes \
                    and self._starts_with_head(r.ids):
                self._prefixes[(r.key, r.member)] = r.cache.snapshot(h)
                while len(self._prefixes) > PREFIXES_KEPT:
                    self._prefixes.popitem(last=False)

    # ---- the packed step ----------------------------------------------------------------------
    def _step(self, decoding: list[Row], feeding: list[tuple[Row, int]]) -> None:
        """One forward of a key's rows: each decoding row feeds its last token, each newcomer its
        next ``n`` prompt tokens; every row that has a next token then takes it."""
        rows = decoding + [r for r, _ in feeding]
        tokens = [[r.last] for r in decoding] + [r.ids[r.prefilled:r.prefilled + n] for r, n in feeding]
        starts = [len(r.ids) + len(r.out_ids) - 1 for r in decoding] + [r.prefilled for r, _ in feeding]
        done = [r.prefilled + n == len(r.ids) for r, n in feeding]
        want = list(range(len(decoding))) + [len(decoding) + i for i, d in enumerate(done) if d]
        picked = [rows[i] for i in want]
        setup = rows[0].setup

        # Every torch call, tensor building included, runs on the compute thread: a second thread
        # that touches torch gets an OpenMP pool of its own, and two pools on two cores slow each
        # other (router/core/compute.py). Measured: with the small tensor work on this driver
        # thread, 8 concurrent Generate calls decoded 24 tokens/s in all against 71 alone.
        def run() -> list[int]:
            logits = self.ops.forward(tokens, starts, [r.cache for r in rows], setup,
                                      tuple(r.member for r in rows), want)
            self._remember_heads(feeding)
            return list(self.ops.pick(logits, picked))
        try:
            toks = self.compute.run(run)
        except Exception as e:
            with self._cond:
                self._decoding = [r for r in self._decoding if r not in rows]
                self._prefilling = [r for r in self._prefilling if r not in rows]
            _fail(rows, self.name, e)
            return
        for r, n in feeding:
            r.prefilled += n
        by_row = dict(zip(map(id, picked), toks))
        leaving = {id(r) for r in decoding if not self._take(r, by_row[id(r)])}
        joining = [r for (r, _), d in zip(feeding, done) if d]
        with self._cond:
            for r in joining:
                self._prefilling.remove(r)
        joining = [r for r in joining if self._take(r, by_row[id(r)])]
        with self._cond:
            if leaving:
                self._decoding = [r for r in self._decoding if id(r) not in leaving]
            self._decoding.extend(joining)

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
