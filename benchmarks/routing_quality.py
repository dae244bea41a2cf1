"""caprouter against the baselines on real routing data; regenerates docs/routing_quality.md.

    .venv/bin/python benchmarks/routing_quality.py [--sets llmrouter,mmlu_pro,routellm] [--ablation] [--ood-folds 3]

Every router is trained on the same split with the same MiniLM embeddings and predicts cost the
same way (the datastore's neighbour-weighted cost); they differ only in predicted quality.
Splits: LLMRouter's own (test = its 500 rows); MMLU-Pro and RouteLLM seeded 80/20; and, out of
distribution, --ood-folds splits per set whose test rows are whole categories the routers never
saw. caprouter's router is chosen among its candidates on held-out folds of the training rows;
validation (10% of train) stops training early. Evaluation uses test rows where every backend has
a score. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from common import OUT, ROOT, embeddings, load  # noqa: I001

from encoders.capability import CANDIDATE_WEIGHTS, CapabilityConfig, predict, train
from router.core.config import AppConfig
from router.offline import baselines
from router.offline.candidates import inner_split, out_of_fold_knn
from router.offline.evaluation import evaluate, two_backend, zero_router
from router.offline.routing_data import split_indices
from router.offline.training import fit_router
from router.prediction.predictor import Predictor, knn_estimates
from router.prediction.predictor import knn_store as prediction_knn_store


def knn_store(X, data, idx, cfg):
    return prediction_knn_store(X[idx], [data.records[i] for i in idx], cfg.datastore)


MAIN = "caprouter (as `caprouter train` serves it)"
NO_REPEATS = "caprouter, repeats not pooled (datastore.repeats off)"
BASELINES = ("kNN (k=40)", "MLP classifier", "matrix factorization", "random", "zero router")


def category_folds(data, rows: np.ndarray, folds: int, seed: int) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """Out of distribution: the categories dealt (seeded) into ``folds`` groups; each group's
    prompts are a test set for routers trained on every other category. Returns (held-out
    categories, training rows, test rows) per fold."""
    cats = np.array(sorted({data.categories[i] for i in rows}))
    cats = cats[np.random.default_rng(seed).permutation(len(cats))]
    cat_of = np.array([data.categories[i] for i in rows])
    out = []
    for f in range(folds):
        held = sorted(cats[f::folds].tolist())
        te = rows[np.isin(cat_of, held)]
        out.append((held, rows[~np.isin(cat_of, held)], te))
    return out


def run_split(data, X, tr, va, te, seed: int, ablation: bool) -> dict:
    """Every router trained on tr (early stopping / blend weights on va), evaluated on the complete
    rows of te."""
    te = te[data.complete_rows()[te]]
    cfg = AppConfig()
    B = len(data.backends)
    mean_cost = np.nanmean(data.C[tr], 0)
    store = knn_store(X, data, tr, cfg)
    Qk_te, Chat = knn_estimates(store, X[te], data.backends, mean_cost)
    base = CapabilityConfig(seed=seed)
    Y, C = data.Y[te], data.C[te]

    preds: dict[str, np.ndarray] = {}
    preds["random"] = baselines.random_router(len(te), B, seed)
    preds["oracle"] = Y
    preds["kNN (k=40)"] = baselines.knn_router(X[tr], data.Y[tr], X[te], 40)
    preds["MLP classifier"] = baselines.mlp_router(X[tr], data.Y[tr], X[va], data.Y[va], X[te], seed=seed)
    preds["matrix factorization"] = baselines.mf_router(X[tr], data.Y[tr], X[va], data.Y[va], X[te], seed=seed)
    preds["caprouter kNN datastore alone (configured k, temperature)"] = Qk_te

    # caprouter as `caprouter train` builds it: every candidate scored on held-out folds of
    # tr + va, the best fitted on tr (router/offline/training.py fit_router).
    t0 = time.time()
    fit = fit_router(X, data, tr, va, cfg.datastore, base, seed=seed, progress=True)
    fit_s = time.time() - t0
    served = fit.predictor(data.backends)
    preds[MAIN] = served.predict(X[te], data.backends, mean_cost).quality
    preds[NO_REPEATS] = Predictor(served.datastore, served.capability, repeats=False).predict(
        X[te], data.backends, mean_cost).quality
    # Test prompts whose very text the training rows hold (datastore.repeats pools their records).
    repeated = (served.datastore.recorded(X[te]).support > 0).any(1)
    if ablation:
        K = out_of_fold_knn(X[tr], [data.records[i] for i in tr], data.backends, cfg.datastore, seed=seed,
                            scales=base.knn_scales)
        Kv = knn_estimates(store, X[va], data.backends, mean_cost, scales=base.knn_scales)[0]
        Qs_te = knn_estimates(store, X[te], data.backends, mean_cost, scales=base.knn_scales)[0]
        for w_con, w_ot in CANDIDATE_WEIGHTS:
            res = train(X[tr], data.Y[tr], X[va], data.Y[va], replace(base, w_con=w_con, w_ot=w_ot), K=K, Kv=Kv)
            preds[f"ablation: blend w_con {w_con:g}, w_ot {w_ot:g}"] = predict(res.model, X[te], Qs_te)
        nd = train(X[tr], data.Y[tr], X[va], data.Y[va], base)
        preds["ablation: blend objective, no datastore input"] = predict(nd.model, X[te], None)

    rows = {"zero router": zero_router(Y, C)}
    for label, Q in preds.items():
        rows[label] = evaluate(Q, Chat, Y, C)
    fresh = ~repeated
    out = {"n_train": int(len(tr)), "n_val": int(len(va)), "n_test": int(len(te)), "main": MAIN, "rows": rows,
           "repeats": {"share": float(repeated.mean()), "margin_se": margin_se(preds[MAIN], preds["kNN (k=40)"],
                                                                               Chat, Y, C, seed),
                       "fresh_rows": {label: evaluate(preds[label][fresh], Chat[fresh], Y[fresh], C[fresh])["aiq"]
                                      for label in (MAIN, NO_REPEATS, "kNN (k=40)")} if fresh.sum() > 1 else {}},
           "selection": fit.report.as_json(), "fit_seconds": fit_s,
           "accuracy": {b: float(Y[:, j].mean()) for j, b in enumerate(data.backends)},
           "mean_cost": {b: float(C[:, j].mean()) for j, b in enumerate(data.backends)}}
    if B == 2:
        strong = int(np.argmax(Y.mean(0)))
        weak = 1 - strong
        out["two_backend"] = {label: two_backend(Q, Y, strong, weak) for label, Q in preds.items()}
    return out


def margin_se(Qa, Qb, Chat, Y, C, seed: int, n: int = 200) -> float:
    """Bootstrap standard error (``n`` resamples of the test prompts) of AIQ(Qa) - AIQ(Qb)."""
    rng = np.random.default_rng(seed)
    d = []
    for _ in range(n):
        i = rng.integers(0, len(Y), len(Y))
        d.append(evaluate(Qa[i], Chat[i], Y[i], C[i])["aiq"] - evaluate(Qb[i], Chat[i], Y[i], C[i])["aiq"])
    return float(np.std(d))


def run_set(name: str, seed: int, ablation: bool, ood_folds: int) -> dict:
    t0 = time.time()
    data = load(name)
    X = embeddings(name, data)
    tr, va, te = split_indices(data, seed=seed)
    out = {"set": name, "backends": data.backends, **run_split(data, X, tr, va, te, seed, ablation)}
    out["ood"] = []
    for held, rest, te in category_folds(data, np.arange(len(data)), ood_folds, seed):
        tr, va = inner_split(rest, seed)
        r = run_split(data, X, tr, va, te, seed, False)
        r["held_out_categories"] = held
        out["ood"].append(r)
    out["seconds"] = time.time() - t0
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

"caprouter" is what `caprouter train` serves: every candidate (the datastore alone at six
neighbourhoods, plain kNN among them; matrix factorization; an MLP; the capability encoder
blended with the datastore under each loss variant; two ensembles of these, each with a cluster
table) scored on 3 held-out folds of the training rows, the best one fitted on them
(`router/offline/candidates.py`). Nothing is chosen on the test rows."""


