"""Continuous batching (backends/batching.py) on a tiny random Llama through the real
TransformersBackend model operations: what a request gets does not depend on who it shares the
batch with. The real SmolLM2 path is in test_transformers_backend.py and the gRPC tests."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from backends import packed
from backends.base import Finished, FinishReason, GenerationRequest, TextChunk
from backends.batching import DecodeScheduler
from backends.transformers_backend import TransformersBackend
from router.core.config import BackendConfig
from router.core.errors import BackendError, DeadlineExceeded, Overloaded


class CharTokenizer:
    """Token i is the letter chr(97 + i % 26): enough for stop strings and streaming."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _prompt_ids(messages) -> list[int]:
    # A deterministic prompt of the content's length (so prompts of unequal length pad).
    text = " ".join(c for _, c in messages)
    return [(ord(ch) * 7 + i) % 128 for i, ch in enumerate(text)]


@pytest.fixture
def ops(tiny):
    b = TransformersBackend(BackendConfig(name="tiny", kind="transformers"), cost_unit="GFLOP", models_dir=".")
    b.model, b.tokenizer, b.eos = tiny, CharTokenizer(), set()
    b.tokenize = _prompt_ids
    return b


def _sched(ops, max_batch=8, max_queue=64, prefill_chunk=256) -> DecodeScheduler:
    return DecodeScheduler("tiny", ops, ops._compute, max_batch=max_batch, max_queue=max_queue,
                           prefill_chunk=prefill_chunk)


def _req(content: str, n: int = 12, **kw) -> GenerationRequest:
    return GenerationRequest(messages=[("user", content)], max_tokens=n, **kw)


PROMPTS = ["hi", "a longer prompt here", "mid size one", "x" * 40, "what is seven and five", "q"]


def test_batched_greedy_text_equals_each_request_alone(ops):
    alone = [_sched(ops, max_batch=1).run_until_idle([_req(p)])[0] for p in PROMPTS]
    together = _sched(ops).run_until_idle([_req(p) for p in PROMPTS])
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(f.completion_tokens == 12 and f.reason == FinishReason.LENGTH for _, f in together)


def test_requests_that_join_a_running_batch_mid_stream_get_the_same_text(ops):
    alone = [_sched(ops, max_batch=1).run_until_idle([_req(p, 10)])[0][0] for p in PROMPTS]
    s = _sched(ops)
    got: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}

    def emit(i):
        return lambda ev: got[i].append(ev.text) if isinstance(ev, TextChunk) else None
    s.submit(_req(PROMPTS[0], 10), emit(0))
    s.submit(_req(PROMPTS[1], 10), emit(1))
    for step in range(40):
        if 2 + step // 3 < len(PROMPTS) and step % 3 == 2:       # one newcomer every third step
            i = 2 + step // 3
            s.submit(_req(PROMPTS[i], 10), emit(i))
        s.iterate()
    assert ["".join(got[i]) for i in range(len(PROMPTS))] == alone


def packed_vs_alone(ops, rows, members=(), own=lambda i: None):
    """Prefill ``rows`` in one packed forward, then one decode step of all of them, and compare
    each row's logits with the same two forwards of that row alone (``own(i)``'s ops, default
    ``ops``): within float tolerance, since only the batched matmuls' rounding differs."""
    caches = [ops.new_cache(0) for _ in rows]
    everyone = list(range(len(rows)))
    members = tuple(members) or (None,) * len(rows)
    prefill = ops.forward(rows, [0] * len(rows), caches, None, members, everyone)
    nxt = prefill.argmax(-1).tolist()
    step = ops.forward([[t] for t in nxt], [len(r) for r in rows], caches, None, members, everyone)
    for i, r in enumerate(rows):
        single = own(i) or ops
        c = single.new_cache(0)
        one = single.forward([r], [0], [c], None, (), [0])
        torch.testing.assert_close(prefill[i], one[0], atol=1e-5, rtol=1e-4)
        two = single.forward([[nxt[i]]], [len(r)], [c], None, (), [0])
        torch.testing.assert_close(step[i], two[0], atol=1e-5, rtol=1e-4)


