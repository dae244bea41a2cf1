import itertools

import numpy as np
import pytest

from router.budget import assign
from router.errors import InvalidArgument


def brute_force(Q, C, budget):
    n, B = Q.shape
    best, arg = -1.0, None
    for choice in itertools.product(range(B), repeat=n):
        c = np.mean([C[i, j] for i, j in enumerate(choice)])
        if c <= budget + 1e-12:
            q = sum(Q[i, j] for i, j in enumerate(choice))
            if q > best:
                best, arg = q, choice
    return best, arg


@pytest.mark.parametrize("seed", range(8))
def test_meets_the_budget_and_is_near_the_integer_optimum(seed):
    rng = np.random.default_rng(seed)
    n, B = 6, 3
    Q = rng.random((n, B))
    C = np.sort(rng.random((n, B)) * 4, axis=1) + np.arange(B)   # dearer backends cost more
    budget = float(np.mean([C[:, 0].mean(), C[:, -1].mean()]))
    choice, lam = assign(Q, C, budget)
    assert C[np.arange(n), choice].mean() <= budget + 1e-9
    opt, _ = brute_force(Q, C, budget)
    got = Q[np.arange(n), choice].sum()
    # The LP relaxation differs from the integer optimum by at most one prompt's quality.
    assert got >= opt - Q.max() - 1e-9
    assert lam >= 0


def test_no_binding_budget_picks_the_best_quality():
    Q = np.array([[0.9, 0.1], [0.2, 0.8]])
    C = np.array([[5.0, 1.0], [5.0, 1.0]])
    choice, lam = assign(Q, C, 100.0)
    assert choice.tolist() == [0, 1] and lam == 0.0


def test_budget_spends_where_quality_per_cost_is_highest():
    # Both prompts prefer the dear backend; the budget affords it for one: the bigger gain wins.
    Q = np.array([[0.9, 0.5], [0.6, 0.5]])
    C = np.array([[3.0, 1.0], [3.0, 1.0]])
    choice, _ = assign(Q, C, 2.0)
    assert choice.tolist() == [0, 1]


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(InvalidArgument, match="below the cheapest"):
        assign(np.ones((2, 2)), np.full((2, 2), 3.0), 1.0)
