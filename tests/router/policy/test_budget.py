import itertools

import numpy as np
import pytest

from router.core.errors import InvalidArgument
from router.policy.budget import assign


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


def test_window_budget_follows_the_traffic_where_a_tuned_lambda_drifts():
    from router.policy.budget import BudgetWindows

    rng = np.random.default_rng(3)
    n, B, budget = 1200, 4, 2.0
    base_cost = np.array([0.5, 1.5, 3.0, 6.0])
    Q = np.clip(rng.normal([0.3, 0.5, 0.6, 0.75], 0.15, (n, B)), 0, 1)
    C = base_cost * rng.uniform(0.8, 1.2, (n, B))
    Q[n // 2:, 2:] += 0.25                             # harder traffic halfway: the big models pull ahead

    def lam_for(Qs, Cs):
        return assign(Qs, Cs, budget)[1]

    fixed = lam_for(Q[: n // 2], C[: n // 2])          # tuned on the first half's traffic
    rows = np.arange(n)
    fixed_pick = np.argmax(Q - fixed * C, 1)
    win = BudgetWindows(size=100)
    names = ("a", "b", "c", "d")
    win_pick = np.empty(n, dtype=np.int64)
    for i in range(n):
        win_pick[i], _ = win.decide("app", names, Q[i], C[i], budget)
        win.commit("app", names, C[i, win_pick[i]])
    late = rows >= n // 2 + 100
    assert C[late, fixed_pick[late]].mean() > budget * 1.2           # the tuned lambda overspends after the shift
    assert abs(C[late, win_pick[late]].mean() - budget) < 0.1 * budget
    assert abs(C[rows < n // 2, win_pick[rows < n // 2]].mean() - budget) < 0.1 * budget


def test_window_budgets_are_kept_per_key_and_impossible_budgets_go_cheapest():
    from router.policy.budget import BudgetWindows

    win = BudgetWindows(size=10, max_keys=2)
    q, c = np.array([0.9, 0.2]), np.array([10.0, 1.0])
    assert win.decide("a", ("x", "y"), q, c, 100.0) == (0, 0.0)      # not binding
    assert win.decide("b", ("x", "y"), q, c, 0.5)[0] == 1             # below the cheapest: cheapest
    assert win.decide("b", ("x", "y"), q, c, 100.0, np.array([False, True]))[0] == 1   # eligibility holds
    win.decide("c", ("x", "y"), q, c, 5.0)
    assert len(win._w) == 2                                           # oldest key evicted
