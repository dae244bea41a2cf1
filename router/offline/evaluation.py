"""How routers are scored offline (RouterBench's AIQ, RouteLLM's APGR / CPT; ../shared/docs/background.md): the
metrics, and ``evaluate`` / ``zero_router`` / ``two_backend`` that apply them to a test set.
(Serving's counters and histograms are ``router.serving.telemetry``.)

A routing policy evaluated on a test set gives a point (average cost, average quality); a router
gives one point per setting of its knob (a lambda sweep). Mixing two policies at random reaches any
point on the segment between them, so what a router can deliver at each budget is the
non-decreasing upper concave envelope of its points.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Points = Sequence[tuple[float, float]]


def envelope(points: Points) -> npt.NDArray[np.float64]:
    """The non-decreasing upper concave envelope of (cost, quality) points: vertices, (m, 2),
    cost ascending. Beyond its last vertex the curve stays flat (a policy may spend less than the
    budget); below its first vertex nothing is reachable."""
    pts = np.asarray(sorted(set((float(c), float(q)) for c, q in points)), dtype=np.float64)
    if len(pts) == 0:
        raise ValueError("no points")
    # At equal cost only the best quality matters.
    keep = np.ones(len(pts), bool)
    keep[:-1] = pts[1:, 0] != pts[:-1, 0]
    pts = pts[keep]
    hull: list[np.ndarray] = []
    for p in pts:  # monotone chain, upper hull
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    h = np.array(hull)
    top = int(np.argmax(h[:, 1]))
    return h[: top + 1]


def quality_at(points: Points, cost: float) -> float:
    """Best quality reachable at average cost <= ``cost`` (0 below the cheapest point)."""
    h = envelope(points)
    if cost < h[0, 0]:
        return 0.0
    return float(np.interp(cost, h[:, 0], h[:, 1]))


def cost_to_reach(points: Points, quality: float) -> float:
    """Smallest average cost at which the envelope reaches ``quality`` (inf if never)."""
    h = envelope(points)
    if quality <= h[0, 1]:
        return float(h[0, 0])
    if quality > h[-1, 1] + 1e-12:
        return float("inf")
    i = int(np.searchsorted(h[:, 1], quality))  # envelope qualities are increasing
    (x1, y1), (x2, y2) = h[i - 1], h[i]
    return float(x1 + (quality - y1) * (x2 - x1) / (y2 - y1))


def aiq(points: Points, c_min: float, c_max: float, *, grid: int = 4001) -> float:
    """RouterBench's Average Improvement in Quality: the envelope integrated over
    [c_min, c_max] (cheapest and dearest single model), divided by (c_max - c_min).

    When every backend costs the same (c_max == c_min: quality-only routing), the interval is a
    point and the mean is the envelope's value there: the best quality reached at that cost, i.e.
    the router's accuracy."""
    if c_max < c_min:
        raise ValueError("c_max must not be below c_min")
    if c_max - c_min <= 1e-12 * max(1.0, abs(c_max)):
        return quality_at(points, c_max)
    h = envelope(points)
    xs = np.linspace(c_min, c_max, grid)
    ys = np.where(xs < h[0, 0], 0.0, np.interp(xs, h[:, 0], h[:, 1]))
    return float(np.trapezoid(ys, xs) / (c_max - c_min))


def single_model_points(Y: npt.NDArray, C: npt.NDArray) -> list[tuple[float, float]]:
    """Y, C: (n, B) true quality and cost -> one (cost, quality) point per backend."""
    return [(float(C[:, j].mean()), float(Y[:, j].mean())) for j in range(Y.shape[1])]


def sweep_points(Qhat: npt.NDArray, Chat: npt.NDArray, Y: npt.NDArray, C: npt.NDArray,
                 lambdas: Sequence[float] | npt.NDArray[np.float64]) -> list[tuple[float, float]]:
    """For each lambda, pick argmax(Qhat - lambda * Chat) per prompt; realized (cost, quality).

    Qhat, Chat: (n, B) predictions; Y, C: (n, B) truth.
    """
    n = np.arange(Y.shape[0])
    out = []
    for lam in lambdas:
        pick = np.argmax(Qhat - lam * Chat, axis=1)
        out.append((float(C[n, pick].mean()), float(Y[n, pick].mean())))
    return out


