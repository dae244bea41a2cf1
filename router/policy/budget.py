"""Traffic-level budgets: route a batch of prompts to maximize total predicted quality subject to
an average cost per request, instead of a greedy per-prompt choice with a fixed lambda.

The problem is the linear program

    max_x  sum_ib x_ib Q_ib   s.t.  sum_b x_ib = 1,   (1/n) sum_ib x_ib C_ib <= budget,   x >= 0

(a transport problem from prompts to backends with one side constraint). Its Lagrangian dual has
one variable, the price of cost lambda; for a given lambda the inner problem is solved per prompt
by argmax(Q - lambda C). The optimal lambda is found by bisection, and the LP's optimum mixes the
two argmax solutions around it on at most one prompt's worth of cost: prompts are moved to their
lambda_high choice in order of best quality given up per unit of cost saved until the budget holds.
So the batch is routed at the lambda that this batch needs, where a lambda tuned beforehand
overshoots or undershoots the budget on batches unlike its tuning data.
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from router.core.errors import InvalidArgument

FloatArray = npt.NDArray[np.float64]
# One budget key's window: (quality (B,), cost (B,)) predicted per request, and the cost spent on it.
Window = tuple[deque[tuple[FloatArray, FloatArray]], deque[float]]


def assign(Q: npt.ArrayLike, C: npt.ArrayLike, budget: float, *, eligible: npt.NDArray[np.bool_] | None = None,
           iters: int = 60) -> tuple[npt.NDArray[np.int64], float]:
    """Q, C: (n, B) predicted quality and cost; budget: average cost per request; eligible: (n, B)
    which backends each prompt may use (None: all; every row needs one).

    Returns (choice (n,), lambda). The average predicted cost of the choice is <= budget, unless
    even the cheapest eligible backend for every prompt exceeds it (then InvalidArgument).
    """
    Q = np.asarray(Q, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    if eligible is not None:
        # Priced out: never chosen, never the cheapest.
        ok = np.asarray(eligible, dtype=bool)
        Q, C = np.where(ok, Q, -np.inf), np.where(ok, C, np.inf)
    n = len(Q)
    rows = np.arange(n)
    cheapest = C.argmin(1)
    if C[rows, cheapest].mean() > budget + 1e-12:
        raise InvalidArgument(f"budget {budget:g} is below the cheapest possible average cost "
                              f"{C[rows, cheapest].mean():.4g}")

    def pick(lam: float) -> npt.NDArray[np.int64]:
        # Ties broken towards the cheaper backend, so a large lambda reaches the cheapest choice.
        return np.asarray(np.argmax(Q - (lam + 1e-12) * C, 1), dtype=np.int64)

    low = pick(0.0)
    if C[rows, low].mean() <= budget:
        return low, 0.0
    lo, hi = 0.0, 1.0
    while C[rows, pick(hi)].mean() > budget:
        hi *= 2
        if hi > 1e12:
            return cheapest, hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if C[rows, pick(mid)].mean() > budget:
            lo = mid
        else:
            hi = mid
    a, b = pick(lo), pick(hi)        # a: over budget, b: within budget
    choice = a.copy()
    moved = np.where(a != b)[0]
    dq = Q[moved, a[moved]] - Q[moved, b[moved]]     # quality given up by moving to b
    dc = C[moved, a[moved]] - C[moved, b[moved]]     # cost saved
    order = moved[np.argsort(dq / np.maximum(dc, 1e-12))]
    excess = C[rows, choice].sum() - budget * n
    for i in order:
        if excess <= 1e-9:
            break
        excess -= C[i, choice[i]] - C[i, b[i]]
        choice[i] = b[i]
    return choice, hi


class BudgetWindows:
    """Window budgets for one-at-a-time routing. For each budget key: the predictions of the last
    ``size`` requests and what was actually spent on them. A new request is routed by solving
    ``assign`` over that window plus the request itself and taking the request's own assignment:
    the recent traffic stands in for the traffic to come, so a request gets an expensive backend
    only if it is among the window's best uses of the money. The budget the window is solved for
    is corrected by the window's realized overspend or underspend, so the average over the
    window converges to the budget instead of drifting. Unlike a lambda tuned once, this follows
    the traffic as it changes.

    A budget the window cannot meet even with the cheapest choices sends the request to its
    cheapest eligible backend rather than failing: the window's history is not the caller's fault.
    """

    def __init__(self, size: int, max_keys: int = 1024) -> None:
        self.size, self.max_keys = size, max_keys
        self._w: OrderedDict[tuple[str, tuple[str, ...]], Window] = OrderedDict()
        self._lock = threading.Lock()

    def _window(self, key: str, names: tuple[str, ...]) -> Window:
        k = (key, tuple(names))
        win = self._w.get(k)
        if win is None:
            win = self._w[k] = (deque(maxlen=self.size), deque(maxlen=self.size))
            while len(self._w) > self.max_keys:
                self._w.popitem(last=False)
        self._w.move_to_end(k)
        return win

    def decide(self, key: str, names: Sequence[str], quality: npt.ArrayLike, cost: npt.ArrayLike, budget: float,
               eligible: npt.NDArray[np.bool_] | None = None) -> tuple[int, float]:
        """quality, cost: (B,) this request's predictions over ``names``; eligible: (B,) which it may
        use. Returns (index of its backend, the window's lambda). Call ``commit`` with what the
        request was really routed to."""
        q = np.asarray(quality, dtype=np.float64)
        c = np.asarray(cost, dtype=np.float64)
        with self._lock:
            preds, spent = self._window(key, tuple(names))
            preds.append((q, c))
            Q = np.stack([r[0] for r in preds])
            C = np.stack([r[1] for r in preds])
            fill = len(spent) / self.size
            realized = float(np.mean(spent)) if spent else budget
        # Integral correction: spend less while the window is over budget, more while under.
        target = max(budget + (budget - realized) * fill, 0.0)
        mask = np.ones(Q.shape, dtype=bool)           # earlier requests: what they could have used
        if eligible is not None:
            mask[-1] = np.asarray(eligible, dtype=bool)
        try:
            choice, lam = assign(Q, C, target, eligible=mask)
        except InvalidArgument:                       # even the cheapest choices exceed it
            return int(np.argmin(np.where(mask[-1], c, np.inf))), 1e12
        return int(choice[-1]), float(lam)

    def commit(self, key: str, names: Sequence[str], cost: float) -> None:
        with self._lock:
            self._window(key, tuple(names))[1].append(float(cost))
