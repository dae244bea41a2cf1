"""caprouter against the baselines on real routing data; regenerates docs/routing_quality.md.

    .venv/bin/python benchmarks/routing_quality.py [--sets llmrouter,mmlu_pro,routellm] [--ablation]

Every router is trained on the same split with the same MiniLM embeddings and predicts cost the
same way (the datastore's neighbour-weighted cost); they differ only in predicted quality.
Splits: LLMRouter's own (test = its 500 rows); MMLU-Pro and RouteLLM seeded 80/20. Validation (10%
of train) picks early stopping and the encoder/kNN blend weight. Evaluation uses test rows where
every backend has a score. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import OUT, ROOT, embeddings, load  # noqa: I001

from datastore.store import FaissKnnDatastore
from encoders.capability import CapabilityConfig, predict, train
from router import baselines
from router.config import AppConfig
from router.evaluate import evaluate, two_backend, zero_router
from router.routing_data import split_indices


def knn_store(X, data, idx, cfg):
    ds = cfg.datastore
    return FaissKnnDatastore.from_records(X[idx], [data.records[i] for i in idx], k=ds.k,
                                          prior_strength=ds.prior_strength, temperature=ds.temperature)


def store_predict(store, X, backends, fallback_cost):
    est = store.estimate(X)
    cols = [est.column(b) for b in backends]
    Q = est.quality[:, cols]
    C = est.cost[:, cols]
    return Q, np.where(np.isnan(C), fallback_cost, C)


def run_set(name: str, seed: int, ablation: bool) -> dict:
    t0 = time.time()
    data = load(name)
    X = embeddings(name, data)
    tr, va, te = split_indices(data, seed=seed)
    te = te[data.complete_rows()[te]]
    # Validation halves: one for early stopping, one (never seen in training) for the blend weight.
    va, va_blend = va[::2], va[1::2]
    va_c = va_blend[data.complete_rows()[va_blend]]
    cfg = AppConfig()
    B = len(data.backends)
    mean_cost = np.nanmean(data.C[tr], 0)
    store = knn_store(X, data, tr, cfg)
    Qk_te, Chat = store_predict(store, X[te], data.backends, mean_cost)
    Qk_va, Chat_va = store_predict(store, X[va_c], data.backends, mean_cost)
    Y, C = data.Y[te], data.C[te]
    Yva, Cva = data.Y[va_c], data.C[va_c]

    preds: dict[str, np.ndarray] = {}
    preds["random"] = baselines.random_router(len(te), B, seed)
    preds["oracle"] = Y
    preds["kNN (k=40)"] = baselines.knn_router(X[tr], data.Y[tr], X[te], 40)
    preds["MLP classifier"] = baselines.mlp_router(X[tr], data.Y[tr], X[va], data.Y[va], X[te], seed=seed)
    preds["matrix factorization"] = baselines.mf_router(X[tr], data.Y[tr], X[va], data.Y[va], X[te], seed=seed)
    preds["caprouter kNN datastore"] = Qk_te

    variants = {"caprouter encoder": CapabilityConfig(seed=seed)}
    if ablation:
        variants.update({
            "encoder: prediction only": CapabilityConfig(seed=seed, w_con=0, w_ot=0),
            "encoder: + contrastive": CapabilityConfig(seed=seed, w_ot=0),
            "encoder: + OT": CapabilityConfig(seed=seed, w_con=0),
        })
    enc_val = {}
    for label, ccfg in variants.items():
        res = train(X[tr], data.Y[tr], X[va], data.Y[va], ccfg)
        preds[label] = predict(res.model, X[te])
        enc_val[label] = predict(res.model, X[va_c])
    # Blend weight chosen on validation AIQ.
    best_a, best_v = 0.0, -1.0
    for a in np.linspace(0, 1, 11):
        v = evaluate(a * enc_val["caprouter encoder"] + (1 - a) * Qk_va, Chat_va, Yva, Cva)["aiq"]
        if v > best_v + 1e-9:
            best_a, best_v = float(a), v
    preds["caprouter (encoder + kNN blend)"] = best_a * preds["caprouter encoder"] + (1 - best_a) * Qk_te

    rows = {"zero router": zero_router(Y, C)}
    for label, Q in preds.items():
        rows[label] = evaluate(Q, Chat, Y, C)
    out = {"set": name, "backends": data.backends, "n_train": int(len(tr)), "n_val": int(len(va) + len(va_blend)),
           "n_test": int(len(te)), "blend_alpha": best_a, "rows": rows,
           "accuracy": {b: float(Y[:, j].mean()) for j, b in enumerate(data.backends)},
           "mean_cost": {b: float(C[:, j].mean()) for j, b in enumerate(data.backends)}, "seconds": time.time() - t0}
    if B == 2:
        strong = int(np.argmax(Y.mean(0)))
        weak = 1 - strong
        out["two_backend"] = {label: two_backend(Q, Y, strong, weak) for label, Q in preds.items()}
    return out


def fmt(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="llmrouter,mmlu_pro,routellm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "routing_quality.md"))
    args = ap.parse_args()
    results = [run_set(s, args.seed, args.ablation) for s in args.sets.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "routing_quality.json").write_text(json.dumps(results, indent=2))
    lines = ["# Routing quality on real data", "",
             "Generated by `.venv/bin/python benchmarks/routing_quality.py --ablation` (seed 0).", ""]
    figures = {}
    for r in results:
        lines += [f"## {r['set']}", "",
                  f"{len(r['backends'])} backends; train {r['n_train']}, val {r['n_val']}, test {r['n_test']} "
                  f"(complete rows); encoder/kNN blend weight {r['blend_alpha']:.1f} (picked on val).", "",
                  "| router | AIQ | quality at best single's cost | cost to reach best single's quality |",
                  "|---|---|---|---|"]
        for label, m in r["rows"].items():
            lines.append(f"| {label} | {m['aiq']:.3f} | {m['q_at_best_cost']:.3f} | {fmt(m['cost_share_for_best_quality'])} |")
        if "two_backend" in r:
            lines += ["", "| router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
            for label, m in r["two_backend"].items():
                lines.append(f"| {label} | {m['apgr']:.3f} | {fmt(m['cpt50'])} | {fmt(m['cpt80'])} |")
        lines.append("")
        cap = r["rows"]["caprouter (encoder + kNN blend)"]
        figures[f"{r['set']}_aiq"] = f"{cap['aiq']:.3f}"
        figures[f"{r['set']}_knn_aiq"] = f"{r['rows']['kNN (k=40)']['aiq']:.3f}"
        figures[f"{r['set']}_zero_aiq"] = f"{r['rows']['zero router']['aiq']:.3f}"
        figures[f"{r['set']}_cost_share"] = fmt(cap["cost_share_for_best_quality"])
    with open(args.doc, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