def default_lambdas(C: npt.NDArray, Y: npt.NDArray, n: int = 80) -> npt.NDArray[np.float64]:
    """A sweep from 0 to a lambda large enough that the cheapest backend always wins."""
    spread = float(np.ptp(C.mean(0))) or 1.0
    return np.concatenate([[0.0], np.geomspace(1e-4, 1e2, n - 1) / spread])


def per_backend_accuracy(Y: npt.NDArray, names: Sequence[str]) -> dict[str, float]:
    return {b: float(Y[:, j].mean()) for j, b in enumerate(names)}


def pgr_curve(score: npt.NDArray, y_strong: npt.NDArray, y_weak: npt.NDArray) -> tuple[npt.NDArray, npt.NDArray]:
    """RouteLLM's performance gap recovered, for two backends.

    score: (n,) the router's preference for the strong backend; the k prompts with the highest
    scores go to the strong one. Returns (share of strong calls k/n for k = 0..n, PGR at it).
    """
    order = np.argsort(-score, kind="stable")
    ys, yw = y_strong[order], y_weak[order]
    n = len(score)
    gain = np.concatenate([[0.0], np.cumsum(ys - yw)])          # quality gain of sending the top k
    q = (yw.sum() + gain) / n
    qw, qs = yw.mean(), ys.mean()
    return np.arange(n + 1) / n, (q - qw) / (qs - qw)


def apgr(score: npt.NDArray, y_strong: npt.NDArray, y_weak: npt.NDArray) -> float:
    """Average PGR over the share of strong calls from 0 to 100%."""
    share, pgr = pgr_curve(score, y_strong, y_weak)
    return float(np.trapezoid(pgr, share))


def cpt(score: npt.NDArray, y_strong: npt.NDArray, y_weak: npt.NDArray, target: float) -> float:
    """Call-performance threshold: the smallest share of strong calls with PGR >= target."""
    share, pgr = pgr_curve(score, y_strong, y_weak)
    hit = np.where(pgr >= target - 1e-12)[0]
    return float(share[hit[0]]) if len(hit) else float("nan")


def evaluate(Qhat: npt.NDArray, Chat: npt.NDArray, Y: npt.NDArray, C: npt.NDArray,
             lambdas: Sequence[float] | None = None) -> dict[str, float]:
    """Qhat, Chat: (n, B) predicted quality and cost; Y, C: (n, B) truth (complete rows).

    aiq: area under the router's envelope over [cheapest, dearest single model];
    q_at_best_cost: quality the router reaches at the best single model's cost;
    cost_share_for_best_quality: cost to reach the best single model's quality / that model's cost.
    """
    lams = default_lambdas(C, Y) if lambdas is None else lambdas
    pts = sweep_points(Qhat, Chat, Y, C, lams)
    single = single_model_points(Y, C)
    costs = [c for c, _ in single]
    c_min, c_max = min(costs), max(costs)
    best = max(single, key=lambda p: (p[1], -p[0]))
    out = {
        "aiq": aiq(pts, c_min, c_max),
        "q_at_best_cost": quality_at(pts, best[0]),
        "cost_share_for_best_quality": cost_to_reach(pts, best[1]) / best[0] if best[0] > 0 else float("nan"),
        "max_quality": max(q for _, q in pts),
    }
    if c_max - c_min <= 1e-12 * max(1.0, abs(c_max)):
        # Quality-only routing: what fits is accuracy, against the best single backend and the oracle.
        n = np.arange(Y.shape[0])
        out.update(equal_costs=1.0, accuracy=float(Y[n, np.argmax(Qhat, axis=1)].mean()),
                   best_single=float(best[1]), oracle=float(Y.max(axis=1).mean()))
    return out


def zero_router(Y: npt.NDArray, C: npt.NDArray) -> dict[str, float]:
    single = single_model_points(Y, C)
    costs = [c for c, _ in single]
    best = max(single, key=lambda p: (p[1], -p[0]))
    return {"aiq": aiq(single, min(costs), max(costs)), "q_at_best_cost": quality_at(single, best[0]),
            "cost_share_for_best_quality": cost_to_reach(single, best[1]) / best[0] if best[0] > 0 else float("nan"),
            "max_quality": max(q for _, q in single)}


def two_backend(Qhat: npt.NDArray, Y: npt.NDArray, strong: int, weak: int) -> dict[str, float]:
    score = Qhat[:, strong] - Qhat[:, weak]
    ys, yw = Y[:, strong], Y[:, weak]
    return {"apgr": apgr(score, ys, yw), "cpt50": cpt(score, ys, yw, 0.5), "cpt80": cpt(score, ys, yw, 0.8)}
