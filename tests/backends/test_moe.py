"""The router-decoupled MoE: algebra on a tiny random Llama, then the real SmolLM2 through the
Backend interface and the gRPC service."""
from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from backends import moe as M


def _labels(seed: int, n: int = 64, experts: int = 4, shared: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.full(n, -1)
    routed = rng.permutation(n)[shared:]
    lab[routed] = np.repeat(np.arange(experts), (n - shared) // experts)
    return lab


def test_every_expert_on_is_the_dense_model(tiny):
    ids = torch.randint(0, 128, (2, 10))
    with torch.inference_mode():
        dense = tiny(input_ids=ids).logits.clone()
    mlps = M.to_experts(tiny, np.stack([_labels(0), _labels(1)]), 4)
    assert all(m.shared == 16 and m.block == 12 for m in mlps)
    with torch.inference_mode():
        torch.testing.assert_close(tiny(input_ids=ids).logits, dense, atol=1e-5, rtol=1e-5)


def test_an_expert_subset_computes_the_dense_model_with_the_other_neurons_zeroed(tiny):
    ids = torch.randint(0, 128, (1, 12))
    labels = np.stack([_labels(0), _labels(1)])
    on = ((0, 2), (1, 3))
    masked = copy.deepcopy(tiny)
    for layer, lab, keep in zip(masked.model.layers, labels, on):
        drop = [j for j in range(64) if lab[j] >= 0 and lab[j] not in keep]
        layer.mlp.down_proj.weight.data[:, drop] = 0
    mlps = M.to_experts(tiny, labels, 4)
    w = [m.weights_for(s) for m, s in zip(mlps, on)]
    assert all(t[0].shape == (16 + 2 * 12, 32) and t[2].shape == (32, 40) for t in w)
    for m, t in zip(mlps, w):
        m.active = t
    with torch.inference_mode():
        torch.testing.assert_close(tiny(input_ids=ids).logits, masked(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_balanced_kmeans_gives_equal_experts_and_finds_planted_groups():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 20))
    truth = np.repeat(np.arange(4), 24)
    x = (centers[truth] + 0.1 * rng.normal(size=(96, 20))).astype(np.float32)
    labels = M.balanced_kmeans(x, 4, seed=0)
    assert np.bincount(labels, minlength=4).tolist() == [24] * 4
    # the same partition up to renaming
    assert all(len(set(labels[truth == g])) == 1 for g in range(4))
    with pytest.raises(Exception, match="equal experts"):
        M.balanced_kmeans(x[:95], 4)


def test_split_layer_keeps_the_most_important_neurons_shared():
    rng = np.random.default_rng(1)
    act = rng.random((30, 64)).astype(np.float32)
    act[:, :8] += 5.0                      # always strongly active
    labels = M.split_layer(act, np.ones(64, np.float32), experts=4, shared=0.25, seed=0)
    assert (labels[:8] == -1).all() and (labels == -1).sum() == M.shared_count(64, 0.25, 4) == 16
    assert np.bincount(labels[labels >= 0], minlength=4).tolist() == [12] * 4


def test_shares_sum_to_one_and_the_gate_learns_which_experts_a_prompt_needs():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # two layers, four experts; a prompt needs the experts its embedding points to
    labels = np.stack([np.repeat(np.arange(4), 4)] * 2)
    act = np.zeros((200, 2, 16), np.float32)
    for e in range(4):
        act[:, :, labels[0] == e] = np.exp(3 * emb[:, e])[:, None, None]
    sh = M.expert_shares(act, np.ones((2, 16), np.float32), labels, 4)
    np.testing.assert_allclose(sh.sum(2), 1.0, rtol=1e-5)
    gate = M.PreGate.fit(emb[:150], sh[:150], alpha=0.1)
    sets = M.top_k_sets(gate.predict(emb[150:]), 2)
    truth = M.top_k_sets(sh[150:], 2)
    assert all(len(s) == 2 and all(len(layer) == 2 for layer in s) for s in sets)
    agree = np.mean([a == b for a, b in zip(sets, truth)])
    assert agree > 0.8
    assert M.captured(sh[150:], sets) > M.captured(sh[150:], [((0, 1), (0, 1))] * 50)


def test_expert_aware_batching_keeps_every_request_once_and_the_union_within_the_cap():
    a, b, c = ((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 1), (2, 3))
    sets = [a, b, c, b, a]
    batches = M.plan_batches(sets, max_batch=8, max_experts=2)
    assert sorted(i for bt in batches for i in bt) == list(range(5))
    assert batches == [[0, 2, 4], [1, 3]]    # same expert sets run together
    for bt in M.plan_batches(sets, max_batch=8, max_experts=3):
        assert np.mean([len(layer) for layer in M.union([sets[i] for i in bt])]) <= 3
    assert all(len(bt) <= 2 for bt in M.plan_batches(sets, max_batch=2, max_experts=4))


@pytest.mark.parametrize("options,part", [({"experts": 4, "top_k": 5}, "top_k"),
                                          ({"prune": {"mlp_keep": 0.5}}, "prune")])
def test_invalid_moe_options_are_refused(options, part, tmp_path):
    from backends.moe import MoEBackend
    from router.core.config import BackendConfig
    from router.core.errors import ConfigError

    with pytest.raises(ConfigError, match=part):
        MoEBackend(BackendConfig(name="m", kind="moe", options=options), cost_unit="GFLOP", models_dir=tmp_path)


# ---- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_moe(models_dir, encoder):
    from backends.moe import MoEBackend
    from router.core.config import BackendConfig

    b = MoEBackend(BackendConfig(name="moe", kind="moe", options={"experts": 8, "top_k": 4}), cost_unit="GFLOP",
                   models_dir=models_dir, encoder=encoder)
    asyncio.run(b.load())
    return b


def _answer(b, prompt):
    from router.offline.aptitude.runner import answer

    return asyncio.run(answer(b, prompt, 16))


@pytest.mark.slow
def test_real_moe_serves_with_fewer_active_parameters_and_one_copy_of_the_weights(real_moe, encoder):
    from backends.base import Status

    assert real_moe.status()[0] == Status.READY
    dense_params = sum(p.numel() for p in real_moe.model.parameters())
    routed = sum(3 * m.block * m.experts * m.gate.shape[1] for m in real_moe.mlps)
    # every weight but the input table, plus the tied output projection (a matmul): the dense
    # count, less the routed experts that are off (half of them here)
    assert real_moe.active_parameters() == dense_params - routed // 2
    text, fin = _answer(real_moe, "What is the capital of France?")
    assert text.strip() and fin.completion_tokens >= 1
    mem = real_moe.memory_bytes()
    assert mem["dense"] == dense_params * 4 and mem["sets_cached"] >= 1
    # the expert set of a request comes from its embedding: the router's and our own agree
    emb = encoder.encode(["What is the capital of France?"])
    assert real_moe.expert_sets(emb)[0] in real_moe._sets
    # the shipped pre-gate keeps more of the importance than one static expert choice
    rep = real_moe.moe_report
    assert rep["oracle"] >= rep["gate"] > rep["static"]


@pytest.mark.slow
def test_real_moe_with_every_expert_on_gives_the_dense_logits(real_moe, models_dir):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(real_moe.weights_dir), dtype=torch.float32).eval()
    ids = real_moe.prompt_ids([("user", "Name three colours of the rainbow.")])
    real_moe.install([(m.gate, m.up, m.down) for m in real_moe.mlps])
    with torch.inference_mode():
        torch.testing.assert_close(real_moe.model(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   atol=2e-4, rtol=1e-4)
