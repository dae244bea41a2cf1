"""`caprouter train` and `caprouter eval`: offline learning from recorded outcomes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from router import artifact as art
from router.evaluate import evaluate, zero_router
from router.routing_data import RoutingData, load_routing_data, split_indices


def knn_estimates(store: Any, X: npt.NDArray[np.float32], backends: list[str], fallback_cost: npt.NDArray, *,
                  scales: list[list[float]] | None = None) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The datastore's quality and cost estimates in ``backends`` order (a backend the store has
    never seen gets its prior: the mean of the others). Quality is (n, B), or (n, B, S) for S
    neighbourhoods ``scales`` ([k, temperature], 0 = the store's own); cost (n, B) is always the
    store's own neighbourhood's."""
    wanted = [(0.0, 0.0)] + [(float(k), float(t)) for k, t in (scales or [])]
    ests = store.estimate_many(X, wanted)

    def cols(est: Any) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        q = np.empty((len(X), len(backends)), np.float32)
        c = np.empty_like(q)
        for j, b in enumerate(backends):
            col = est.column(b)
            q[:, j] = est.quality[:, col] if col is not None else est.quality.mean(1)
            c[:, j] = est.cost[:, col] if col is not None else np.nan
        return q, c

    q, c = cols(ests[0])
    if scales:
        q = np.stack([cols(e)[0] for e in ests[1:]], -1)
    return q, np.where(np.isnan(c), fallback_cost, c).astype(np.float32)


def out_of_fold_knn(X: npt.NDArray[np.float32], records: list, backends: list[str], ds_cfg: Any, *,
                    folds: int = 5, seed: int = 0, scales: list[list[float]] | None = None) -> npt.NDArray[np.float32]:
    """kNN estimates for training prompts from stores that do not hold them (k-fold), so the
    encoder learns how far to trust the datastore on prompts it has not memorized."""
    fold = np.random.default_rng(seed).permutation(len(X)) % folds
    out = np.zeros((len(X), len(backends), *([len(scales)] if scales else [])), np.float32)
    for f in range(folds):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        store = knn_store(X[tr], [records[i] for i in tr], ds_cfg)
        out[te] = knn_estimates(store, X[te], backends, np.zeros(len(backends)), scales=scales)[0]
    return out


def aptitude_knn(X: npt.NDArray[np.float32], y: npt.NDArray[np.float32], ds_cfg: Any, *,
                 folds: int = 5, scales: list[list[float]] | None = None) -> npt.NDArray[np.float32]:
    """(m,) or (m, S) out-of-fold kNN estimates of a new backend on its own aptitude prompts X (m, d) with
    scores y (m,): what the datastore will say about it on prompts it has not seen, which is what
    its capability vector is fitted on top of."""
    from datastore.records import OutcomeRecord

    fold = np.arange(len(X)) % folds
    out = np.zeros((len(X), *([len(scales)] if scales else [])), np.float32)
    for f in range(folds):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        recs = [OutcomeRecord(id=str(i), prompt="", scores={"new": float(y[i])}) for i in tr]
        out[te] = knn_estimates(knn_store(X[tr], recs, ds_cfg), X[te], ["new"], np.zeros(1), scales=scales)[0][:, 0]
    return out


