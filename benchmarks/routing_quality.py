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

from encoders.capability import CapabilityConfig, predict, train, train_selected
from router.core.config import AppConfig
from router.offline import baselines
from router.offline.evaluation import evaluate, two_backend, zero_router
from router.offline.routing_data import split_indices
from router.offline.training import out_of_fold_knn
from router.prediction.predictor import knn_estimates
from router.prediction.predictor import knn_store as prediction_knn_store


def knn_store(X, data, idx, cfg):
    return prediction_knn_store(X[idx], [data.records[i] for i in idx], cfg.datastore)


def run_set(name: str, seed: int, ablation: bool) -> dict:
    t0 = time.time()
    data = load(name)
    X = embeddings(name, data)
    tr, va, te = split_indices(data, seed=seed)
    te = te[data.complete_rows()[te]]
    cfg = AppConfig()
    B = len(data.backends)
    mean_cost = np.nanmean(data.C[tr], 0)
    records = [data.records[i] for i in tr]
    store = knn_store(X, data, tr, cfg)
    Qk_te, Chat = knn_estimates(store, X[te], data.backends, mean_cost)
    base = CapabilityConfig(seed=seed)
    scales = base.knn_scales
    # The datastore's estimates at every neighbourhood the encoder takes as input.
    Qs_te = knn_estimates(store, X[te], data.backends, mean_cost, scales=scales)[0]
    K = out_of_fold_knn(X[tr], records, data.backends, cfg.datastore, seed=seed, scales=scales)
    Kv = knn_estimates(store, X[va], data.backends, mean_cost, scales=scales)[0]
    Y, C = data.Y[te], data.C[te]

    preds: dict[str, np.ndarray] = {}
    preds["random"] = baselines.random_router(len(te), B, seed)
    preds["oracle"] = Y
    preds["kNN (k=40)"] = baselines.knn_router(X[tr], data.Y[tr], X[te], 40)
    preds["MLP classifier"] = baselines.mlp_router(X[tr], data.Y[tr], X[va], data.Y[va], X[te], seed=seed)
    preds["matrix factorization"] = baselines.mf_router(X[tr], data.Y[tr], X[va], data.Y[va], X[te], seed=seed)
    preds["caprouter kNN datastore alone"] = Qk_te

    # caprouter as `caprouter train` builds it: the loss weights picked on validation loss among
    # the full objective and its ablations (each ablation is reported too).
    main_label = "caprouter (capability encoder + datastore)"
    res, chosen, table = train_selected(X[tr], data.Y[tr], X[va], data.Y[va], base, K=K, Kv=Kv)
    preds[main_label] = predict(res.model, X[te], Qs_te)
    names = {(0.2, 0.1): "ablation: full objective (w_con 0.2, w_ot 0.1)", (0.0, 0.0): "ablation: prediction loss only",
             (0.2, 0.0): "ablation: prediction + contrastive", (0.0, 0.1): "ablation: prediction + OT"}
    selection = []
    for t in table:
        key = (t["w_con"], t["w_ot"])
        selection.append({"w_con": key[0], "w_ot": key[1], "val_bce": t["val_bce"]})
        if ablation:
            preds[names.get(key, f"ablation: {key}")] = predict(t["result"].model, X[te], Qs_te)
    if ablation:
        nd = train(X[tr], data.Y[tr], X[va], data.Y[va], chosen)
        preds["ablation: chosen weights, no datastore input"] = predict(nd.model, X[te], None)
        if scales:
            from dataclasses import replace

            one = replace(chosen, knn_scales=None)
            K1 = out_of_fold_knn(X[tr], records, data.backends, cfg.datastore, seed=seed)
            m1 = train(X[tr], data.Y[tr], X[va], data.Y[va], one, K=K1, Kv=knn_estimates(
                store, X[va], data.backends, mean_cost)[0]).model
            preds["ablation: chosen weights, datastore's own neighbourhood only"] = predict(m1, X[te], Qk_te)

    rows = {"zero router": zero_router(Y, C)}
    for label, Q in preds.items():
        rows[label] = evaluate(Q, Chat, Y, C)
    out = {"set": name, "backends": data.backends, "n_train": int(len(tr)), "n_val": int(len(va)),
           "n_test": int(len(te)), "main": main_label, "rows": rows, "selection": selection,
           "chosen": {"w_con": chosen.w_con, "w_ot": chosen.w_ot},
           "accuracy": {b: float(Y[:, j].mean()) for j, b in enumerate(data.backends)},
           "mean_cost": {b: float(C[:, j].mean()) for j, b in enumerate(data.backends)}, "seconds": time.time() - t0}
    if B == 2:
        strong = int(np.argmax(Y.mean(0)))
        weak = 1 - strong
        out["two_backend"] = {label: two_backend(Q, Y, strong, weak) for label, Q in preds.items()}
    return out


