"""Onboarding a backend by aptitude test, against retraining with it (Model-SAT), on LLMRouter.

    .venv/bin/python benchmarks/onboarding.py [--set llmrouter] [--aptitude 100] [--holdout NAME]

For each held-out backend (default: every backend in turn): train the router without it; pick a
fixed aptitude set of --aptitude training prompts; put the held-out backend's outcomes on those
prompts (only) into the datastore; fit its vector with the prompt side frozen
(encoders.capability.onboard); evaluate test AIQ over all backends. Reference: the router
retrained on the full training data with every backend, same split, same seed. Target: onboarded
AIQ >= 95% of retrained. The last line is key=value figures.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import embeddings, load  # noqa: I001

from datastore.records import OutcomeRecord
from encoders.capability import CapabilityConfig, add_backend, onboard, predict, train
from router.config import AppConfig
from router.evaluate import evaluate
from router.routing_data import split_indices
from router.training import knn_estimates, knn_store, out_of_fold_knn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="llmrouter")
    ap.add_argument("--aptitude", type=int, default=100)
    ap.add_argument("--holdout", help="one backend (default: each in turn)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load(args.set)
    X = embeddings(args.set, data)
    tr, va, te = split_indices(data, seed=args.seed)
    te = te[data.complete_rows()[te]]
    cfg = AppConfig()
    ds = cfg.datastore
    mean_cost = np.nanmean(data.C[tr], 0)
    Y, C = data.Y[te], data.C[te]
    names = data.backends

    def store_of(idx, keep):
        recs = [OutcomeRecord(id=data.records[i].id, prompt="", scores={b: s for b, s in data.records[i].scores.items()
                                                                         if b in keep}) for i in idx]
        return knn_store(X[idx], recs, ds)

    # Reference: retrained with every backend.
    full_store = store_of(tr, set(names))
    K = out_of_fold_knn(X[tr], [data.records[i] for i in tr], names, ds, seed=args.seed)
    Kv = knn_estimates(full_store, X[va], names, mean_cost)[0]
    ccfg = CapabilityConfig(seed=args.seed)
    full = train(X[tr], data.Y[tr], X[va], data.Y[va], ccfg, K=K, Kv=Kv).model
    Qk, Chat = knn_estimates(full_store, X[te], names, mean_cost)
    ref = evaluate(predict(full, X[te], Qk), Chat, Y, C)["aiq"]
    print(f"{args.set}: retrained with all {len(names)} backends: test AIQ {ref:.4f}")

    rng = np.random.default_rng(args.seed)
    apt = np.sort(rng.choice(tr, size=args.aptitude, replace=False))
    ratios = []
    for held in ([args.holdout] if args.holdout else names):
        j = names.index(held)
        rest = [b for b in names if b != held]
        rcols = [names.index(b) for b in rest]
        # The router without the held-out backend.
        store = store_of(tr, set(rest))
        Kr = out_of_fold_knn(X[tr], [OutcomeRecord(id=data.records[i].id, prompt="", scores={
            b: s for b, s in data.records[i].scores.items() if b != held}) for i in tr], rest, ds, seed=args.seed)
        Kvr = knn_estimates(store, X[va], rest, mean_cost[rcols])[0]
        model = train(X[tr], data.Y[tr][:, rcols], X[va], data.Y[va][:, rcols], ccfg, K=Kr, Kv=Kvr).model
        # Onboarding: the held-out backend's aptitude outcomes join the datastore; its vector is fitted.
        y_apt = data.Y[apt, j]
        ok = ~np.isnan(y_apt)
        fold = np.arange(len(apt)) % 5
        k_apt = np.zeros(len(apt), np.float32)
        for f in range(5):
            s = store_of(apt[(fold != f) & ok], {held})
            k_apt[fold == f] = knn_estimates(s, X[apt[fold == f]], [held], mean_cost[[j]])[0][:, 0]
        g, b, h = onboard(model, X[apt[ok]], y_apt[ok], knn=k_apt[ok])
        on = add_backend(model, g, b, h, ccfg)
        order = rest + [held]
        apt_store = store_of(apt[ok], {held})
        q_rest, c_rest = knn_estimates(store, X[te], rest, mean_cost[rcols])
        q_new, c_new = knn_estimates(apt_store, X[te], [held], mean_cost[[j]])
        Kt = np.concatenate([q_rest, q_new], 1)
        Ct = np.concatenate([c_rest, c_new], 1)
        cols = [names.index(b) for b in order]
        aiq = evaluate(predict(on, X[te], Kt), Ct, Y[:, cols], C[:, cols])["aiq"]
        ratios.append(aiq / ref)
        print(f"held out {held:<36} onboarded with {ok.sum()} aptitude prompts: AIQ {aiq:.4f} "
              f"({aiq / ref:.1%} of retrained)")
    print(f"min_ratio={min(ratios):.3f} mean_ratio={np.mean(ratios):.3f} reference_aiq={ref:.4f} "
          f"aptitude_prompts={args.aptitude}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