def select_aptitude(X: npt.NDArray[np.float32], m: int, *, seed: int = 0, method: str = "kmeans") -> npt.NDArray[np.int64]:
    """Indices of m prompts of X (n, d) to serve as an aptitude test. "kmeans": the prompt nearest
    each of m k-means centroids, so the test covers every region of the prompt space that the
    data holds (Model-SAT's test covers capabilities, not a random draw of them); "random": a
    seeded sample."""
    rng = np.random.default_rng(seed)
    if m >= len(X):
        return np.arange(len(X))
    if method == "random":
        return np.sort(rng.choice(len(X), size=m, replace=False))
    if method != "kmeans":
        raise ValueError(f"method must be 'kmeans' or 'random', got {method!r}")
    import faiss

    Xc = np.ascontiguousarray(X, dtype=np.float32)
    cent = _kmeans_pp(Xc, m, rng)
    for _ in range(15):                     # spherical Lloyd iterations from the k-means++ seeds
        assign = (Xc @ cent.T).argmax(1)
        for k in range(m):
            members = Xc[assign == k]
            if len(members):
                v = members.sum(0)
                cent[k] = v / max(float(np.linalg.norm(v)), 1e-12)
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(Xc)
    _, nn = index.search(cent, 8)
    chosen: list[int] = []
    taken: set[int] = set()
    for row in nn:                         # the nearest prompt not already chosen by another centroid
        i = next((int(i) for i in row if i >= 0 and i not in taken), None)
        if i is not None:
            chosen.append(i)
            taken.add(i)
    rest = np.setdiff1d(np.arange(len(X)), chosen)
    if len(chosen) < m:
        chosen += list(rng.choice(rest, size=m - len(chosen), replace=False))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _kmeans_pp(X: npt.NDArray[np.float32], m: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """k-means++ seeds (D^2 sampling, cosine distance): small, distinct regions get a seed too."""
    cent = [X[rng.integers(len(X))]]
    d = 1.0 - X @ cent[0]
    for _ in range(1, m):
        p = np.maximum(d, 0).astype(np.float64) ** 2
        i = rng.choice(len(X), p=p / p.sum()) if p.sum() > 0 else rng.integers(len(X))
        cent.append(X[i])
        d = np.minimum(d, 1.0 - X @ X[i])
    return np.array(cent, dtype=np.float32)


def fit_backend(model: Any, X: npt.NDArray[np.float32], y: npt.NDArray[np.float32], ds_cfg: Any, *,
                peer_residuals: npt.NDArray[np.float32] | None = None
                ) -> tuple[npt.NDArray[np.float32], float, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A new backend's capability vector and datastore weights (g, beta, h, w) from its aptitude
    results X (m, d), y (m,), the prompt side of ``model`` frozen (Model-SAT onboarding).
    peer_residuals (m, B): the trained backends' recorded scores on the same prompts minus the
    model's predictions (``peer_residuals``), NaN where not recorded; None: not known."""
    from encoders.capability import onboard

    return onboard(model, X, y, knn=aptitude_knn(X, y, ds_cfg, scales=_scales(model)), peer_residuals=peer_residuals)


def peer_residuals(recorded: npt.NDArray[np.float32], predicted: npt.NDArray[np.float32]
                   ) -> npt.NDArray[np.float32] | None:
    """(m, B) recorded scores of the trained backends on the aptitude prompts (NaN: none) minus
    the model's predictions for them; None when no backend has a recorded score there (the
    aptitude prompts are new to the datastore), so onboarding fits without the control variate."""
    R = np.asarray(recorded, dtype=np.float32) - np.asarray(predicted, dtype=np.float32)
    return None if np.isnan(R).all() else R


def _scales(model: Any) -> list[list[float]] | None:
    """The neighbourhoods a capability model was trained with (None: the datastore's only)."""
    return getattr(model, "knn_scales", None)


class BlendPredictor:
    """The served prediction: the capability encoder, fed the kNN datastore's estimates (its
    learned per-backend weights are the blend)."""

    def __init__(self, model: Any, store: Any, backends: list[str], fallback_cost: npt.NDArray) -> None:
        self.model, self.store, self.backends, self.fallback_cost = model, store, backends, fallback_cost

    def predict(self, X: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """X: (n, d) -> quality (n, B), cost (n, B) in ``backends`` order."""
        from encoders.capability import predict

        qk, cost = knn_estimates(self.store, X, self.backends, self.fallback_cost, scales=_scales(self.model))
        return predict(self.model, X, qk).astype(np.float32), cost


def _costs(path: str | None) -> dict[str, float] | None:
    if not path:
        return None
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or not all(isinstance(v, (int, float)) for v in obj.values()):
        from router.errors import InvalidArgument

        raise InvalidArgument(f"{path}: --costs must be a JSON object of backend -> cost per request")
    return {str(k): float(v) for k, v in obj.items()}


def _embed(encoder, data: RoutingData, progress: bool) -> npt.NDArray[np.float32]:
    from tqdm import tqdm

    parts, step = [], 256
    for s in tqdm(range(0, len(data), step), desc="embedding prompts", unit="batch", disable=not progress):
        parts.append(encoder.encode(data.prompts[s:s + step]))
    return np.concatenate(parts)


def knn_store(X, records, ds_cfg):
    """An in-memory kNN datastore over (X, records) with the configured k, prior and temperature."""
    from datastore.store import FaissKnnDatastore

    return FaissKnnDatastore.from_records(X, records, k=ds_cfg.k, prior_strength=ds_cfg.prior_strength,
                                          temperature=ds_cfg.temperature)


def train_command(config, data_path: str, out: str, *, costs: str | None = None, seed: int = 0,
                  max_epochs: int | None = None, test_share: float = 0.2, progress: bool = True) -> dict[str, Any]:
    """Train and write an artifact. The data's own test split is held out where it has one, else a
    seeded ``test_share`` of it (0: none, for a router that serves rather than is measured).
    Validation (10% of the rest) picks the loss weights and the epoch; the served datastore
    then holds every outcome that is not test data (training and validation)."""
    from encoders.capability import CapabilityConfig, config_dict, train_selected
    from router.app import build_encoder

    data = load_routing_data(data_path, _costs(costs))
    encoder = build_encoder(config)
    X = _embed(encoder, data, progress)
    if not 0.0 <= test_share < 1.0:
        from router.errors import InvalidArgument

        raise InvalidArgument(f"--test-share must be in [0, 1), got {test_share}")
    tr, va, te = split_indices(data, seed=seed, test_share=test_share)
    te = te[data.complete_rows()[te]]
    cfg = CapabilityConfig(seed=seed, **({"max_epochs": max_epochs} if max_epochs else {}))
    fallback = np.nanmean(data.C[tr], 0)
    records = [data.records[i] for i in tr]
    store = knn_store(X[tr], records, config.datastore)
    K = out_of_fold_knn(X[tr], records, data.backends, config.datastore, seed=seed, scales=cfg.knn_scales)
    Kv = knn_estimates(store, X[va], data.backends, fallback, scales=cfg.knn_scales)[0]
    res, cfg, table = train_selected(X[tr], data.Y[tr], X[va], data.Y[va], cfg, K=K, Kv=Kv, progress=progress)
    pred = BlendPredictor(res.model, store, data.backends, fallback)
    va_c = va[data.complete_rows()[va]]
    metrics: dict[str, Any] = {"best_epoch": res.best_epoch, "val_bce": res.best_val,
                               "loss_weight_selection": [{k: v for k, v in t.items() if k != "result"} for t in table]}
    if len(va_c):
        q, c = pred.predict(X[va_c])
        metrics["val_aiq"] = evaluate(q, c, data.Y[va_c], data.C[va_c])["aiq"]
    if len(te):
        q, c = pred.predict(X[te])
        metrics["test"] = evaluate(q, c, data.Y[te], data.C[te])
        metrics["test_zero_router"] = zero_router(data.Y[te], data.C[te])
    manifest = {
        "embedder": {"id": encoder.model_id, "dim": encoder.dim, "max_tokens": config.encoder.max_tokens},
        "backends": data.backends,
        "cost": {"mean_per_request": {b: float(v) for b, v in zip(data.backends, fallback)}},
        "data": {"path": str(data_path), "sha256": data.source_hash, "n_train": int(len(tr)),
                 "n_val": int(len(va)), "n_test": int(len(te)), "seed": seed, "test_share": test_share,
                 "served_outcomes": "train+val"},
        "capability": config_dict(cfg),
        "knn_weights": {b: [float(x) for x in w] for b, w in zip(data.backends, res.model.w.detach().numpy())},
        "datastore": config.datastore.model_dump(include={"k", "prior_strength", "temperature"}),
        "metrics": metrics,
    }
    served = np.sort(np.concatenate([tr, va]))
    art.save(Path(out), model=res.model, manifest=manifest, records=[data.records[i] for i in served],
             embeddings=X[served])
    return manifest


def eval_command(config, artifact_dir: str, data_path: str, *, json_out: str | None = None,
                 costs: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate an artifact on a data file (its test split if it has one, else every row)."""
    from router import baselines
    from router import metrics as M
    from router.app import build_encoder

    encoder = build_encoder(config)
    a = art.load(Path(artifact_dir), embedder_id=encoder.model_id, dim=encoder.dim)
    data = load_routing_data(data_path, _costs(costs))
    missing = sorted(set(a.backends) - set(data.backends))
    if missing:
        from router.errors import InvalidArgument

        raise InvalidArgument(f"{data_path} has no scores for backend(s) {', '.join(missing)} of the artifact")
    data = data.restrict_backends(a.backends)
    rows = np.array([s == "test" for s in data.splits])
    idx = np.where(rows)[0] if rows.any() else np.arange(len(data))
    idx = idx[data.complete_rows()[idx]]
    data = data.subset(idx)
    X = _embed(encoder, data, progress)
    store = knn_store(a.embeddings, a.records, config.datastore.model_copy(update=a.manifest["datastore"]))
    fallback = np.array([a.manifest["cost"]["mean_per_request"][b] for b in a.backends])
    pred = BlendPredictor(a.model, store, a.backends, fallback)
    q, c = pred.predict(X)
    Y, C = data.Y, data.C
    Ytr = np.array([[r.scores.get(b, np.nan) for b in a.backends] for r in a.records], dtype=np.float32)
    routers = {"caprouter": q, "kNN (k=40)": baselines.knn_router(a.embeddings, Ytr, X, 40), "oracle": Y}
    report: dict[str, Any] = {"artifact": str(artifact_dir), "data": str(data_path), "n": int(len(data)),
                              "accuracy": M.per_backend_accuracy(Y, a.backends),
                              "mean_cost": {b: float(C[:, j].mean()) for j, b in enumerate(a.backends)},
                              "zero router": zero_router(Y, C),
                              **{name: evaluate(Q, c, Y, C) for name, Q in routers.items()}}
    out = Path(json_out) if json_out else Path(artifact_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    _plot(out.with_suffix(".png"), routers, c, Y, C, a.backends)
    md = [f"# Evaluation of {artifact_dir} on {data_path} ({len(data)} prompts)", "",
          "| router | AIQ | quality at best single's cost | cost to reach best single's quality |", "|---|---|---|---|"]
    for name in ("zero router", *routers):
        m = report[name]
        md.append(f"| {name} | {m['aiq']:.3f} | {m['q_at_best_cost']:.3f} | {m['cost_share_for_best_quality']:.3f} |")
    md += ["", "| backend | accuracy | mean cost |", "|---|---|---|"]
    md += [f"| {b} | {report['accuracy'][b]:.3f} | {report['mean_cost'][b]:.4g} |" for b in a.backends]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    report["markdown"] = "\n".join(md)
    report["files"] = [str(out), str(out.with_suffix(".md")), str(out.with_suffix(".png"))]
    return report


def _plot(path: Path, routers: dict, Chat, Y, C, backends) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from router import metrics as M

    lams = M.default_lambdas(C, Y)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, Q in routers.items():
        h = M.envelope(M.sweep_points(Q, Chat, Y, C, lams))
        ax.plot(h[:, 0], h[:, 1], "-o", ms=3, label=name)
    for j, b in enumerate(backends):
        ax.plot(C[:, j].mean(), Y[:, j].mean(), "s", ms=6, label=b)
    ax.set_xlabel("average cost per request")
    ax.set_ylabel("average quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
