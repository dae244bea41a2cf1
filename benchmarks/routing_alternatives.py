"""Ideas for beating plain kNN that were measured and not adopted (docs/routing_quality_notes.md),
scored as `caprouter train` scores its candidates: 3 random and 3 category-held-out folds of the
training rows (the vouched margin over plain kNN of router/offline/candidates.py ``select``), and
the test split for reference only (never used to choose). Every router's predictions are pooled
with the held-out prompts' own records where the store holds them (``datastore.repeats``), as
`caprouter train` scores and serves them: 20% of LLMRouter's published test prompts repeat a
training prompt (docs/routing_quality_notes.md); ``--no-repeats`` scores them without.

- ``metric``: kNN in a learned metric. A 384 x 384 map of the MiniLM embedding (from the
  identity, weight decay towards it) and a softmax temperature, trained so that each training
  prompt's k=40 neighbours (itself excluded) predict its scores (soft-kNN regression, NCA-style);
  early stopping on the fold's inner validation rows.
- ``offsets``: per-backend offsets added to a router's predicted quality, fitted by coordinate
  search to maximize AIQ on the other folds' out-of-fold predictions (cross-fitting), applied to
  the held-out fold.
- ``decision``: the blend with a decision-focused term: the expected score less lambda x cost of
  a softmax choice (temperature 0.05) over ten lambdas, so the model is trained on what AIQ
  rewards rather than on calibration alone.
- ``balanced``: the random folds re-weighted so that every category counts equally (50 prompts
  per category, 20 draws), as the published LLMRouter test split weighs its tasks.
- ``attention``: a richer view of the prompt from MiniLM's own token states: the blend and the
  MLP take, beside the mean-pooled embedding, four learned attention poolings of the last layer's
  token states (one query vector each, trained with the router), and the ensemble takes them in
  place of its MLP and blend. ``layers``: the same with the mean-pooled fourth layer's states
  (fixed, not learned) beside the embedding; ``all-layers``: the mean-pooled layers 1 to 5 beside
  it. The token states are computed here (torch runtime, about 1.5 minutes for LLMRouter), not
  cached.
- ``clusters``: the cluster table (router/prediction/clusters.py) alone at 8, 16, 32 and 64
  regions, and the ensemble's other members with and without each (the served ensemble holds the
  32-region table).

    .venv/bin/python benchmarks/routing_alternatives.py --set llmrouter [--no-repeats]     # ~10 min
    .venv/bin/python benchmarks/routing_alternatives.py --set llmrouter --try attention,layers   # ~35 min
    .venv/bin/python benchmarks/routing_alternatives.py --set mmlu_pro --try attention,layers \
        --ensemble 1 --kinds random,test
    .venv/bin/python benchmarks/routing_alternatives.py --set llmrouter --try clusters   # ~5 min; mmlu_pro --ensemble 1
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import numpy as np
from common import embeddings, load  # noqa: I001

from encoders.capability import CapabilityConfig, predict, train
from router.core.config import AppConfig
from router.offline import candidates as cm
from router.offline.evaluation import evaluate
from router.offline.routing_data import split_indices
from router.prediction.clusters import ClusterTable
from router.prediction.predictor import knn_estimates, pool_repeats

BLEND = "blend w_con=0 w_ot=0"


def soft_knn(zq, zk, Yk, Mk, k: int, logt):
    """Similarity-softmax mean of the k nearest keys' scores, per backend over the keys that
    scored it. zq (n, d), zk (m, d) unit rows; Yk, Mk (m, B) scores (0 where missing) and mask."""
    import torch

    v, i = (zq @ zk.T).topk(k, dim=1)
    w = torch.softmax(v * torch.exp(logt), 1)[..., None]
    return (w * Yk[i] * Mk[i]).sum(1) / (w * Mk[i]).sum(1).clamp_min(1e-6)


def metric_knn(X, Y, tr, va, rows, held, *, k: int = 40, lr: float = 3e-3, wd: float = 1e-2, epochs: int = 80,
               patience: int = 8, seed: int = 0, bs: int = 512):
    """Fit the map on tr (early stopping on va); predict held from the keys ``rows``. (len(held), B)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = X.shape[1]
    M, Y0 = ~np.isnan(Y), np.nan_to_num(Y)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)   # noqa: E731
    Xt, Yt, Mt = t(X[tr]), t(Y0[tr]), t(M[tr])
    W = torch.nn.Parameter(torch.eye(d))
    logt = torch.nn.Parameter(torch.tensor(float(np.log(20.0))))
    opt = torch.optim.Adam([W, logt], lr=lr)

    def emb(x):
        return torch.nn.functional.normalize(x @ W, dim=1)

    best, state, bad = np.inf, None, 0
    for _ in range(epochs):
        perm = torch.randperm(len(tr), generator=g)
        for s in range(0, len(tr), bs):
            q = perm[s:s + bs]
            zk = emb(Xt)
            sim = zk[q] @ zk.T
            sim[torch.arange(len(q)), q] = -10.0          # a prompt is not its own neighbour
            v, i = sim.topk(k, dim=1)
            w = torch.softmax(v * torch.exp(logt), 1)[..., None]
            pred = (w * Yt[i] * Mt[i]).sum(1) / (w * Mt[i]).sum(1).clamp_min(1e-6)
            loss = (((pred - Yt[q]) ** 2) * Mt[q]).sum() / Mt[q].sum() + wd * ((W - torch.eye(d)) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pv = soft_knn(emb(t(X[va])), emb(Xt), Yt, Mt, k, logt)
            vl = float((((pv - t(Y0[va])) ** 2) * t(M[va])).sum() / t(M[va]).sum())
        if vl < best - 1e-6:
            best, state, bad = vl, (W.detach().clone(), logt.detach().clone()), 0
        else:
            bad += 1
            if bad >= patience:
                break
    W.data, logt.data = state
    with torch.no_grad():
        return soft_knn(emb(t(X[held])), emb(t(X[rows])), t(Y0[rows]), t(M[rows]), k, logt).numpy()


def decision_term(cost, T: float = 0.05):
    """A loss on (logits, y, mask) (n, B): minus the expected score less lambda x normalized cost
    of a softmax choice over backends, averaged over ten lambdas; complete rows only."""
    import torch

    cn = torch.as_tensor((cost - cost.min()) / max(float(np.ptp(cost)), 1e-12), dtype=torch.float32)
    lams = torch.as_tensor(np.concatenate([[0.0], np.geomspace(0.02, 2.0, 9)]), dtype=torch.float32)

    def loss(logits, y, m):
        full = m.min(1).values > 0
        if full.sum() < 2:
            return logits.sum() * 0
        u = y[full][:, None, :] - lams[None, :, None] * cn
        p = torch.softmax((torch.sigmoid(logits[full])[:, None, :] - lams[None, :, None] * cn) / T, -1)
        return -(p * u).sum(-1).mean()
    return loss


def fit_offsets(Q, Chat, Y, C, passes: int = 2):
    """(B,) offsets on Q that maximize AIQ on (Q, Chat, Y, C), by coordinate search."""
    off = np.zeros(Q.shape[1], np.float32)
    best = evaluate(Q, Chat, Y, C)["aiq"]
    for _ in range(passes):
        for b in range(Q.shape[1]):
            for g in np.linspace(-0.1, 0.1, 21):
                o = off.copy()
                o[b] = g
                s = evaluate(Q + o, Chat, Y, C)["aiq"]
                if s > best + 1e-6:
                    best, off = s, o
    return off


def token_states(data, *, max_tokens: int = 256):
    """MiniLM's last-layer token states of every prompt, as the served encoder truncates them:
    T (n, max_tokens, 384) float16 (zero past each prompt's length), lengths (n,), and every
    layer's mean-pooled states (7, n, 384; 0: the token embeddings, 6: the last), unit rows."""
    import torch
    from tqdm import tqdm

    from encoders.minilm import MiniLMEncoder
    from encoders.padding import length_groups

    enc = MiniLMEncoder(runtime="torch", max_tokens=max_tokens)
    ids = [enc._ids(t) for t in data.prompts]
    lens = np.array([len(c) for c in ids])
    T = np.zeros((len(ids), max_tokens, enc.dim), np.float16)
    pooled = np.zeros((7, len(ids), enc.dim), np.float32)
    for g in tqdm(length_groups(list(lens), max_batch=64, overhead_tokens=50.0), desc="token states", unit="batch"):
        w = int(lens[g].max())
        a = np.full((len(g), w), enc.tokenizer.pad_token_id, np.int64)
        m = np.zeros((len(g), w), np.float32)
        for r, i in enumerate(g):
            a[r, :lens[i]], m[r, :lens[i]] = ids[i], 1
        with torch.inference_mode():
            out = enc.model(input_ids=torch.from_numpy(a), attention_mask=torch.from_numpy(m).long(),
                            output_hidden_states=True)
        mm = torch.from_numpy(m)[..., None]
        T[g, :w] = (out.last_hidden_state * mm).numpy().astype(np.float16)
        for j, h in enumerate(out.hidden_states):
            pooled[j, g] = torch.nn.functional.normalize((h * mm).sum(1) / mm.sum(1), dim=-1).numpy()
    return T, lens, pooled


def fit_pooled(X, T, lens, Y, tr, va, held, K, Kv, Kh, cfg: CapabilityConfig, heads: int = 4, seed: int = 0):
    """The capability model on [embedding, ``heads`` attention poolings of the token states T],
    pooling and model trained together on the prediction loss (early stopping on va as
    ``encoders.capability.train``); -> quality (len(held), B). K, Kv, Kh: the datastore inputs
    for tr, va, held (None: a model without them)."""
    import copy

    import torch

    from encoders.capability import _masked_bce, build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    d = X.shape[1]
    query = torch.nn.Parameter(torch.zeros(heads, d))
    model = build_model(d * (1 + heads), Y.shape[1], cfg)
    opt = torch.optim.AdamW([*model.parameters(), query], lr=cfg.lr, weight_decay=cfg.weight_decay)
    M, Y0 = (~np.isnan(Y)).astype(np.float32), np.nan_to_num(Y).astype(np.float32)

    def logits(idx, k):
        w = int(lens[idx].max())
        t = torch.from_numpy(T[idx, :w].astype(np.float32))                       # (b, w, d)
        s = torch.einsum("bld,hd->bhl", t, query)
        s = s.masked_fill(torch.from_numpy(np.arange(w)[None, None] >= lens[idx][:, None, None]), -1e9)
        pooled = torch.nn.functional.normalize(torch.einsum("bhl,bld->bhd", torch.softmax(s, -1), t), dim=-1)
        x = torch.cat([torch.from_numpy(X[idx]), pooled.flatten(1)], 1)
        return model(x, None if k is None else torch.as_tensor(k))[0]

    def run(idx, k):
        return torch.cat([logits(idx[s:s + 512], None if k is None else k[s:s + 512]) for s in range(0, len(idx), 512)])

    best, bad, state = np.inf, 0, None
    for _ in range(cfg.max_epochs):
        model.train()
        perm = rng.permutation(len(tr))
        for s in range(0, len(perm), cfg.batch_size):
            j = perm[s:s + cfg.batch_size]
            if len(j) < 8:
                continue
            loss = _masked_bce(logits(tr[j], None if K is None else K[j]), torch.from_numpy(Y0[tr[j]]),
                               torch.from_numpy(M[tr[j]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            vl = float(_masked_bce(run(va, Kv), torch.from_numpy(Y0[va]), torch.from_numpy(M[va])))
        if vl < best - 1e-5:
            best, bad, state = vl, 0, (copy.deepcopy(model.state_dict()), query.detach().clone())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(state[0])
    query.data = state[1]
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(run(held, Kh)).numpy()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="llmrouter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--try", dest="tries", default="metric,offsets,decision,balanced")
    ap.add_argument("--no-repeats", action="store_true", help="do not pool repeated prompts' records (every router)")
    ap.add_argument("--ensemble", type=int, default=0,
                    help="which of candidates.ENSEMBLES is compared (0: kNN + k=100 + MLP + blend, 1: MF + MLP + "
                         "blend, 2 and 3: the same with a cluster table)")
    ap.add_argument("--kinds", default="random,category,test", help="which folds: random, category, test")
    args = ap.parse_args()
    tries = set(args.tries.split(","))
    data = load(args.set)
    X = embeddings(args.set, data)
    tr, va, te = split_indices(data, seed=args.seed)
    ds = AppConfig().datastore.model_copy(update={"repeats": not args.no_repeats})
    by = {c.name: c for c in cm.default_candidates(CapabilityConfig(seed=args.seed))}
    ens = by[cm.ensemble_name(cm.ENSEMBLES[args.ensemble])]
    cands = [by[cm.REFERENCE], by[BLEND], by["MLP"], ens]
    views = {}
    if tries & {"attention", "layers", "all-layers"}:
        T, lens, pooled = token_states(data)
        if "layers" in tries:
            views["layers"] = np.concatenate([X, pooled[4]], 1)
        if "all-layers" in tries:
            views["all-layers"] = np.concatenate([X, *pooled[1:6]], 1)
    if "decision" in tries:
        import encoders.capability as capm

        # The ranking term's slot carries the decision term (w_rank is its weight).
        capm.ranking_loss = decision_term(np.nanmean(data.C[np.concatenate([tr, va])], 0))
        cands.append(cm.Candidate("blend + decision term w=0.5", "capability",
                                  capability=replace(by[BLEND].capability, w_rank=0.5)))
    complete = data.complete_rows()
    rows = np.sort(np.concatenate([tr, va]))

    def kind(splits):
        out = []
        for f, (trr, held) in enumerate(splits):
            held = held[complete[held]]
            fold = cm._Fold(X, data, trr, held, ds, [[40, 100.0], [100, 100.0]], args.seed, args.seed + f)
            q = {c.name: fold.quality(c) for c in cands}
            rec = fold.store.recorded(X[held])      # the held prompts' repeats, pooled into every router below
            if "metric" in tries:
                # Repeats pooled as for every candidate (datastore.repeats; fold.quality does it).
                q["kNN in a learned metric"] = metric_knn(X, data.Y, fold.tr, fold.va, trr, held, seed=args.seed)
                if ds.repeats:
                    q["kNN in a learned metric"] = pool_repeats(q["kNN in a learned metric"], rec, data.backends)
            for view in [v for v in ("attention", "layers", "all-layers") if v in tries]:
                for c in (by[BLEND], by["MLP"]):
                    cfg = replace(c.capability, patience=10)     # as candidates._Fold fits them
                    K, Kv = cm.shared_knn_inputs(fold.knn_inputs, X, data, ds, fold.tr, fold.va, cfg, args.seed)
                    Kh = knn_estimates(fold.store, X[held], data.backends, fold.fallback,
                                       scales=cfg.knn_scales)[0] if cfg.knn_blend else None
                    if view == "attention":
                        pred = fit_pooled(X, T, lens, data.Y, fold.tr, fold.va, held, K, Kv, Kh, cfg, seed=f)
                    else:
                        V = views[view]
                        pred = predict(train(V[fold.tr], data.Y[fold.tr], V[fold.va], data.Y[fold.va], cfg, K=K,
                                             Kv=Kv).model, V[held], Kh)
                    q[f"{c.name} on {view}"] = pool_repeats(pred, rec, data.backends) if ds.repeats else pred
                q[f"ensemble on {view}"] = np.mean([q.get(f"{m.name} on {view}", q.get(m.name)) if m.name in
                                                    (BLEND, "MLP") else fold.quality(m) for m in ens.members], 0)
            if "clusters" in tries:
                rest = [fold.quality(m) for m in ens.members if m.kind != "clusters"]
                q["ensemble's members without a cluster table"] = np.mean(rest, 0)
                for regions in (8, 16, 32, 64):
                    table = ClusterTable.fit(X[trr], data.Y[trr], data.backends, clusters=regions, seed=args.seed)
                    t = table.predict(X[held])
                    t = pool_repeats(t, rec, data.backends) if ds.repeats else t
                    q[f"cluster table {regions} regions alone"] = t
                    q[f"ensemble without its table + {regions} regions"] = np.mean([*rest, t], 0)
            out.append((q, fold.Chat, data.Y[held], data.C[held], held))
            print(f"fold {f} done", flush=True)
        return out

    wanted = args.kinds.split(",")
    kinds = {}
    if "random" in wanted:
        a = cm.fold_split(len(rows), 3, args.seed)
        kinds["random"] = kind([(rows[a != f], rows[a == f]) for f in range(3)])
    cs = cm.category_fold_split([data.categories[i] for i in rows], 3, args.seed)
    if cs is not None and "category" in wanted:
        kinds["category"] = kind([(rows[cs != f], rows[cs == f]) for f in range(3)])
    if "test" in wanted:
        kinds["test"] = kind([(tr, te)])

    def aiq(p, q):
        return evaluate(q, p[1], p[2], p[3])["aiq"]

    names = list(next(iter(kinds.values()))[0][0])
    print(f"\n{'router':<60} " + " ".join(f"{k:>22}" for k in kinds))
    figures = {}
    for n in names:
        cells = []
        for k, ps in kinds.items():
            v = np.array([aiq(p, p[0][n]) for p in ps])
            ref = np.array([aiq(p, p[0][cm.REFERENCE]) for p in ps])
            vm = cm.vouched_margin(v - ref)
            cells.append(f"{v.mean():.4f} ({vm:+.4f})")
            figures[f"{k}_{n.split(':')[0].replace(' ', '_')}_margin"] = f"{vm:+.4f}"
        print(f"{n:<60} " + " ".join(f"{c:>22}" for c in cells))
        if "offsets" in tries:
            cells = []
            for k, ps in kinds.items():
                got = []
                for f, p in enumerate(ps):
                    fit_on = kinds["random"] if k == "test" else [o for g, o in enumerate(ps) if g != f]
                    off = fit_offsets(*(np.concatenate([o[j] if j else o[0][n] for o in fit_on]) for j in range(4)))
                    got.append(aiq(p, p[0][n] + off) - aiq(p, p[0][cm.REFERENCE]))
                cells.append(f"{cm.vouched_margin(got):+.4f}")
            print(f"{'  with per-backend offsets (margin over kNN)':<60} " + " ".join(f"{c:>22}" for c in cells))
    if "balanced" in tries and data.categories:
        rng = np.random.default_rng(args.seed)
        print("\nrandom folds, every category weighted equally (50 prompts per category, 20 draws):")
        for n in names:
            per = []
            for q, Chat, Y, C, held in kinds["random"]:
                cats = np.array([data.categories[i] for i in held])
                draws = [np.concatenate([rng.choice(np.where(cats == c)[0], 50) for c in sorted(set(cats))])
                         for _ in range(20)]
                per.append(np.mean([evaluate(q[n][i], Chat[i], Y[i], C[i])["aiq"]
                                    - evaluate(q[cm.REFERENCE][i], Chat[i], Y[i], C[i])["aiq"] for i in draws]))
            print(f"{n:<60} margin over kNN per fold {np.round(per, 4)}")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