def test_batched_logits_match_the_unbatched_ones_within_float_tolerance(ops):
    """Where a near-tie could flip greedy text, the scores themselves agree: packed rows at their
    own positions, each attending to its own cache, compute what each prompt computes alone."""
    packed_vs_alone(ops, [_prompt_ids([("user", p)]) for p in PROMPTS])


def test_padding_avoids_the_slow_row_counts_only():
    assert [packed.padding(n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 11)] == [0, 0, 1, 0, 0, 0, 1, 0, 1]
    assert [packed.head_padding(n) for n in (0, 1, 2, 3, 4, 5, 7, 8)] == [0, 0, 2, 1, 0, 3, 1, 0]
    assert packed.padding(7, pad=False) == packed.head_padding(7, pad=False) == 0


def test_filler_tokens_change_no_row(tiny):
    """A forward padded with filler tokens (MKL's fast row counts, backends/packed.py) gives every
    row the logits and the cache the unpadded forward gives it, and nothing more."""
    rows, starts = [[5, 6, 7, 8, 9], [10], [11]], [0, 0, 0]     # 7 tokens: one filler
    want = [0, 2, 1]                                            # 3 rows of logits: one more

    def run(pad):
        caches = [packed.RowCache() for _ in rows]
        logits = packed.forward(tiny, rows, starts, caches, want, pad=pad)
        return logits, caches
    (plain, pc), (padded, qc) = run(False), run(True)
    assert padded.shape == plain.shape == (3, 128)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-4)
    for a, b, r in zip(pc, qc, rows):
        assert a.used == b.used == [len(r)] * len(tiny.model.layers)
        for layer in range(len(tiny.model.layers)):
            torch.testing.assert_close(b.keys[layer][:, :len(r)], a.keys[layer][:, :len(r)], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b.values[layer][:, :len(r)], a.values[layer][:, :len(r)], atol=1e-5,
                                       rtol=1e-4)


def test_a_newcomer_is_prefilled_in_the_running_rows_forward(ops):
    """Step 2 of the scheduler: the prompt of a request that arrives while another decodes rides
    that decode step's forward, instead of a forward of its own that the running row waits for."""
    s = _sched(ops)
    fed: list[list[int]] = []
    real = ops.forward

    def counting(tokens, *a):
        fed.append([len(t) for t in tokens])
        return real(tokens, *a)
    ops.forward = counting
    s.submit(_req("hi", 6), lambda ev: None)
    s.iterate()
    s.submit(_req("a longer prompt here", 6), lambda ev: None)
    s.iterate()
    assert fed == [[len(_prompt_ids([("user", "hi")]))], [1, len(_prompt_ids([("user", "a longer prompt here")]))]]


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_result(ops):
    long = "the quick brown fox jumps over the lazy dog " * 2
    whole = _sched(ops, prefill_chunk=1024).run_until_idle([_req(long)])
    forwards: list[int] = []
    s = _sched(ops, prefill_chunk=16)
    real = ops.forward

    def counting(tokens, *a):
        forwards.append(sum(map(len, tokens)))
        return real(tokens, *a)
    ops.forward = counting
    assert s.run_until_idle([_req(long)])[0][0] == whole[0][0]
    assert forwards[:6] == [16] * 5 + [len(_prompt_ids([("user", long)])) - 80]


def test_a_newcomer_prefill_does_not_stall_the_running_batch(ops):
    """Each iteration decodes the running batch once, whatever long prompt is being prefilled."""
    s = _sched(ops, prefill_chunk=16)
    tokens: list[int] = []
    s.submit(_req("hi", 30), lambda ev: tokens.append(1) if isinstance(ev, TextChunk) else None)
    s.iterate()
    s.submit(_req("z" * 100, 4), lambda ev: None)
    before = len(tokens)
    for _ in range(5):                 # the 100-token prompt needs 7 chunks
        s.iterate()
    assert len(tokens) - before == 5


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(ops):
    kw = dict(temperature=1.0, seed=11)
    alone = _sched(ops).run_until_idle([_req("sample me", **kw)])[0]
    mixed = _sched(ops).run_until_idle([_req("other", temperature=0.7, seed=3), _req("sample me", **kw),
                                        _req("greedy one")])
    assert mixed[1][0] == alone[0]


