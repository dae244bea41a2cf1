"""Score a router's predictions on a test set with the metrics of router/metrics.py."""
from __future__ import annotations

from typing import Sequence

import numpy.typing as npt

from router import metrics as M


def evaluate(Qhat: npt.NDArray, Chat: npt.NDArray, Y: npt.NDArray, C: npt.NDArray,
             lambdas: Sequence[float] | None = None) -> dict[str, float]:
    """Qhat, Chat: (n, B) predicted quality and cost; Y, C: (n, B) truth (complete rows).

    aiq: area under the router's envelope over [cheapest, dearest single model];
    q_at_best_cost: quality the router reaches at the best single model's cost;
    cost_share_for_best_quality: cost to reach the best single model's quality / that model's cost.
    """
    lams = M.default_lambdas(C, Y) if lambdas is None else lambdas
    pts = M.sweep_points(Qhat, Chat, Y, C, lams)
    single = M.single_model_points(Y, C)
    costs = [c for c, _ in single]
    c_min, c_max = min(costs), max(costs)
    best = max(single, key=lambda p: (p[1], -p[0]))
    return {
        "aiq": M.aiq(pts, c_min, c_max),
        "q_at_best_cost": M.quality_at(pts, best[0]),
        "cost_share_for_best_quality": M.cost_to_reach(pts, best[1]) / best[0],
        "max_quality": max(q for _, q in pts),
    }


def zero_router(Y: npt.NDArray, C: npt.NDArray) -> dict[str, float]:
    single = M.single_model_points(Y, C)
    costs = [c for c, _ in single]
    best = max(single, key=lambda p: (p[1], -p[0]))
    return {"aiq": M.aiq(single, min(costs), max(costs)), "q_at_best_cost": M.quality_at(single, best[0]),
            "cost_share_for_best_quality": M.cost_to_reach(single, best[1]) / best[0],
            "max_quality": max(q for _, q in single)}


def two_backend(Qhat: npt.NDArray, Y: npt.NDArray, strong: int, weak: int) -> dict[str, float]:
    score = Qhat[:, strong] - Qhat[:, weak]
    ys, yw = Y[:, strong], Y[:, weak]
    return {"apgr": M.apgr(score, ys, yw), "cpt50": M.cpt(score, ys, yw, 0.5), "cpt80": M.cpt(score, ys, yw, 0.8)}
