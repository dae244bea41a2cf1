"""Onboarding a backend by aptitude test, against retraining with it (Model-SAT), on LLMRouter.

    .venv/bin/python benchmarks/onboarding.py [--set llmrouter] [--aptitude 100] [--holdout NAME]

For each held-out backend (default: every backend in turn): train the router without it; pick a
fixed aptitude set of --aptitude training prompts (k-means coverage, router.offline.training.select_aptitude,
and a random draw for comparison); put the held-out backend's outcomes on those prompts (only)
into the datastore; fit its vector with the prompt side frozen (encoders.capability.onboard, with
the "span" prior and the older "mean" prior); evaluate test AIQ over all backends. Reference: the router
retrained on the full training data with every backend, same split, same seed. Target: onboarded
AIQ >= 95% of retrained. The last line is key=value figures.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import embeddings, load  # noqa: I001

from datastore.records import OutcomeRecord
from encoders.capability import CapabilityConfig, add_backend, onboard, predict, train
from router.core.config import AppConfig
from router.offline.candidates import out_of_fold_knn
from router.offline.evaluation import evaluate
from router.offline.routing_data import split_indices
from router.offline.training import select_aptitude
from router.prediction.onboarding import aptitude_knn, peer_residuals
from router.prediction.predictor import knn_estimates, knn_store


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="llmrouter")
    ap.add_argument("--aptitude", type=int, default=100)
    ap.add_argument("--holdout", help="one backend (default: each in turn)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=3,
                    help="aptitude sets drawn per selection method (seeds seed..seed+draws-1); a share is their mean")
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
    ccfg = CapabilityConfig(seed=args.seed)
    sc = ccfg.knn_scales
    K = out_of_fold_knn(X[tr], [data.records[i] for i in tr], names, ds, seed=args.seed, scales=sc)
    Kv = knn_estimates(full_store, X[va], names, mean_cost, scales=sc)[0]
    full = train(X[tr], data.Y[tr], X[va], data.Y[va], ccfg, K=K, Kv=Kv).model
    Qk, Chat = knn_estimates(full_store, X[te], names, mean_cost, scales=sc)
    ref = evaluate(predict(full, X[te], Qk), Chat, Y, C)["aiq"]
    print(f"{args.set}: retrained with all {len(names)} backends: test AIQ {ref:.4f}")

    # One draw of 100 prompts is a noisy test (a backend's accuracy on it is off by ~5 points
    # either way): every way of onboarding is scored on the same few draws, and averaged.
    draws = range(args.seed, args.seed + args.draws)
    apt_sets = {m: [tr[select_aptitude(X[tr], args.aptitude, seed=s, method=k)] for s in draws]
                for m, k in (("random", "random"), ("k-means", "kmeans"))}
    # (aptitude selection, prior, fit the datastore weights, peers' residuals as control variate):
    # the first is the earliest method, the third what the Onboard RPC does (the headline figures).
    variants = [("random", "mean", False, False), ("random", "span", True, False), ("random", "span", True, True),
                ("k-means", "span", True, True)]
    ratios: dict[tuple[str, str, bool, bool], list[float]] = {v: [] for v in variants}

    def label(v):
        return f"{v[0]}/{v[1]}/{'w fit' if v[2] else 'w mean'}{'/cv' if v[3] else ''}"

    print(f"{'held out':<40}" + "".join(f"{label(v):>22}" for v in variants))
    for held in ([args.holdout] if args.holdout else names):
        j = names.index(held)
        rest = [b for b in names if b != held]
        rcols = [names.index(b) for b in rest]
        # The router without the held-out backend.
        store = store_of(tr, set(rest))
        Kr = out_of_fold_knn(X[tr], [OutcomeRecord(id=data.records[i].id, prompt="", scores={
            b: s for b, s in data.records[i].scores.items() if b != held}) for i in tr], rest, ds, seed=args.seed,
            scales=sc)
        Kvr = knn_estimates(store, X[va], rest, mean_cost[rcols], scales=sc)[0]
        model = train(X[tr], data.Y[tr][:, rcols], X[va], data.Y[va][:, rcols], ccfg, K=Kr, Kv=Kvr).model
        q_rest, c_rest = knn_estimates(store, X[te], rest, mean_cost[rcols], scales=sc)
        order = rest + [held]
        cols = [names.index(b) for b in order]
        line = f"{held:<40}"

        def onboarded_aiq(apt, prior, fit_w, cv):
            """Test AIQ over all backends once ``held`` is onboarded from its outcomes on ``apt``
            (they join the datastore; its vector is fitted, the prompt side frozen)."""
            y_apt = data.Y[apt, j]
            ok = ~np.isnan(y_apt)
            xa, ya = X[apt[ok]], y_apt[ok]
            # The aptitude prompts are training prompts: the store holds the other backends' scores
            # on them (what Datastore.recorded gives the Onboard RPC).
            R = peer_residuals(data.Y[apt[ok]][:, rcols], predict(
                model, xa, knn_estimates(store, xa, rest, mean_cost[rcols], scales=sc)[0])) if cv else None
            g, b, h, w = onboard(model, xa, ya, knn=aptitude_knn(xa, ya, ds, scales=sc), prior=prior,
                                 fit_w=fit_w, peer_residuals=R)
            on = add_backend(model, g, b, h, ccfg, w)
            q_new, c_new = knn_estimates(store_of(apt[ok], {held}), X[te], [held], mean_cost[[j]], scales=sc)
            Kt = np.concatenate([q_rest, q_new], 1)
            Ct = np.concatenate([c_rest, c_new], 1)
            return evaluate(predict(on, X[te], Kt), Ct, Y[:, cols], C[:, cols])["aiq"]

        for sel, prior, fit_w, cv in variants:
            shares = [onboarded_aiq(apt, prior, fit_w, cv) / ref for apt in apt_sets[sel]]
            ratios[(sel, prior, fit_w, cv)].append(float(np.mean(shares)))
            line += f"{np.mean(shares):>22.1%}"
        print(line, flush=True)
    print("mean".ljust(40) + "".join(f"{np.mean(ratios[v]):>22.1%}" for v in variants))
    print("min".ljust(40) + "".join(f"{np.min(ratios[v]):>22.1%}" for v in variants))
    print("backends >= 95%".ljust(40) + "".join(f"{sum(r >= 0.95 for r in ratios[v]):>22d}" for v in variants))
    best = ratios[variants[2]]
    print(f"min_ratio={min(best):.3f} mean_ratio={np.mean(best):.3f} at_least_95={sum(r >= 0.95 for r in best)}/"
          f"{len(best)} reference_aiq={ref:.4f} aptitude_prompts={args.aptitude} draws={args.draws} "
          + " ".join(f"mean_{label(v).replace('/', '_').replace(' ', '_')}={np.mean(ratios[v]):.3f}" for v in variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
