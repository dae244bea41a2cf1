"""Onboarding's fit (Model-SAT): a new backend's capability vector from its aptitude results, the
prompt side of the trained capability encoder frozen (``encoders.capability.onboard``).

Used by the Onboard RPC (``fit_capability``, at serving time) and by the onboarding benchmark.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from datastore.base import Datastore
from datastore.records import OutcomeRecord
from encoders.capability import add_backend, onboard, replace_backend
from router.core.config import DatastoreConfig
from router.prediction.predictor import Capability, Ensemble, knn_quality, knn_store, search_with_repeats


def aptitude_knn(X: npt.NDArray[np.float32], y: npt.NDArray[np.float32], ds_cfg: DatastoreConfig, *,
                 folds: int = 5, scales: Sequence[Sequence[float]] | None = None) -> npt.NDArray[np.float32]:
    """(m,) or (m, S) out-of-fold kNN estimates of a new backend on its own aptitude prompts X (m, d)
    with scores y (m,): what the datastore will say about it on prompts it has not seen, which is
    what its capability vector is fitted on top of."""
    fold = np.arange(len(X)) % folds
    out = np.zeros((len(X), *([len(scales)] if scales else [])), np.float32)
    for f in range(folds):
        tr, te = np.where(fold != f)[0], np.where(fold == f)[0]
        recs = [OutcomeRecord(id=str(i), prompt="", scores={"new": float(y[i])}) for i in tr]
        out[te] = knn_quality(knn_store(X[tr], recs, ds_cfg), X[te], ["new"], scales)[:, 0]
    return out


def peer_residuals(recorded: npt.NDArray[np.float32], predicted: npt.NDArray[np.float32]
                   ) -> npt.NDArray[np.float32] | None:
    """(m, B) recorded scores of the trained backends on the aptitude prompts (NaN: none) minus
    the model's predictions for them; None when no backend has a recorded score there (the
    aptitude prompts are new to the datastore), so onboarding fits without the control variate."""
    R = np.asarray(recorded, dtype=np.float32) - np.asarray(predicted, dtype=np.float32)
    return None if np.isnan(R).all() else R


def fit_backend(model: Any, X: npt.NDArray[np.float32], y: npt.NDArray[np.float32], ds_cfg: DatastoreConfig, *,
                peer_residuals: npt.NDArray[np.float32] | None = None
                ) -> tuple[npt.NDArray[np.float32], float, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A new backend's capability vector and datastore weights (g, beta, h, w) from its aptitude
    results X (m, d), y (m,), the prompt side of ``model`` frozen (Model-SAT onboarding).
    peer_residuals (m, B): the trained backends' recorded scores on the same prompts minus the
    model's predictions (``peer_residuals``), NaN where not recorded; None: not known."""
    knn = aptitude_knn(X, y, ds_cfg, scales=getattr(model, "knn_scales", None))
    return onboard(model, X, y, knn=knn, peer_residuals=peer_residuals)


def fit_capability(capability: Capability | Ensemble, name: str, X: npt.NDArray[np.float32],
                   y: npt.NDArray[np.float32], ds_cfg: DatastoreConfig, datastore: Datastore) -> Capability | Ensemble:
    """A copy of ``capability`` that also predicts ``name`` (or predicts it anew), its vector
    fitted to the aptitude results X (m, d), y (m,). Where the datastore holds the trained
    backends' own outcomes on those prompts, their residuals correct the fit for the luck of the
    sample. Call it before the new results join the datastore. An ensemble's learned members are
    each fitted so (each against its own predictions); its cluster tables take the results' means
    per region; its neighbourhoods need no fit."""
    if isinstance(capability, Ensemble):
        return capability.with_members([_fit_one(m, name, X, y, ds_cfg, datastore) for m in capability.members],
                                       [t.with_backend(name, X, y) for t in capability.tables])
    return _fit_one(capability, name, X, y, ds_cfg, datastore)


def _fit_one(capability: Capability, name: str, X: npt.NDArray[np.float32], y: npt.NDArray[np.float32],
             ds_cfg: DatastoreConfig, datastore: Datastore) -> Capability:
    by_scale, rec = search_with_repeats(datastore, X, capability.scales)
    # The backend being fitted is nobody's peer (re-onboarded, its old vector is in the model).
    cols = [rec.column(b) if b != name else None for b in capability.backends]
    recorded = np.stack([rec.quality[:, c] if c is not None else np.full(len(X), np.nan, np.float32)
                         for c in cols], 1)
    R = peer_residuals(recorded, capability.predict(X, by_scale))
    model, config = capability.model, capability.config

    def fit() -> Any:
        g, b, h, w = fit_backend(model, X, y, ds_cfg, peer_residuals=R)
        j = capability.column(name)
        if j is not None:
            return replace_backend(model, j, g, b, h, config, w)
        return add_backend(model, g, b, h, config, w)

    grown = capability.compute.run(fit)
    names = capability.backends if name in capability.backends else (*capability.backends, name)
    return Capability(grown, names, capability.compute, config=config)
