"""A traffic-level budget solved per batch against a lambda tuned beforehand, on LLMRouter.

    .venv/bin/python benchmarks/traffic_budget.py [--set llmrouter] [--window 50]

Predictions: caprouter's kNN datastore built on the training split; test prompts in their file
order, the budget checked over consecutive windows of --window requests. For budgets between the
cheapest and the dearest single model's cost:
  (a) lambda tuned on the validation split so that its average cost there meets the budget;
  (b) lambda tuned on the validation split so that every validation window meets it;
  (c) RouteBatch: router.policy.budget.assign on each window of test prompts;
  (d) Route with budget_per_request: one request at a time, router.policy.budget.BudgetWindows;
  (e) (c) again at exactly the cost (a) realized, to compare the two at the same average cost.
Reported: realized average cost, share of windows over budget, accuracy. The last line is
key=value figures.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import embeddings, load  # noqa: I001
from routing_quality import knn_store

from router.core.config import AppConfig
from router.offline.routing_data import split_indices
from router.policy.budget import BudgetWindows, assign
from router.prediction.predictor import knn_estimates as store_predict


def tuned_lambda(Q, C, budget):
    """The lambda whose per-prompt choices average ``budget`` on (Q, C)."""
    return assign(Q, C, budget)[1]


def window_costs(C, picks, w):
    n = np.arange(len(picks))
    return np.array([C[s:s + w][n[:len(picks[s:s + w])], picks[s:s + w]].mean() for s in range(0, len(picks), w)])


def compliant_lambda(Q, C, budget, w):
    """The smallest lambda (of a fine grid) whose choices keep to the budget in every window of
    (Q, C): a lambda tuned for compliance rather than for the average."""
    for lam in np.concatenate([[0.0], np.geomspace(1e-4, 1e4, 400)]):
        if window_costs(C, np.argmax(Q - lam * C, 1), w).max() <= budget:
            return lam
    return 1e4


def windows(Q, C, budget, w):
    picks = np.empty(len(Q), dtype=np.int64)
    for s in range(0, len(Q), w):
        picks[s:s + w], _ = assign(Q[s:s + w], C[s:s + w], budget)
    return picks


def online(Q, C, budget, size):
    """One request at a time with a window budget, as Route with budget_per_request does."""
    win = BudgetWindows(size)
    names = tuple(str(j) for j in range(Q.shape[1]))
    picks = np.empty(len(Q), dtype=np.int64)
    for i in range(len(Q)):
        picks[i], _ = win.decide("bench", names, Q[i], C[i], budget)
        win.commit("bench", names, C[i, picks[i]])
    return picks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="llmrouter")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--online-window", type=int, default=100, help="routing.budget_window for the online mode")
    ap.add_argument("--shuffle", type=int, help="shuffle the test prompts with this seed (default: file order)")
    args = ap.parse_args()
    data = load(args.set)
    X = embeddings(args.set, data)
    tr, va, te = split_indices(data, seed=0)
    te, va = te[data.complete_rows()[te]], va[data.complete_rows()[va]]
    if args.shuffle is not None:
        te = np.random.default_rng(args.shuffle).permutation(te)
    cfg = AppConfig()
    mean_cost = np.nanmean(data.C[tr], 0)
    store = knn_store(X, data, tr, cfg)
    Qv, Cv = store_predict(store, X[va], data.backends, mean_cost)
    Qt, Ct = store_predict(store, X[te], data.backends, mean_cost)
    Y, C = data.Y[te], data.C[te]
    n = np.arange(len(te))
    singles = C.mean(0)
    w = args.window
    print(f"{args.set}: {len(te)} test prompts ({'file order' if args.shuffle is None else f'shuffled, seed {args.shuffle}'}), budgets checked over windows of {w}; single-model costs "
          f"{singles.min():.3f} .. {singles.max():.3f}")
    head = "| budget | policy | average cost | windows over budget | accuracy |"
    print(head + "\n|---|---|---|---|---|")
    res = {k: [] for k in ("lambda", "compliant", "batch", "online", "batch_same_cost")}
    budgets = [float(singles.min() + f * (singles.max() - singles.min())) for f in (0.2, 0.35, 0.5, 0.65, 0.8)]
    for budget in budgets:
        picks = {
            "lambda": np.argmax(Qt - tuned_lambda(Qv, Cv, budget) * Ct, 1),
            "compliant": np.argmax(Qt - compliant_lambda(Qv, Cv, budget, w) * Ct, 1),
            "batch": windows(Qt, Ct, budget, w),
            "online": online(Qt, Ct, budget, args.online_window),
        }
        picks["batch_same_cost"] = windows(Qt, Ct, C[n, picks["lambda"]].mean(), w)
        labels = {"lambda": "lambda tuned on validation (average)", "compliant": "lambda tuned on validation (every window)",
                  "batch": "RouteBatch per window (assign)", "online": f"Route, window budget ({args.online_window})",
                  "batch_same_cost": "RouteBatch at the tuned lambda's cost"}
        for k, p in picks.items():
            wc = window_costs(C, p, w)
            over = float(np.mean(wc > budget * (1 + 1e-4))) if k != "batch_same_cost" else float("nan")
            res[k].append((C[n, p].mean(), over, Y[n, p].mean()))
            print(f"| {budget:.3f} | {labels[k]} | {C[n, p].mean():.3f} | "
                  f"{'-' if k == 'batch_same_cost' else f'{over:.0%}'} | {Y[n, p].mean():.3f} |")
    m = {k: np.array(v) for k, v in res.items()}
    print(f"mean over budgets: accuracy lambda {m['lambda'][:, 2].mean():.4f}, compliant lambda "
          f"{m['compliant'][:, 2].mean():.4f}, batch {m['batch'][:, 2].mean():.4f}, online {m['online'][:, 2].mean():.4f}")
    print(f"windows_over_lambda={m['lambda'][:, 1].mean():.2f} windows_over_compliant={m['compliant'][:, 1].mean():.2f} "
          f"windows_over_batch={m['batch'][:, 1].mean():.2f} windows_over_online={m['online'][:, 1].mean():.2f} "
          f"acc_gain_batch_vs_compliant={m['batch'][:, 2].mean() - m['compliant'][:, 2].mean():+.4f} "
          f"acc_gain_batch_same_cost={m['batch_same_cost'][:, 2].mean() - m['lambda'][:, 2].mean():+.4f} "
          f"mean_cost_online={np.mean([r[0] for r in res['online']]):.3f} mean_budget={np.mean(budgets):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