def test_stop_string_max_tokens_and_cancel(ops):
    text, fin = _sched(ops).run_until_idle([_req("hi", 30)])[0]
    stop = text[5:7]
    got, fin2 = _sched(ops).run_until_idle([_req("hi", 30, stop=[stop])])[0]
    assert fin2.reason == FinishReason.STOP_SEQUENCE and stop not in got and text.startswith(got)
    req = _req("hi", 30)
    req.cancel.set()
    assert _sched(ops).run_until_idle([req])[0][1].reason == FinishReason.CANCELLED


def test_a_finished_or_cancelled_request_frees_its_slot_at_once(ops):
    s = _sched(ops, max_batch=1)
    first, second = _req("one", 50), _req("two", 3)
    done: list[Finished] = []
    s.submit(first, lambda ev: done.append(ev) if isinstance(ev, Finished) else None)
    s.submit(second, lambda ev: done.append(ev) if isinstance(ev, Finished) else None)
    s.iterate()
    assert s.stats().running == 1 and s.stats().waiting == 1
    first.cancel.set()
    s.iterate()                        # the cancelled row leaves...
    s.iterate()                        # ...and the waiting one starts on the next iteration
    assert done[0].reason == FinishReason.CANCELLED and s.stats().running == 1 and s.stats().waiting == 0


def test_a_full_queue_refuses_at_once_with_the_expected_wait(ops):
    s = _sched(ops, max_batch=2, max_queue=2)
    for _ in range(2):
        s.submit(_req("x"), lambda ev: None)
    s.iterate()                         # those two run; the next two wait
    for _ in range(2):
        s.submit(_req("x"), lambda ev: None)
    t = time.perf_counter()
    with pytest.raises(Overloaded, match="saturated") as e:
        s.submit(_req("x"), lambda ev: None)
    assert time.perf_counter() - t < 0.05 and e.value.retry_after_s > 0
    st = s.stats()
    assert (st.running, st.waiting, st.max_queue, st.max_batch) == (2, 2, 2, 2) and st.expected_wait_s > 0


def test_a_request_whose_deadline_passes_while_queued_never_starts(ops):
    s = _sched(ops, max_batch=1)
    started: list[int] = []
    ops.step_hook = started.append
    events: list[object] = []
    runs, late = _req("runs", 5), _req("late", 5, deadline=time.monotonic() + 0.01)
    queued = time.time_ns()
    s.submit(runs, lambda ev: None)
    s.submit(late, events.append)
    time.sleep(0.02)
    while s._busy():
        s.iterate()
    assert len(events) == 1 and isinstance(events[0], DeadlineExceeded) and "not started" in str(events[0])
    assert started == list(range(5))           # only the first request ever decoded
    # When a request left the queue is recorded (the trace's queue span ends there).
    assert late.started_ns is None and queued <= runs.started_ns <= time.time_ns()