def fmt(v: float) -> str:
    return "inf" if v == float("inf") else f"{v:.3f}"


INTRO = """Every router is trained on the same split with the same MiniLM embeddings and predicts cost the
same way (the datastore's neighbour-weighted cost; constant per model in these sets), so they
differ only in predicted quality. Costs: LLMRouter's own prices (`meta.price_per_M_tokens`),
MMLU-Pro active parameters from `models.json` (models with no size left out), RouteLLM prices
from `models.json`. Columns: AIQ (RouterBench), the quality the router reaches at the best single
model's average cost, and the cost at which it first reaches the best single model's quality, as
a share of that model's cost (`inf`: never).

"caprouter" is what `caprouter train` builds: the capability encoder with the datastore's kNN
estimates (two neighbourhoods) as inputs, its loss weights picked on validation loss among the
full objective and its ablations (each ablation is reported as its own row)."""


def write_doc(results: list[dict], path: str, seed: int) -> dict:
    lines = ["# Routing quality on real data", "",
             f"Regenerate with `.venv/bin/python benchmarks/routing_quality.py --ablation` (seed {seed}); "
             "`--from-json` rewrites this page from the last run's `benchmarks/out/routing_quality.json`.", "",
             INTRO, "", "## Against the kNN baseline", "",
             "| set | caprouter AIQ | kNN (k=40) | margin over kNN | best other baseline | cost share for best single's quality |",
             "|---|---|---|---|---|---|"]
    figures = {}
    baselines_ = ("kNN (k=40)", "MLP classifier", "matrix factorization", "random", "zero router")
    for r in results:
        cap = r["rows"][r["main"]]
        knn = r["rows"]["kNN (k=40)"]["aiq"]
        other = max((b for b in baselines_ if b != "kNN (k=40)"), key=lambda b: r["rows"][b]["aiq"])
        lines.append(f"| {r['set']} | {cap['aiq']:.3f} | {knn:.3f} | {cap['aiq'] - knn:+.3f} | "
                     f"{other} {r['rows'][other]['aiq']:.3f} | {fmt(cap['cost_share_for_best_quality'])} |")
    lines.append("")
    for r in results:
        lines += [f"## {r['set']}", "",
                  f"{len(r['backends'])} backends; train {r['n_train']}, val {r['n_val']}, test {r['n_test']} "
                  f"(complete rows). Loss weights picked on validation loss: w_con {r['chosen']['w_con']}, "
                  f"w_ot {r['chosen']['w_ot']} (" + ", ".join(f"({t['w_con']}, {t['w_ot']}): {t['val_bce']:.4f}"
                                                         for t in r["selection"]) + ").", "",
                  "| router | AIQ | quality at best single's cost | cost to reach best single's quality |",
                  "|---|---|---|---|"]
        for label, m in r["rows"].items():
            lines.append(f"| {label} | {m['aiq']:.3f} | {m['q_at_best_cost']:.3f} | {fmt(m['cost_share_for_best_quality'])} |")
        if "two_backend" in r:
            lines += ["", "| router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
            for label, m in r["two_backend"].items():
                lines.append(f"| {label} | {m['apgr']:.3f} | {fmt(m['cpt50'])} | {fmt(m['cpt80'])} |")
        lines.append("")
        cap = r["rows"][r["main"]]
        figures[f"{r['set']}_aiq"] = f"{cap['aiq']:.3f}"
        figures[f"{r['set']}_knn_aiq"] = f"{r['rows']['kNN (k=40)']['aiq']:.3f}"
        figures[f"{r['set']}_zero_aiq"] = f"{r['rows']['zero router']['aiq']:.3f}"
        figures[f"{r['set']}_cost_share"] = fmt(cap["cost_share_for_best_quality"])
    notes = ROOT / "docs" / "routing_quality_notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return figures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="llmrouter,mmlu_pro,routellm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "routing_quality.md"))
    ap.add_argument("--from-json", action="store_true", help="rewrite the page from the last run's JSON")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads((OUT / "routing_quality.json").read_text())
    else:
        results = [run_set(s, args.seed, args.ablation) for s in args.sets.split(",")]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "routing_quality.json").write_text(json.dumps(results, indent=2))
    figures = write_doc(results, args.doc, args.seed)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
