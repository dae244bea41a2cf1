"""Does the approximate index cost routing quality? The datastore's kNN router on the shared
routing data sets, with the exact (flat) search against HNSW and IVF forced on (min_size 0),
on the same split and embeddings as benchmarks/routing_quality.py (training rows in the store,
the test split routed).

    .venv/bin/python benchmarks/ann_quality.py [--sets llmrouter,mmlu_pro,routellm] [--kinds hnsw,ivf]

The issue's rule: the approximate index may be the default only if every set's AIQ stays within
0.003 of the exact index's. The last line is key=value figures.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import embeddings, load  # noqa: I001

from datastore.store import AnnSettings, FaissKnnDatastore
from router.core.config import AppConfig
from router.offline.evaluation import evaluate
from router.offline.routing_data import split_indices
from router.prediction.predictor import knn_estimates

TOLERANCE = 0.003


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="llmrouter,mmlu_pro,routellm")
    ap.add_argument("--kinds", default="hnsw,ivf")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    cfg = AppConfig().datastore
    figures: dict[str, str] = {}
    print("| set | rows in the store | exact AIQ | " + " | ".join(f"{k} AIQ (delta)" for k in kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    worst = 0.0
    for name in [s for s in args.sets.split(",") if s]:
        data = load(name)
        X = embeddings(name, data)
        tr, _, te = split_indices(data, seed=args.seed)
        te = te[data.complete_rows()[te]]
        records = [data.records[i] for i in tr]
        mean_cost = np.nanmean(data.C[tr], 0)
        Y, C = data.Y[te], data.C[te]
        aiq = {}
        for kind in ["off", *kinds]:
            store = FaissKnnDatastore.from_records(X[tr], records, k=cfg.k, prior_strength=cfg.prior_strength,
                                                   temperature=cfg.temperature, ann=AnnSettings(kind, min_size=0))
            Q, Chat = knn_estimates(store, X[te], data.backends, mean_cost)
            aiq[kind] = evaluate(Q, Chat, Y, C)["aiq"]
        cells = []
        for k in kinds:
            d = aiq[k] - aiq["off"]
            worst = max(worst, abs(d)) if k == "hnsw" else worst
            cells.append(f"{aiq[k]:.4f} ({d:+.4f})")
            figures[f"{name}_aiq_{k}_delta"] = f"{d:+.5f}"
        figures[f"{name}_aiq_exact"] = f"{aiq['off']:.4f}"
        print(f"| {name} | {len(tr):,} | {aiq['off']:.4f} | " + " | ".join(cells) + " |", flush=True)
    figures["worst_abs_aiq_delta_hnsw"] = f"{worst:.5f}"
    figures["hnsw_within_tolerance"] = str(worst <= TOLERANCE).lower()
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
