"""Does the embedded default route meaningfully? Cross-validated on the bundled aptitude outcomes.

    .venv/bin/python benchmarks/aptitude_routing.py [--data FILE] [--folds 10] [--plot docs/img/aptitude_routing.png]

10-fold cross-validation, seeded: the router is built from 9 folds and decides for the 10th (so no
prompt is ever its own neighbour), twice: the kNN datastore alone, and what the embedded default
serves, the training pipeline's artifact (`caprouter train`: capability encoder blended with the
datastore, validation carved from the 9 folds). For a sweep of cost weights lambda, each decision's
realized quality and cost are the chosen backend's recorded score and cost on that prompt.
Printed next to every single backend and the per-prompt oracle, measured on the same prompts.
Writes a PNG of the cost-quality curve. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="outcomes JSONL (default: the bundled aptitude outcomes)")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="docs/img/aptitude_routing.png")
    ap.add_argument("--sweep", action="store_true", help="print every point of the lambda sweep")
    args = ap.parse_args()

    from datastore.records import read_outcomes
    from datastore.store import FaissKnnDatastore
    from encoders.minilm import MiniLMEncoder
    from router.core.config import builtin_data, load_config

    cfg = load_config()
    data = Path(args.data) if args.data else builtin_data("aptitude_outcomes.jsonl")
    rows = list(read_outcomes(data))
    backends = sorted({b for r in rows for b in r.scores})
    rows = [r for r in rows if all(b in r.scores and b in r.cost for b in backends)]
    Y = np.array([[r.scores[b] for b in backends] for r in rows], dtype=np.float32)   # (n, B) true quality
    C = np.array([[r.cost[b] for b in backends] for r in rows], dtype=np.float32)     # (n, B) true cost
    emb = MiniLMEncoder().encode([r.prompt for r in rows])

    rng = np.random.default_rng(args.seed)
    fold = rng.permutation(len(rows)) % args.folds
    Qknn = np.zeros_like(Y)
    Qhat = np.zeros_like(Y)
    Chat = np.zeros_like(C)
    ds_cfg = cfg.datastore
    from tqdm import tqdm

    from encoders.capability import CapabilityConfig, train_selected
    from router.offline.candidates import out_of_fold_knn
    from router.prediction.predictor import Capability, Predictor, knn_estimates

    for f in tqdm(range(args.folds), desc="folds", disable=not sys.stderr.isatty()):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        store = FaissKnnDatastore.from_records(emb[tr], [rows[i] for i in tr], k=ds_cfg.k,
                                               prior_strength=ds_cfg.prior_strength, temperature=ds_cfg.temperature)
        est = store.estimate(emb[te])
        cols = [est.column(b) for b in backends]
        Qknn[te] = est.quality[:, cols]
        Chat[te] = np.where(np.isnan(est.cost[:, cols]), C[tr].mean(0), est.cost[:, cols])
        # The pipeline, as `caprouter train --test-share 0` runs it on these 9 folds.
        perm = rng.permutation(tr)
        nv = int(round(0.1 * len(tr)))
        va, trn = np.sort(perm[:nv]), np.sort(perm[nv:])
        recs = [rows[i] for i in trn]
        sub = FaissKnnDatastore.from_records(emb[trn], recs, k=ds_cfg.k, prior_strength=ds_cfg.prior_strength,
                                             temperature=ds_cfg.temperature)
        K = out_of_fold_knn(emb[trn], recs, backends, ds_cfg, seed=args.seed)
        Kv = knn_estimates(sub, emb[va], backends, C[trn].mean(0))[0]
        res, _, _ = train_selected(emb[trn], Y[trn], emb[va], Y[va], CapabilityConfig(seed=args.seed), K=K, Kv=Kv)
        Qhat[te] = Predictor(store, Capability(res.model, backends)).predict(emb[te], backends, C[tr].mean(0)).quality

    lams = np.concatenate([[0.0], np.geomspace(1e-4, 1.0, 60)])
    from router.offline.evaluation import evaluate

    n = np.arange(len(rows))

    def sweep(Q):
        out = []
        for lam in lams:
            pick = np.argmax(Q - lam * Chat, axis=1)
            out.append((lam, float(C[n, pick].mean()), float(Y[n, pick].mean()),
                        np.bincount(pick, minlength=len(backends)) / len(rows)))
        return out

    pts, pts_knn = sweep(Qhat), sweep(Qknn)
    aiq, aiq_knn = evaluate(Qhat, Chat, Y, C)["aiq"], evaluate(Qknn, Chat, Y, C)["aiq"]
    if args.sweep:
        for lam, c, q, sh in pts:
            print(f"lambda={lam:.5f} cost={c:.3f} quality={q:.3f} share={np.round(sh, 2).tolist()}")
    default = cfg.routing.cost_weight
    pick = np.argmax(Qhat - default * Chat, axis=1)
    kpick = np.argmax(Qknn - default * Chat, axis=1)
    k_q, k_c = float(Y[n, kpick].mean()), float(C[n, kpick].mean())
    d_q, d_c = float(Y[n, pick].mean()), float(C[n, pick].mean())
    share = np.bincount(pick, minlength=len(backends)) / len(rows)
    oracle_q = float(Y.max(1).mean())
    # Oracle cost: the cheapest backend among those with the best score on each prompt.
    best = Y == Y.max(1, keepdims=True)
    oracle_c = float(np.where(best, C, np.inf).min(1).mean())

    print(f"{len(rows)} prompts, {args.folds}-fold cross-validation, backends: {', '.join(backends)}")
    print(f"{'policy':<34}{'quality':>9}{'cost (GFLOP)':>14}   traffic share")
    for j, b in enumerate(backends):
        print(f"{'always ' + b:<34}{Y[:, j].mean():>9.3f}{C[:, j].mean():>14.2f}")
    print(f"{'oracle':<34}{oracle_q:>9.3f}{oracle_c:>14.2f}")
    lam0 = pts[0]
    print(f"{'router lambda=0':<34}{lam0[2]:>9.3f}{lam0[1]:>14.2f}   " + ", ".join(f"{b} {s:.0%}" for b, s in zip(backends, lam0[3])))
    print(f"{f'router lambda={default:g} (default)':<34}{d_q:>9.3f}{d_c:>14.2f}   " + ", ".join(f"{b} {s:.0%}" for b, s in zip(backends, share)))
    print(f"{f'kNN datastore alone, lambda={default:g}':<34}{k_q:>9.3f}{k_c:>14.2f}")
    print(f"AIQ over the lambda sweep: router {aiq:.3f}, kNN datastore alone {aiq_knn:.3f}")
    best_single = int(np.argmax(Y.mean(0)))
    gain = d_q - Y[:, best_single].mean()
    cost_ratio = d_c / C[:, best_single].mean()
    print(f"default vs always {backends[best_single]}: quality {gain:+.3f}, cost x{cost_ratio:.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", ms=3, label="caprouter (served pipeline), lambda sweep")
    ax.plot([p[1] for p in pts_knn], [p[2] for p in pts_knn], ".--", ms=3, alpha=0.7, label="kNN datastore alone")
    for j, b in enumerate(backends):
        ax.plot(C[:, j].mean(), Y[:, j].mean(), "s", ms=8, label=f"always {b}")
    ax.plot(oracle_c, oracle_q, "*", ms=12, label="oracle")
    ax.plot(d_c, d_q, "D", ms=8, mfc="none", label=f"default lambda={default:g}")
    ax.set_xlabel("average cost per request (GFLOP, measured)")
    ax.set_ylabel("aptitude-suite accuracy")
    ax.set_title(f"Embedded default, {args.folds}-fold CV on {len(rows)} aptitude prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    print(f"plot: {args.plot}")
    figs = {"prompts": len(rows), "oracle_quality": f"{oracle_q:.3f}", "router_l0_quality": f"{lam0[2]:.3f}",
            "router_l0_cost": f"{lam0[1]:.2f}", "router_default_quality": f"{d_q:.3f}",
            "router_default_cost": f"{d_c:.2f}", "default_quality_minus_best_single": f"{gain:+.3f}",
            "default_cost_over_best_single": f"{cost_ratio:.3f}", "aiq": f"{aiq:.3f}", "aiq_knn": f"{aiq_knn:.3f}",
            "knn_default_quality": f"{k_q:.3f}", "knn_default_cost": f"{k_c:.2f}"}
    for j, b in enumerate(backends):
        figs[f"quality_{b}"] = f"{Y[:, j].mean():.3f}"
        figs[f"cost_{b}"] = f"{C[:, j].mean():.2f}"
        figs[f"default_share_{b}"] = f"{share[j]:.2f}"
    print(" ".join(f"{k}={v}" for k, v in figs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
