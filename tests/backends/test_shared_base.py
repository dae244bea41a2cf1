"""Width-pruned codes decode in their base model's batch (backends/shared_base.py), on a tiny
random Llama through the real TransformersBackend operations and scheduler: a code's rows in a
mixed batch get what the code computes alone. The served SmolLM2 pair is checked in
tests/router/adapters (gRPC) and measured by benchmarks/load.py."""
from __future__ import annotations

import copy

import pytest
import torch

from backends import packed
from backends.base import Status, TextChunk
from backends.batching import DecodeScheduler
from backends.pruning import prune_mlp_rows
from backends.shared_base import kept_neurons, share_batches
from backends.transformers_backend import TransformersBackend
from router.core.config import BackendConfig
from tests.backends.test_batching import CharTokenizer, _prompt_ids, _req, packed_vs_alone

PROMPTS = ["hi", "a longer prompt here", "mid size one", "x" * 40, "what is seven and five", "q"]


def _backend(name: str, model, prune: dict | None = None) -> TransformersBackend:
    opts = {"prune": prune} if prune else {}
    b = TransformersBackend(BackendConfig(name=name, kind="transformers", options=opts), cost_unit="GFLOP",
                            models_dir=".")
    b.model, b.tokenizer, b.eos = model, CharTokenizer(), set()
    b.tokenize = _prompt_ids
    b._scheduler = DecodeScheduler(name, b, b._compute, max_batch=8, max_queue=64, prefill_chunk=256)
    b._status = (Status.READY, "ready")
    return b


@pytest.fixture
def pair(tiny):
    """(base, code): the code keeps 48 of 64 MLP neurons of each layer, sliced from the base."""
    base = copy.deepcopy(tiny)
    code = copy.deepcopy(tiny)
    gen = torch.Generator().manual_seed(1)
    kept = [torch.randperm(64, generator=gen)[:48].sort().values for _ in code.model.layers]
    prune_mlp_rows(code, kept)
    return _backend("base", base), _backend("code", code, {"mlp_keep": 0.75}), kept


def test_kept_neurons_are_recovered_from_the_weights_and_other_weights_refuse(pair, tiny):
    base, code, kept = pair
    got = kept_neurons(base.model, code.model)
    assert got is not None and all(torch.equal(a, b) for a, b in zip(got, kept))
    tuned = copy.deepcopy(code.model)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3      # recovery training changes weights
    assert kept_neurons(base.model, tuned) is None
    other = copy.deepcopy(code.model)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[3, 0] += 1e-3
    assert kept_neurons(base.model, other) is None


def _run_alone(b: TransformersBackend, prompt: str) -> str:
    s = DecodeScheduler(b.name, b, b._compute, max_batch=1, max_queue=4, prefill_chunk=256)
    return s.run_until_idle([_req(prompt)])[0][0]


def test_mixed_batch_text_equals_each_model_alone(pair):
    base, code, _ = pair
    alone = [_run_alone(base if i % 2 == 0 else code, p) for i, p in enumerate(PROMPTS)]
    assert alone != [_run_alone(base, p) for p in PROMPTS]        # the code answers differently
    assert share_batches({"base": base, "code": code}) == {"code": "base"}
    assert code._scheduler is base._scheduler and code.queue_stats() == base.queue_stats()
    s = base._scheduler
    got: dict[int, list[str]] = {i: [] for i in range(len(PROMPTS))}
    for i, p in enumerate(PROMPTS):
        s.submit(_req(p), lambda ev, i=i: got[i].append(ev.text) if isinstance(ev, TextChunk) else None,
                 None if i % 2 == 0 else code)
    forwards: list[int] = []
    real = base.forward

    def counting(tokens, starts, caches, setup, members=(), logits_at=()):
        forwards.append(len(members))
        return real(tokens, starts, caches, setup, members, logits_at)
    base.forward = counting
    for _ in range(40):
        if not s._busy():
            break
        s.iterate()
    assert ["".join(got[i]) for i in range(len(PROMPTS))] == alone
    assert not s._busy()
    assert max(forwards) == len(PROMPTS)          # one forward held every row: one batch, not two


def test_mixed_forward_logits_match_each_model_alone_within_float_tolerance(pair):
    base, code, _ = pair
    share_batches({"base": base, "code": code})
    # 7 rows: the decode step carries a filler token (backends/packed.py), which the masks cover too.
    rows = [_prompt_ids([("user", p)]) for p in [*PROMPTS, PROMPTS[1]]]
    members = tuple(None if i % 2 == 0 else code for i in range(len(rows)))
    assert packed.padding(len(rows), base.opts.pad_rows) == 1
    packed_vs_alone(base, rows, members, own=lambda i: members[i])


def test_a_batch_of_one_code_runs_that_codes_own_smaller_model(pair):
    base, code, _ = pair
    share_batches({"base": base, "code": code})
    calls: list[str] = []
    for name, b in (("base", base), ("code", code)):
        b.model.register_forward_pre_hook(lambda *_a, name=name: calls.append(name))
    r = _prompt_ids([("user", "hi")])
    base.forward([r], [0], [base.new_cache(0)], None, (code,), [0])
    base.forward([r], [0], [base.new_cache(0)], None, (None,), [0])
    base.forward([r, r], [0, 0], [base.new_cache(0), base.new_cache(0)], None, (None, code), [0, 1])
    assert calls == ["code", "base", "base"]


def test_codes_that_drop_layers_or_opt_out_keep_their_own_batch(pair, tiny):
    base, code, _ = pair
    code.opts.share_batch = False
    assert share_batches({"base": base, "code": code}) == {}
    code.opts.share_batch = True
    code.opts.prune.layers_keep = 0.5
    assert share_batches({"base": base, "code": code}) == {}
    code.opts.prune.layers_keep = 1.0
    code.eos = {5}
    assert share_batches({"base": base, "code": code}) == {}
