"""Which averages of candidates are worth trying as ensembles (router/offline/candidates.py
``ENSEMBLES``): every subset of two to four of six diverse candidates, scored as `caprouter train`
scores its candidates (3 random and 3 category-held-out folds of the training rows, the vouched
margin over plain kNN of ``select``), and on the test split for reference only (never used to
choose). Prints the table, best first, next to the best single candidate and the fixed ensembles.

    .venv/bin/python benchmarks/ensemble_subsets.py --set llmrouter      # ~3 min; mmlu_pro ~15 min
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
from common import embeddings, load  # noqa: I001

from encoders.capability import CapabilityConfig
from router.core.config import AppConfig
from router.offline import candidates as cm
from router.offline.evaluation import evaluate
from router.offline.routing_data import split_indices

POOL = ("datastore k=40 temperature=100", "datastore k=100 temperature=100", "matrix factorization", "MLP",
        "blend w_con=0 w_ot=0", "blend w_con=0 w_ot=0.1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="llmrouter")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load(args.set)
    X = embeddings(args.set, data)
    tr, va, te = split_indices(data, seed=args.seed)
    ds = AppConfig().datastore
    by_name = {c.name: c for c in cm.default_candidates(CapabilityConfig(seed=args.seed))}
    pool = [by_name[n] for n in POOL]
    scales = [list(c.scale) for c in pool if c.kind == "datastore"]
    complete = data.complete_rows()

    def parts(train_rows_and_held):
        out = []
        for f, (train_rows, held) in enumerate(train_rows_and_held):
            held = held[complete[held]]
            fold = cm._Fold(X, data, train_rows, held, ds, scales, args.seed, args.seed + f)
            out.append(({c.name: fold.quality(c) for c in pool}, fold.Chat, data.Y[held], data.C[held]))
        return out

    rows = np.sort(np.concatenate([tr, va]))
    kinds = []
    for assign in (cm.fold_split(len(rows), 3, args.seed),
                   cm.category_fold_split([data.categories[i] for i in rows], 3, args.seed)):
        if assign is not None:
            kinds.append(parts([(rows[assign != f], rows[assign == f]) for f in range(3)]))
    test = parts([(tr, te)])

    def aiq(ps, names):
        return [evaluate(np.mean([p[n] for n in names], 0), Chat, Y, C)["aiq"] for p, Chat, Y, C in ps]

    ref = (cm.REFERENCE,)
    subsets = [s for r in (1, 2, 3, 4) for s in itertools.combinations(POOL, r)]
    merit = {s: min(cm.vouched_margin(np.subtract(aiq(k, s), aiq(k, ref))) for k in kinds) for s in subsets}
    fixed = [s for s in subsets if s in cm.ENSEMBLES]
    print(f"{'candidates averaged':<100} {'merit':>8} {'test AIQ':>9}")
    for s in sorted(subsets, key=lambda s: -merit[s]):
        mark = "  <- an ENSEMBLES entry" if s in fixed else ""
        print(f"{' + '.join(s):<100} {merit[s]:+8.4f} {aiq(test, s)[0]:9.4f}{mark}")
    single = max((s for s in subsets if len(s) == 1), key=lambda s: merit[s])
    best = max((s for s in subsets if len(s) > 1), key=lambda s: merit[s])
    best_fixed = max(fixed, key=lambda s: merit[s])
    print(f"set={args.set} best_single={single[0].replace(' ', '_')} best_single_merit={merit[single]:+.4f} "
          f"best_subset_merit={merit[best]:+.4f} best_fixed_ensemble_merit={merit[best_fixed]:+.4f} "
          f"knn_test_aiq={aiq(test, ref)[0]:.4f} best_fixed_test_aiq={aiq(test, best_fixed)[0]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