def test_a_failing_row_fails_alone_and_a_failing_forward_fails_its_batch(ops):
    s = _sched(ops)
    calls = {"n": 0}

    def hook(step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("row boom")
    ops.step_hook = hook
    out: dict[int, list[object]] = {0: [], 1: []}
    s.submit(_req("a", 4), out[0].append)
    s.submit(_req("b", 4), out[1].append)
    while s._busy():
        s.iterate()
    ends = [evs[-1] for evs in out.values()]
    assert sum(isinstance(e, BackendError) and "row boom" in str(e) for e in ends) == 1
    assert sum(isinstance(e, Finished) for e in ends) == 1
    ops.step_hook = None

    def broken(*a):
        raise RuntimeError("forward boom")
    ops.forward = broken
    got: list[object] = []
    s.submit(_req("c"), got.append)
    s.submit(_req("d"), got.append)
    s.iterate()
    assert len(got) == 2 and all(isinstance(e, BackendError) and "forward boom" in str(e) for e in got)
    assert not s._decoding and not s._prefilling


def test_requests_with_other_keys_decode_in_their_own_batch_with_their_own_setup(ops):
    installed: list[str] = []

    def prepare(req):
        key = "even" if len(req.messages[0][1]) % 2 == 0 else "odd"
        return key, (lambda: installed.append(key))
    ops.prepare = prepare
    s = _sched(ops)
    res = s.run_until_idle([_req("ab", 3), _req("abc", 3), _req("abcd", 3)])
    assert all(f.completion_tokens == 3 for _, f in res)
    # Prefill: the two even prompts in one forward, the odd one in another; then one forward per key and step.
    assert installed.count("even") == installed.count("odd") == 3


def test_the_driver_thread_serves_and_close_fails_what_is_left(ops):
    s = _sched(ops, max_batch=1)
    s.start(service_s=0.1)
    done = threading.Event()
    events: list[object] = []

    def emit(ev):
        events.append(ev)
        if isinstance(ev, (Finished, Exception)):
            done.set()
    s.submit(_req("served by the driver", 5), emit)
    assert done.wait(10) and isinstance(events[-1], Finished) and events[-1].completion_tokens == 5
    s.close()
    with pytest.raises(BackendError, match="shutting down"):
        s.submit(_req("too late"), emit)


def test_a_request_cancelled_while_its_long_prompt_is_prefilled_stops_there(ops):
    s = _sched(ops, prefill_chunk=16)
    req = _req("z" * 100, 4)
    got: list[object] = []
    s.submit(req, got.append)
    s.iterate()
    s.iterate()                                 # two of its seven chunks are in
    req.cancel.set()
    s.iterate()
    assert isinstance(got[-1], Finished) and got[-1].reason == FinishReason.CANCELLED
    assert not s._prefilling and not s._decoding and s.stats().running == 0


def test_a_failure_that_escapes_a_step_fails_the_started_requests_and_the_driver_goes_on(ops):
    s = _sched(ops)
    real = s._step
    calls = {"n": 0}

    def once_broken(decoding, feeding):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("a cache could not grow")
        real(decoding, feeding)
    s._step = once_broken
    s.start(service_s=0.1)
    done = threading.Event()
    first: list[object] = []

    def emit(ev):
        first.append(ev)
        if isinstance(ev, (Finished, Exception)):
            done.set()
    s.submit(_req("hit by the failure", 20), emit)
    assert done.wait(10) and isinstance(first[-1], BackendError) and "MemoryError" in str(first[-1])
    after: list[object] = []
    ok = threading.Event()
    s.submit(_req("served after it", 3), lambda ev: (after.append(ev), isinstance(ev, Finished) and ok.set()))
    assert ok.wait(10) and after[-1].completion_tokens == 3
    s.close()


def test_prompts_that_start_with_the_template_head_reuse_its_cached_columns(ops):
    """The chat template's head (system prompt, role markers) is prefilled once per model: later
    prompts copy its keys and values and feed only their own tokens, and answer the same."""
    head = [3, 1, 4, 1, 5, 9, 2, 6]
    ops.tokenize = lambda messages: head + _prompt_ids(messages)
    ops.prompt_head = lambda: []
    plain = [_sched(ops).run_until_idle([_req(p)])[0][0] for p in PROMPTS[:3]]
    ops.prompt_head = lambda: head
    fed: list[tuple[list[int], list[int]]] = []
    real = ops.forward

    def counting(tokens, starts, *a):
        fed.append(([len(t) for t in tokens], list(starts)))
        return real(tokens, starts, *a)
    ops.forward = counting
    s = _sched(ops)
    got = [s.run_until_idle([_req(p)])[0][0] for p in PROMPTS[:3]]
    assert got == plain
    prefills = [f for f in fed if f[0][0] > 1]
    n = [len(_prompt_ids([("user", p)])) for p in PROMPTS[:3]]
    assert prefills == [([len(head) + n[0]], [0]), ([n[1]], [len(head)]), ([n[2]], [len(head)])]
    # Another key (a code, an expert set) computes other values for the head: not shared.
    ops.prepare = lambda req: ("other", None)
    fed.clear()
    s.run_until_idle([_req(PROMPTS[0])])
    assert fed[0] == ([len(head) + n[0]], [0])
