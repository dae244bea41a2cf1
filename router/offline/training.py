"""`caprouter train` and `caprouter eval`: offline learning from recorded outcomes."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from datastore.base import Datastore
from encoders.base import PromptEncoder
from encoders.capability import CapabilityConfig, config_dict, train
from router.core.config import AppConfig, DatastoreConfig
from router.core.errors import InvalidArgument
from router.core.names import BACKEND_NAME_RULE, invalid_backend_names
from router.offline import baselines, candidates
from router.offline import evaluation as M
from router.offline.evaluation import evaluate, zero_router
from router.offline.routing_data import RoutingData, load_routing_data, split_indices
from router.prediction import artifact as art
from router.prediction.clusters import ClusterTable
from router.prediction.predictor import Predictor, knn_store
from router.serving.app import build_encoder

log = logging.getLogger(__name__)


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


def _costs(path: str | None) -> dict[str, float] | None:
    if not path:
        return None
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or not all(isinstance(v, (int, float)) for v in obj.values()):
        raise InvalidArgument(f"{path}: --costs must be a JSON object of backend -> cost per request")
    return {str(k): float(v) for k, v in obj.items()}


def _embed(encoder: PromptEncoder, data: RoutingData, progress: bool) -> npt.NDArray[np.float32]:
    from tqdm import tqdm

    parts, step = [], 256
    for s in tqdm(range(0, len(data), step), desc="embedding prompts", unit="batch", disable=not progress):
        parts.append(encoder.encode(data.prompts[s:s + step]))
    return np.concatenate(parts)


ROUTER_KINDS = {"auto": ("datastore", "capability", "ensemble"), "datastore": ("datastore",),
                "learned": ("capability",), "ensemble": ("ensemble",)}


@dataclass
class FittedRouter:
    """What `caprouter train` serves: the chosen candidate, its learned models (none: the datastore
    alone; several: an ensemble's, with its ``neighbourhoods``), the datastore's neighbourhood, and
    the store of the training rows the models were fitted with."""

    report: candidates.SelectionReport
    models: list[Any]
    configs: list[CapabilityConfig]
    datastore: DatastoreConfig
    store: Datastore
    neighbourhoods: list[tuple[float, float]] = field(default_factory=list)
    best_epoch: int | None = None       # the single model's (an ensemble's members' are in ``members``)
    val_bce: float | None = None
    members: list[dict[str, Any]] = field(default_factory=list)   # an ensemble's: name, best epoch, val BCE
    seconds: dict[str, float] = field(default_factory=dict)
    tables: list[ClusterTable] = field(default_factory=list)      # an ensemble's cluster tables

    @property
    def chosen(self) -> candidates.Candidate:
        return self.report.chosen

    @property
    def model(self) -> Any:
        """The one capability model served (None: the datastore alone, or an ensemble)."""
        return self.models[0] if self.chosen.kind == "capability" else None

    def predictor(self, backends: Sequence[str]) -> Predictor:
        """What ``caprouter serve`` makes of this router: the same Predictor."""
        return Predictor(self.store, art.served_capability(self.models, self.configs, backends, self.neighbourhoods,
                                                           tables=self.tables),
                         repeats=self.datastore.repeats)


def fit_router(X: npt.NDArray[np.float32], data: RoutingData, tr: npt.NDArray[np.int64], va: npt.NDArray[np.int64],
               ds: DatastoreConfig, base: CapabilityConfig, *, folds: int = 3, seed: int = 0, router: str = "auto",
               min_model_prompts: int = candidates.MIN_MODEL_PROMPTS, progress: bool = False) -> FittedRouter:
    """Choose among the candidates on ``folds`` held-out folds of tr + va, then fit the chosen one
    on tr (early stopping on va). X: (n, d) embeddings of all of ``data``."""
    t0 = time.perf_counter()
    tried = [c for c in candidates.default_candidates(base) if c.kind in ROUTER_KINDS[router]]
    report = candidates.select(X, data, np.sort(np.concatenate([tr, va])), ds, tried, folds=folds, seed=seed,
                               min_model_prompts=0 if router in ("learned", "ensemble") else min_model_prompts, progress=progress)
    seconds = {"choosing_s": time.perf_counter() - t0}
    chosen = report.chosen
    if chosen.kind == "datastore":
        k, t = chosen.scale
        ds = ds.model_copy(update={"k": int(k) or ds.k, "temperature": float(t) or ds.temperature})
    records = [data.records[i] for i in tr]
    store = knn_store(X[tr], records, ds)
    members = chosen.members if chosen.kind == "ensemble" else (chosen,)
    learned = [m for m in members if m.kind == "capability"]
    neighbourhoods = [(float(m.scale[0]), float(m.scale[1])) for m in members if m.kind == "datastore"]
    # Cluster tables take every row the served datastore holds (train and validation), as on the
    # folds: nothing is stopped early on the validation rows.
    served = np.sort(np.concatenate([tr, va]))
    tables = [ClusterTable.fit(X[served], data.Y[served], data.backends, clusters=m.clusters, seed=seed)
              for m in members if m.kind == "clusters"]
    if not learned:
        return FittedRouter(report, [], [], ds, store, seconds=seconds)
    t0 = time.perf_counter()
    fits, configs = [], []
    inputs: dict[str, Any] = {}
    for m in learned:
        cfg = m.capability
        assert cfg is not None
        configs.append(cfg)
        K, Kv = candidates.shared_knn_inputs(inputs, X, data, ds, tr, va, cfg, seed, store=store)
        fits.append(train(X[tr], data.Y[tr], X[va], data.Y[va], cfg, K=K, Kv=Kv, progress=progress))
    seconds["training_s"] = time.perf_counter() - t0
    models = [r.model for r in fits]
    if chosen.kind == "ensemble":
        info = [{"name": m.name, "best_epoch": r.best_epoch, "val_bce": r.best_val} for m, r in zip(learned, fits)]
        return FittedRouter(report, models, configs, ds, store, neighbourhoods, members=info, seconds=seconds,
                            tables=tables)
    return FittedRouter(report, models, configs, ds, store, best_epoch=fits[0].best_epoch, val_bce=fits[0].best_val,
                        seconds=seconds)


def train_command(config: AppConfig, data_path: str, out: str, *, costs: str | None = None, seed: int = 0,
                  max_epochs: int | None = None, test_share: float = 0.2, progress: bool = True,
                  clip_scores: bool = False, folds: int = 3, router: str = "auto",
                  min_model_prompts: int = candidates.MIN_MODEL_PROMPTS) -> dict[str, Any]:
    """Train and write an artifact. The data's own test split is held out where it has one, else a
    seeded ``test_share`` of it (0: none, for a router that serves rather than is measured).
    Every candidate router is scored on ``folds`` held-out folds of the rest and the best is
    served (router/offline/candidates.py); a learned one (or an ensemble's learned members) is
    then trained on 90% of the rest, early-stopped on the other 10%. The served datastore holds
    every outcome that is not test data (training and validation). ``router``: "auto" (every
    candidate), "datastore", "learned" or "ensemble" (only those)."""
    if not 0.0 <= test_share < 1.0:
        raise InvalidArgument(f"--test-share must be in [0, 1), got {test_share}")
    if folds < 2:
        raise InvalidArgument(f"--folds must be at least 2, got {folds}")
    if router not in ROUTER_KINDS:
        raise InvalidArgument(f"--router must be one of {', '.join(ROUTER_KINDS)}, got {router!r}")
    clipped: list[str] | None = [] if clip_scores else None
    data = load_routing_data(data_path, _costs(costs), clipped=clipped)
    if clipped:
        log.warning("clipped %d score(s) into [0, 1], the first %s", len(clipped), clipped[0])
    bad = invalid_backend_names(data.backends)
    if bad:
        # Refused here, not at `serve --artifact`: whatever train writes, serve must load.
        raise InvalidArgument(f"{data_path}: backend name(s) {', '.join(map(repr, bad))} cannot be served (a backend "
                              f"name is {BACKEND_NAME_RULE}); rename them in the data's scores and costs")
    encoder = build_encoder(config)
    t0 = time.perf_counter()
    X = _embed(encoder, data, progress)
    timings = {"embedding_s": time.perf_counter() - t0}
    tr, va, te = split_indices(data, seed=seed, test_share=test_share)
    te = te[data.complete_rows()[te]]
    base = CapabilityConfig(seed=seed)
    if max_epochs:
        base.max_epochs = max_epochs
    fit = fit_router(X, data, tr, va, config.datastore, base, folds=folds, seed=seed, router=router,
                     min_model_prompts=min_model_prompts, progress=progress)
    timings.update(fit.seconds)
    model, cfg, ds = fit.model, fit.chosen.capability, fit.datastore
    fallback = np.nanmean(data.C[tr], 0)
    metrics: dict[str, Any] = {"selection": fit.report.as_json()}
    if fit.best_epoch is not None:
        metrics.update(best_epoch=fit.best_epoch, val_bce=fit.val_bce)
    if fit.members:
        metrics["ensemble_members"] = fit.members
    metrics["seconds"] = timings
    pred = fit.predictor(data.backends)
    va_c = va[data.complete_rows()[va]]
    if len(va_c):
        p = pred.predict(X[va_c], data.backends, fallback)
        # Early stopping (and an ensemble's cluster table) saw these rows: a check, not a score; the
        # folds' are the held-out figures.
        metrics["val_aiq"] = evaluate(p.quality, p.cost, data.Y[va_c], data.C[va_c])["aiq"]
    if len(te):
        p = pred.predict(X[te], data.backends, fallback)
        metrics["test"] = evaluate(p.quality, p.cost, data.Y[te], data.C[te])
        metrics["test_zero_router"] = zero_router(data.Y[te], data.C[te])
    manifest = {
        "embedder": {"id": encoder.model_id, "dim": encoder.dim, "max_tokens": config.encoder.max_tokens},
        "backends": data.backends,
        "cost": {"mean_per_request": {b: float(v) for b, v in zip(data.backends, fallback)}},
        "data": {"path": str(data_path), "sha256": data.source_hash, "n_train": int(len(tr)),
                 "n_val": int(len(va)), "n_test": int(len(te)), "seed": seed, "test_share": test_share,
                 **({"clipped_scores": len(clipped)} if clipped is not None else {}),
                 "served_outcomes": "train+val"},
        "router": fit.chosen.kind,
        **({"capability": config_dict(cfg),
            "knn_weights": {b: [float(x) for x in w] for b, w in zip(data.backends, model.w.detach().numpy())}}
           if model is not None and cfg is not None else {}),
        **({"ensemble": {"members": [{"name": i["name"], "capability": config_dict(c), "weights": f"member-{j}.safetensors"}
                                     for j, (i, c) in enumerate(zip(fit.members, fit.configs))],
                         "neighbourhoods": [list(s) for s in fit.neighbourhoods],
                         "clusters": [{"regions": len(t.centroids), "weights": f"clusters-{j}.safetensors"}
                                      for j, t in enumerate(fit.tables)]}}
           if fit.chosen.kind == "ensemble" else {}),
        "datastore": ds.model_dump(include={"k", "prior_strength", "temperature"}),
        "metrics": metrics,
    }
    served = np.sort(np.concatenate([tr, va]))
    art.save(Path(out), models=fit.models, manifest=manifest, records=[data.records[i] for i in served],
             embeddings=X[served], tables=fit.tables)
    return manifest


def eval_command(config: AppConfig, artifact_dir: str, data_path: str, *, json_out: str | None = None,
                 costs: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate an artifact on a data file (its test split if it has one, else every row)."""
    encoder = build_encoder(config)
    a = art.load(Path(artifact_dir), embedder_id=encoder.model_id, dim=encoder.dim)
    data = load_routing_data(data_path, _costs(costs))
    missing = sorted(set(a.backends) - set(data.backends))
    if missing:
        raise InvalidArgument(f"{data_path} has no scores for backend(s) {', '.join(missing)} of the artifact")
    data = data.restrict_backends(a.backends)
    rows = np.array([s == "test" for s in data.splits])
    idx = np.where(rows)[0] if rows.any() else np.arange(len(data))
    idx = idx[data.complete_rows()[idx]]
    data = data.subset(idx)
    X = _embed(encoder, data, progress)
    store = knn_store(a.embeddings, a.records, config.datastore.model_copy(update=a.manifest["datastore"]))
    fallback = np.array([a.manifest["cost"]["mean_per_request"][b] for b in a.backends])
    p = Predictor(store, a.capability(), repeats=config.datastore.repeats).predict(X, a.backends, fallback)
    q, c = p.quality, p.cost
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


def _plot(path: Path, routers: dict[str, npt.NDArray[Any]], Chat: npt.NDArray[Any], Y: npt.NDArray[Any],
          C: npt.NDArray[Any], backends: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
