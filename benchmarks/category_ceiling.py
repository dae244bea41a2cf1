"""How much of each set's routing signal is coarse (which task or subject a prompt is from)?

    .venv/bin/python benchmarks/category_ceiling.py [--sets llmrouter,mmlu_pro,routellm]

Reference router that is told each test prompt's category label (which no served router sees):
it predicts every backend's quality as that backend's mean score over the training prompts of
the same category (shrunk towards its overall mean by 5 pseudo-prompts). Printed with the zero
router, kNN (k=40) and the oracle on the split of benchmarks/routing_quality.py, and caprouter's
AIQ from that benchmark's last run where one is on disk. A router that only recognises the
category cannot beat this reference by much; the margin over it is per-prompt signal. The last
line is key=value figures.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from common import OUT, embeddings, load  # noqa: I001

from router.offline import baselines
from router.offline.evaluation import evaluate, zero_router
from router.offline.routing_data import split_indices


def category_router(cats_train: np.ndarray, Ytr: np.ndarray, cats_test: np.ndarray, prior: float = 5.0) -> np.ndarray:
    """(n_test, B) per-category mean scores of the training rows (NaN = not observed)."""
    glob = np.nanmean(Ytr, 0)
    out = np.tile(glob, (len(cats_test), 1)).astype(np.float32)
    for c in np.unique(cats_test):
        rows = Ytr[cats_train == c]
        if not len(rows):
            continue
        n = (~np.isnan(rows)).sum(0)
        mean = np.where(n > 0, np.nansum(rows, 0) / np.maximum(n, 1), glob)
        out[cats_test == c] = (n * mean + prior * glob) / (n + prior)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="llmrouter,mmlu_pro,routellm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    last = {}
    path = OUT / "routing_quality.json"
    if path.exists():
        last = {r["set"]: r["rows"][r["main"]]["aiq"] for r in json.loads(path.read_text())}
    figures = {}
    print("| set | categories | zero router | kNN (k=40) | category labels (reference) | caprouter (last run) | oracle |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        data = load(name)
        X = embeddings(name, data)
        tr, va, te = split_indices(data, seed=args.seed)
        te = te[data.complete_rows()[te]]
        fit = np.concatenate([tr, va])          # the training data every router saw
        cats = np.array(data.categories)
        Y, C = data.Y[te], data.C[te]
        Chat = np.tile(np.nanmean(data.C[tr], 0), (len(te), 1))
        zero = zero_router(Y, C)["aiq"]
        knn = evaluate(baselines.knn_router(X[tr], data.Y[tr], X[te], 40), Chat, Y, C)["aiq"]
        cat = evaluate(category_router(cats[fit], data.Y[fit], cats[te]), Chat, Y, C)["aiq"]
        orc = evaluate(Y, Chat, Y, C)["aiq"]
        cap = last.get(name)
        print(f"| {name} | {len(np.unique(cats))} | {zero:.3f} | {knn:.3f} | {cat:.3f} | "
              f"{'' if cap is None else f'{cap:.3f}'} | {orc:.3f} |")
        figures.update({f"{name}_knn_aiq": knn, f"{name}_category_aiq": cat, f"{name}_zero_aiq": zero})
        if cap is not None:
            figures[f"{name}_caprouter_aiq"] = cap
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
