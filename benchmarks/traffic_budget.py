"""A traffic-level budget solved per batch against a lambda tuned beforehand, on LLMRouter.

    .venv/bin/python benchmarks/traffic_budget.py [--set llmrouter] [--window 50]

Predictions: caprouter's kNN datastore built on the training split. For budgets between the
cheapest and the dearest single model's cost: (a) lambda tuned on the validation split so that
its average cost there meets the budget, then applied per prompt on test; (b) router.budget.assign
on each window of test prompts with the same budget. Reported: realized average cost, share of
windows over budget, and accuracy; then (b) again at exactly the cost (a) realized, so both are
compared at the same average cost. The last line is key=value figures.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import embeddings, load  # noqa: I001
from routing_quality import knn_store

from router.training import knn_estimates as store_predict

from router.budget import assign
from router.config import AppConfig
from router.routing_data import split_indices


def tuned_lambda(Q, C, budget):
    lo, hi = 0.0, 1.0
    n = np.arange(len(Q))
    while C[n, np.argmax(Q - hi * C, 1)].mean() > budget and hi < 1e12:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if C[n, np.argmax(Q - mid * C, 1)].mean() > budget:
            lo = mid
        else:
            hi = mid
    return hi


def windows(Q, C, Y, budget, w):
    picks = np.empty(len(Q), dtype=np.int64)
    for s in range(0, len(Q), w):
        picks[s:s + w], _ = assign(Q[s:s + w], C[s:s + w], budget)
    return picks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="llmrouter")
    ap.add_argument("--window", type=int, default=50)
    args = ap.parse_args()
    data = load(args.set)
    X = embeddings(args.set, data)
    tr, va, te = split_indices(data, seed=0)
    te, va = te[data.complete_rows()[te]], va[data.complete_rows()[va]]
    cfg = AppConfig()
    mean_cost = np.nanmean(data.C[tr], 0)
    store = knn_store(X, data, tr, cfg)
    Qv, Cv = store_predict(store, X[va], data.backends, mean_cost)
    Qt, Ct = store_predict(store, X[te], data.backends, mean_cost)
    Y, C = data.Y[te], data.C[te]
    n = np.arange(len(te))
    singles = C.mean(0)
    print(f"{args.set}: {len(te)} test prompts in windows of {args.window}; single-model costs "
          f"{singles.min():.3f} .. {singles.max():.3f}")
    print(f"{'budget':>8} | {'tuned-lambda cost':>17} {'windows over':>12} {'accuracy':>9} | "
          f"{'batch cost':>10} {'windows over':>12} {'accuracy':>9} | {'batch @ same cost':>17}")
    gains, overs = [], []
    for frac in (0.2, 0.35, 0.5, 0.65, 0.8):
        budget = float(singles.min() + frac * (singles.max() - singles.min()))
        lam = tuned_lambda(Qv, Cv, budget)
        p_l = np.argmax(Qt - lam * Ct, 1)
        p_b = windows(Qt, Ct, Y, budget, args.window)
        cost_l = C[n, p_l].mean()
        over_l = np.mean([C[s:s + args.window][np.arange(len(p_l[s:s + args.window])), p_l[s:s + args.window]].mean()
                          > budget * (1 + 1e-4) for s in range(0, len(te), args.window)])
        over_b = np.mean([C[s:s + args.window][np.arange(len(p_b[s:s + args.window])), p_b[s:s + args.window]].mean()
                          > budget * (1 + 1e-4) for s in range(0, len(te), args.window)])
        p_same = windows(Qt, Ct, Y, cost_l, args.window)
        q_l, q_b, q_same = Y[n, p_l].mean(), Y[n, p_b].mean(), Y[n, p_same].mean()
        gains.append(q_same - q_l)
        overs.append((over_l, over_b))
        print(f"{budget:>8.3f} | {cost_l:>17.3f} {over_l:>12.0%} {q_l:>9.3f} | {C[n, p_b].mean():>10.3f} "
              f"{over_b:>12.0%} {q_b:>9.3f} | {q_same:>17.3f}")
    print(f"batch assignment at the tuned lambda's realized cost: accuracy {np.mean(gains):+.4f} on average")
    print(f"mean_gain_same_cost={np.mean(gains):+.4f} windows_over_budget_lambda={np.mean([o[0] for o in overs]):.2f} "
          f"windows_over_budget_batch={np.mean([o[1] for o in overs]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
