"""Prompt-tailored architecture codes: OT assignment, masks, the joint rounds (tiny random Llama)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from router.offline import codes as C


@pytest.mark.parametrize("shares", [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1 / 3] * 3])
def test_ot_assignment_respects_the_marginals(shares):
    q = np.random.default_rng(0).random((200, 3))
    a = C.ot_assign(q, shares)
    counts = np.bincount(a, minlength=3)
    np.testing.assert_allclose(counts, np.asarray(shares) * 200, atol=2)


def test_ot_assignment_sends_each_code_the_prompts_that_gain_most_from_it():
    # code 0 is big (better for everyone), code 1 small; prompts 0-9 lose much on the small one
    q = np.full((40, 2), 0.8)
    q[:, 1] = 0.7
    q[:10, 1] = 0.1
    a = C.ot_assign(q, [0.25, 0.75])
    assert (a[:10] == 0).all() and (a[10:] == 1).all()


def test_masks_have_the_requested_sizes_and_follow_the_member_prompts():
    rng = np.random.default_rng(1)
    act = rng.random((20, 2, 64)).astype(np.float32)
    act[:10, :, :8] += 10        # prompts 0-9 need neurons 0-7
    act[10:, :, 8:16] += 10      # prompts 10-19 need neurons 8-15
    wn = np.ones((2, 64), np.float32)
    members = np.arange(20) < 10
    for keep in (0.25, 0.5, 1.0):
        rows = C.top_rows(C.code_importance(act, wn, members), keep)
        assert all(len(r) == round(keep * 64) and (np.diff(r) > 0).all() for r in rows)
    # no tailoring: every code gets the static importance, whatever its prompts
    np.testing.assert_allclose(C.code_importance(act, wn, members, 0.0), C.code_importance(act, wn, ~members, 0.0))
    a = C.top_rows(C.code_importance(act, wn, members), 0.125)
    b = C.top_rows(C.code_importance(act, wn, ~members), 0.125)
    assert a[0].tolist() == list(range(8)) and b[0].tolist() == list(range(8, 16))


def test_masked_evaluation_equals_the_materialized_code_and_all_kept_is_dense(tiny):
    import copy

    from backends.pruning import prune_mlp_rows

    ids = torch.randint(0, 128, (1, 10))
    with torch.inference_mode():
        dense = tiny(input_ids=ids).logits.clone()
    rows = [np.sort(np.random.default_rng(i).permutation(64)[:40]) for i in range(2)]
    materialized = copy.deepcopy(tiny)
    prune_mlp_rows(materialized, [torch.as_tensor(r) for r in rows])
    assert materialized.config.intermediate_size == 40
    masks = C.MaskedMLPs(tiny)
    with torch.inference_mode():
        torch.testing.assert_close(tiny(input_ids=ids).logits, dense, atol=1e-5, rtol=1e-5)
        masks.use(rows)
        torch.testing.assert_close(tiny(input_ids=ids).logits, materialized(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        masks.use([np.arange(64)] * 2)
        torch.testing.assert_close(tiny(input_ids=ids).logits, dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        prune_mlp_rows(copy.deepcopy(materialized), [torch.arange(10), torch.arange(12)])


@pytest.mark.slow  # trains for many seconds
def test_joint_rounds_keep_the_marginals_and_do_not_collapse(tiny):
    rng = np.random.default_rng(0)
    p = 48
    act = rng.random((p, 2, 64)).astype(np.float32)
    emb = rng.normal(size=(p, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    seqs = [torch.randint(0, 128, (1, 14)) for _ in range(p)]
    specs = [C.CodeSpec("big", 0.75, 0.5), C.CodeSpec("small", 0.25, 0.5)]
    masks = C.MaskedMLPs(tiny)
    res = C.joint_codes(masks, tiny, act, np.ones((2, 64), np.float32), emb, seqs, [4] * p, specs, rounds=2,
                        categories=["a", "b"] * (p // 2))
    assert len(res.history) == 2
    assert np.bincount(res.assignment, minlength=2).tolist() == [24, 24]
    for h in res.history:
        assert abs(h["codes"]["big"]["share"] - 0.5) < 0.05 and h["codes"]["small"]["top_categories"]
    assert [len(r) for r in res.rows[0]] == [48, 48] and [len(r) for r in res.rows[1]] == [16, 16]
    # the tiny model is left dense
    assert all(m.active[0] is m.gate for m in masks.mlps)


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    from router.core.errors import ConfigError

    with pytest.raises(ConfigError, match="codes.json"):
        C.load_manifest(tmp_path)
    (tmp_path / "codes.json").write_text('{"version": 99}')
    with pytest.raises(ConfigError, match="version 99"):
        C.load_manifest(tmp_path)