def _ood_means(r: dict) -> dict[str, float]:
    return {label: float(np.mean([f["rows"][label]["aiq"] for f in r["ood"]])) for label in r["ood"][0]["rows"]}


def write_doc(results: list[dict], path: str, seed: int) -> dict:
    lines = ["# Routing quality on real data", "",
             f"Regenerate with `.venv/bin/python benchmarks/routing_quality.py --ablation` (seed {seed}); "
             "`--from-json` rewrites this page from the last run's `benchmarks/out/routing_quality.json`.", "",
             INTRO, "", "## Against the kNN baseline", "",
             "| set | split | caprouter AIQ | kNN (k=40) | margin over kNN | best other baseline | served candidate |",
             "|---|---|---|---|---|---|---|"]
    figures = {}
    for r in results:
        cap = r["rows"][MAIN]
        knn = r["rows"]["kNN (k=40)"]["aiq"]
        other = max((b for b in BASELINES if b != "kNN (k=40)"), key=lambda b: r["rows"][b]["aiq"])
        lines.append(f"| {r['set']} | test split | {cap['aiq']:.3f} | {knn:.3f} | {cap['aiq'] - knn:+.3f} | "
                     f"{other} {r['rows'][other]['aiq']:.3f} | {r['selection']['chosen']} |")
        if r.get("ood"):
            m = _ood_means(r)
            other = max((b for b in BASELINES if b != "kNN (k=40)"), key=lambda b: m[b])
            lines.append(f"| {r['set']} | categories held out (mean of {len(r['ood'])}) | {m[MAIN]:.3f} | "
                         f"{m['kNN (k=40)']:.3f} | {m[MAIN] - m['kNN (k=40)']:+.3f} | {other} {m[other]:.3f} | "
                         f"{', '.join(sorted({f['selection']['chosen'] for f in r['ood']}))} |")
    lines.append("")
    if any("repeats" in r for r in results):
        lines += ["## Repeated prompts", "",
                  "Share of the test prompts whose very text (cosine >= 0.9999) is among the training rows; "
                  "caprouter pools a repeated prompt's own records into its estimate (`datastore.repeats`, "
                  "on by default; `router/prediction/predictor.py` `pool_repeats`). AIQ on every test prompt "
                  "and on the prompts that repeat none (\"fresh\"); the margin's standard error is a bootstrap "
                  "over the test prompts (200 resamples).", "",
                  "| set | test prompts repeated | caprouter | repeats not pooled | kNN (k=40) | margin over kNN "
                  "(bootstrap SE) | fresh: caprouter | fresh: not pooled | fresh: kNN |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            if "repeats" not in r:
                continue
            rp, rows = r["repeats"], r["rows"]
            fr = rp["fresh_rows"]
            lines.append(f"| {r['set']} | {rp['share']:.1%} | {rows[MAIN]['aiq']:.3f} | {rows[NO_REPEATS]['aiq']:.3f} | "
                         f"{rows['kNN (k=40)']['aiq']:.3f} | {rows[MAIN]['aiq'] - rows['kNN (k=40)']['aiq']:+.3f} "
                         f"({rp['margin_se']:.3f}) | {fr.get(MAIN, float('nan')):.3f} | "
                         f"{fr.get(NO_REPEATS, float('nan')):.3f} | {fr.get('kNN (k=40)', float('nan')):.3f} |")
        lines.append("")
    if any(r.get("ood") for r in results):
        lines += ["## Out of distribution: categories held out", "",
                  "Each set's categories are dealt (seeded) into three groups; each group's prompts are the test "
                  "set of routers trained on every other category (early stopping and candidate choice on "
                  "those training categories only).", "",
                  "| set | held-out categories | test prompts | caprouter | served candidate | kNN (k=40) | MLP | MF | "
                  "zero router | oracle |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            for f in r.get("ood", []):
                rows = f["rows"]
                held = ", ".join(f["held_out_categories"])
                if len(held) > 60:
                    held = f"{len(f['held_out_categories'])} categories: " + held[:50] + "..."
                lines.append(f"| {r['set']} | {held} | {f['n_test']} | {rows[MAIN]['aiq']:.3f} | "
                             f"{f['selection']['chosen']} | {rows['kNN (k=40)']['aiq']:.3f} | "
                             f"{rows['MLP classifier']['aiq']:.3f} | {rows['matrix factorization']['aiq']:.3f} | "
                             f"{rows['zero router']['aiq']:.3f} | {rows['oracle']['aiq']:.3f} |")
        lines.append("")
    for r in results:
        sel = r["selection"]
        lines += [f"## {r['set']}", "",
                  f"{len(r['backends'])} backends; train {r['n_train']}, val {r['n_val']}, test {r['n_test']} "
                  f"(complete rows). Served: {sel['chosen']}, chosen on {sel['folds']} held-out folds of train + "
                  f"val by {sel['metric']}" + (" (random folds and folds holding out whole categories: the best "
                                               "worse margin over plain kNN, less one standard error)"
                                               if "category_held_out_mean" in sel["candidates"][0] else "") +
                  f" (fit in {r['fit_seconds']:.0f} s):", "",
                  "| candidate | held-out " + sel["metric"] + " (mean) | sd | categories held out (mean) |",
                  "|---|---|---|---|"]
        for c in sorted(sel["candidates"], key=lambda c: -c["mean"]):
            g = c.get("category_held_out_mean")
            lines.append(f"| {c['name']} | {c['mean']:.4f} | {c['std']:.4f} | {'' if g is None else f'{g:.4f}'} |")
        lines += ["", "On the test split:", "",
                  "| router | AIQ | quality at best single's cost | cost to reach best single's quality |",
                  "|---|---|---|---|"]
        for label, m in r["rows"].items():
            lines.append(f"| {label} | {m['aiq']:.3f} | {m['q_at_best_cost']:.3f} | {fmt(m['cost_share_for_best_quality'])} |")
        if "two_backend" in r:
            lines += ["", "| router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|"]
            for label, m in r["two_backend"].items():
                lines.append(f"| {label} | {m['apgr']:.3f} | {fmt(m['cpt50'])} | {fmt(m['cpt80'])} |")
        lines.append("")
        cap = r["rows"][MAIN]
        figures[f"{r['set']}_aiq"] = f"{cap['aiq']:.3f}"
        figures[f"{r['set']}_knn_aiq"] = f"{r['rows']['kNN (k=40)']['aiq']:.3f}"
        figures[f"{r['set']}_zero_aiq"] = f"{r['rows']['zero router']['aiq']:.3f}"
        figures[f"{r['set']}_cost_share"] = fmt(cap["cost_share_for_best_quality"])
        if "repeats" in r:
            figures[f"{r['set']}_repeated_share"] = f"{r['repeats']['share']:.3f}"
            figures[f"{r['set']}_margin_se"] = f"{r['repeats']['margin_se']:.3f}"
            fr = r["repeats"]["fresh_rows"]
            if fr:
                figures[f"{r['set']}_fresh_margin"] = f"{fr[MAIN] - fr['kNN (k=40)']:+.3f}"
        if r.get("ood"):
            m = _ood_means(r)
            figures[f"{r['set']}_ood_aiq"] = f"{m[MAIN]:.3f}"
            figures[f"{r['set']}_ood_knn_aiq"] = f"{m['kNN (k=40)']:.3f}"
            figures[f"{r['set']}_ood_min_margin"] = \
                f"{min(f['rows'][MAIN]['aiq'] - f['rows']['kNN (k=40)']['aiq'] for f in r['ood']):+.3f}"
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
    ap.add_argument("--ood-folds", type=int, default=3, help="category-held-out folds per set (0: none)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "routing_quality.md"))
    ap.add_argument("--from-json", action="store_true", help="rewrite the page from the last run's JSON")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads((OUT / "routing_quality.json").read_text())
    else:
        results = [run_set(s, args.seed, args.ablation, args.ood_folds) for s in args.sets.split(",")]
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "routing_quality.json").write_text(json.dumps(results, indent=2))
    figures = write_doc(results, args.doc, args.seed)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
