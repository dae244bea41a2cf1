"""Prediction: prompt embeddings and the datastore's estimates -> quality, cost and support per backend.

The one place that turns the datastore's kNN estimates (and, when a trained router is served, the
capability encoder's blend of them) into the numbers the policy ranks. Route, RouteBatch,
Onboard, ``caprouter train`` and ``caprouter eval`` all call it, so what is measured offline is
what is served.

Two rules live here and nowhere else:

- **Columns in backend order** (``columns``): the datastore knows the backends it has outcomes
  for, in the order it met them; a caller asks for its own list. A backend the store has never
  seen gets, as quality, the mean of the store's estimates for that prompt over the backends it
  does know (a neutral guess that ranks it in the middle until outcomes arrive), no cost (NaN)
  and no support.
- **Cost where the neighbours recorded none**: the caller's fallback (a backend's cost model in
  serving, the mean cost per request of the training data offline).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from datastore.base import Datastore, Estimate
from datastore.store import FaissKnnDatastore
from encoders.capability import FrozenCapability
from router.core.compute import Compute, Inline
from router.core.config import DatastoreConfig
from router.prediction.clusters import ClusterTable

Scale = tuple[float, float]
"""A datastore neighbourhood (k, temperature); 0 means the store's own setting."""

OWN: Scale = (0.0, 0.0)


@dataclass(frozen=True)
class Prediction:
    """n prompts x B backends, columns in ``backends`` order.

    quality: float32 (n, B) in [0, 1]; cost: float64 (n, B), finite (a cost model's price is not
    rounded to float32: ``max_cost`` compares it exactly); support: float32 (n, B), the similarity
    mass of the neighbours that scored each backend (0: a prior, not evidence).
    """

    backends: tuple[str, ...]
    quality: npt.NDArray[np.float32]
    cost: npt.NDArray[np.float64]
    support: npt.NDArray[np.float32]


def columns(est: Estimate, backends: Sequence[str]
            ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``est`` (n prompts over the store's backends) -> quality, cost, support (n, B) over
    ``backends``: the column-filling rule of the module docstring."""
    cols = [est.column(b) for b in backends]
    known = [c for c in cols if c is not None]
    if len(known) == len(cols):     # the common case: one gather each (copies, safe to modify)
        return est.quality[:, known], est.cost[:, known], est.support[:, known]
    n = est.quality.shape[0]
    mean = est.quality.mean(1) if est.quality.shape[1] else np.full(n, 0.5, np.float32)
    q = np.empty((n, len(backends)), np.float32)
    c = np.full_like(q, np.nan)
    s = np.zeros_like(q)
    for j, col in enumerate(cols):
        if col is None:
            q[:, j] = mean
        else:
            q[:, j], c[:, j], s[:, j] = est.quality[:, col], est.cost[:, col], est.support[:, col]
    return q, c, s


def search(store: Datastore, X: npt.NDArray[np.float32], scales: Sequence[Scale]) -> dict[Scale, Estimate]:
    """One search of ``store`` for X (n, d) at every neighbourhood of ``scales`` and the store's own."""
    wanted = _wanted(scales)
    return dict(zip(wanted, store.estimate_many(X, wanted)))


def search_with_repeats(store: Datastore, X: npt.NDArray[np.float32], scales: Sequence[Scale]
                        ) -> tuple[dict[Scale, Estimate], Estimate]:
    """``search`` and ``Datastore.recorded`` for X (n, d) from the same one search."""
    wanted = _wanted(scales)
    *found, recorded = store.estimate_many(X, wanted, recorded=True)
    return dict(zip(wanted, found)), recorded


def _wanted(scales: Sequence[Scale]) -> list[Scale]:
    """The store's own neighbourhood first, then ``scales``, each once."""
    return list(dict.fromkeys([OWN, *scales]))


def _priced(cost: npt.NDArray[np.float32], fallback: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """cost (n, B) with NaN (no neighbour recorded one) replaced by the fallback, (n, B) or (B,),
    in float64 (the fallback's own precision)."""
    cost64 = cost.astype(np.float64)
    missing = np.isnan(cost64)
    if not missing.any():
        return cost64
    return np.where(missing, np.broadcast_to(np.asarray(fallback, dtype=np.float64), cost64.shape), cost64)


def _search_quality(store: Datastore, X: npt.NDArray[np.float32], backends: Sequence[str],
                    scales: Sequence[Sequence[float]] | None
                    ) -> tuple[npt.NDArray[np.float32], dict[Scale, Estimate]]:
    """One search; quality (n, B) at the store's own neighbourhood, or (n, B, S) at ``scales``,
    and the estimates it came from."""
    wanted = [(float(k), float(t)) for k, t in scales] if scales else []
    by = search(store, X, wanted)
    if not wanted:
        return columns(by[OWN], backends)[0], by
    return np.stack([columns(by[s], backends)[0] for s in wanted], -1), by


def knn_estimates(store: Datastore, X: npt.NDArray[np.float32], backends: Sequence[str],
                  fallback_cost: npt.NDArray[np.floating[Any]], *, scales: Sequence[Sequence[float]] | None = None
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The datastore alone, for X (n, d) over ``backends``: quality (n, B) at the store's own
    neighbourhood, or (n, B, S) at each of ``scales`` ([k, temperature]: the capability encoder's
    input); cost (n, B) at the store's own, ``fallback_cost`` ((n, B) or (B,)) where no neighbour
    recorded one (float32, as the offline metrics have always taken it)."""
    quality, by = _search_quality(store, X, backends, scales)
    return quality, _priced(columns(by[OWN], backends)[1], fallback_cost).astype(np.float32)


def knn_quality(store: Datastore, X: npt.NDArray[np.float32], backends: Sequence[str],
                scales: Sequence[Sequence[float]] | None = None) -> npt.NDArray[np.float32]:
    """``knn_estimates``' quality alone: (n, B), or (n, B, S) at ``scales``."""
    return _search_quality(store, X, backends, scales)[0]


def knn_store(X: npt.NDArray[np.float32], records: Sequence[Any], cfg: DatastoreConfig) -> Datastore:
    """An in-memory kNN datastore over X (n, d) and their outcome records (no state folder), with
    the configured k, prior and temperature: the stores training, evaluation and onboarding's fit
    build from data."""
    return FaissKnnDatastore.from_records(X, records, k=cfg.k, prior_strength=cfg.prior_strength,
                                          temperature=cfg.temperature)


class Capability:
    """A trained capability encoder, served next to the datastore. It takes the datastore's kNN
    estimates as input (its learned per-backend weights are the blend), so Feedback, which lands
    in the datastore, keeps moving decisions without retraining."""

    def __init__(self, model: Any, backends: Sequence[str], compute: Compute | None = None, *,
                 config: Any = None) -> None:
        self.model, self.backends = model, tuple(backends)
        self.config = config            # the model's CapabilityConfig (needed to grow it)
        self.compute: Compute = compute or Inline()
        # Serving runs the numpy copy on the calling thread: no torch dispatch, no thread hop.
        self._frozen = self.compute.run(FrozenCapability, model)
        self._index = {b: j for j, b in enumerate(self.backends)}

    @property
    def scales(self) -> list[Scale]:
        """The datastore neighbourhoods the model takes as input, in its order."""
        return [(float(k), float(t)) for k, t in (getattr(self.model, "knn_scales", None) or [[0, 0]])]

    def column(self, backend: str) -> int | None:
        return self._index.get(backend)

    def predict(self, X: npt.NDArray[np.float32], by_scale: dict[Scale, Estimate]) -> npt.NDArray[np.float32]:
        """X: (n, d) and the datastore's estimates for it at (at least) ``scales`` -> (n, B) quality
        in ``backends`` order."""
        K = np.stack([columns(by_scale[s], self.backends)[0] for s in self.scales], -1)     # (n, B, S)
        return self._frozen.predict(X, K)


class Ensemble:
    """The mean predicted quality of several trained capability encoders, datastore
    neighbourhoods and cluster tables (``caprouter train``'s ensemble candidates,
    router/offline/candidates.py).
    Serves where a ``Capability`` does: the members share their backends, and onboarding fits a
    new backend into each learned member and table (``prediction.onboarding.fit_capability``)."""

    def __init__(self, members: Sequence[Capability], neighbourhoods: Sequence[Scale] = (),
                 tables: Sequence[ClusterTable] = ()) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one trained member")
        if len({m.backends for m in members} | {t.backends for t in tables}) != 1:
            raise ValueError("an ensemble's members must predict the same backends")
        self.members = tuple(members)
        self.neighbourhoods = tuple((float(k), float(t)) for k, t in neighbourhoods)
        self.tables = tuple(tables)

    @property
    def backends(self) -> tuple[str, ...]:
        return self.members[0].backends

    @property
    def scales(self) -> list[Scale]:
        """Every neighbourhood a member takes as input and the ensemble's own, once each."""
        return list(dict.fromkeys([*(s for m in self.members for s in m.scales), *self.neighbourhoods]))

    def column(self, backend: str) -> int | None:
        return self.members[0].column(backend)

    def with_members(self, members: Sequence[Capability], tables: Sequence[ClusterTable] | None = None) -> Ensemble:
        return Ensemble(members, self.neighbourhoods, self.tables if tables is None else tables)

    def predict(self, X: npt.NDArray[np.float32], by_scale: dict[Scale, Estimate]) -> npt.NDArray[np.float32]:
        """X: (n, d) and the datastore's estimates at (at least) ``scales`` -> (n, B) quality, the
        members', neighbourhoods' and tables' mean, in ``backends`` order."""
        parts = [m.predict(X, by_scale) for m in self.members]
        parts += [columns(by_scale[s], self.backends)[0] for s in self.neighbourhoods]
        parts += [t.predict(X) for t in self.tables]
        return np.asarray(np.mean(parts, 0, dtype=np.float64), dtype=np.float32)


def pool_repeats(quality: npt.NDArray[np.float32], recorded: Estimate, backends: Sequence[str]
                 ) -> npt.NDArray[np.float32]:
    """quality (n, B) over ``backends``, where the store holds outcomes for the very prompt
    (``Datastore.recorded``: m copies scored a backend, mean r), replaced by (m r + q) / (m + 1):
    the prompt's own records, with the prediction counted as one more. The pseudo-count of one was
    fixed before measuring, not tuned. A new array; rows without repeats are unchanged."""
    out = np.array(quality, dtype=np.float32, copy=True)
    r, _, m = columns(recorded, backends)     # a backend the store never saw: support 0, unchanged
    hit = m > 0
    if hit.any():     # vectorized: a loop over backends cost 0.4 ms a Route at 27 of them
        out[hit] = (m[hit] * r[hit] + out[hit]) / (m[hit] + 1.0)
    return out


class Predictor:
    """Quality, cost and support per backend for prompt embeddings: the datastore's estimates,
    blended by the capability encoder (or an ensemble of them) where one is served (for the
    backends it knows; others keep the datastore's estimate), and, with ``repeats``, pooled with
    the outcomes the store holds for the very prompt (``pool_repeats``). Immutable: onboarding
    builds a new one (``with_capability``), so a request that runs meanwhile sees the old
    predictor or the new one, never half."""

    def __init__(self, datastore: Datastore, capability: Capability | Ensemble | None = None, *,
                 repeats: bool = True) -> None:
        self.datastore = datastore
        self.capability = capability
        self.repeats = repeats

    def with_capability(self, capability: Capability | Ensemble) -> Predictor:
        return Predictor(self.datastore, capability, repeats=self.repeats)

    def predict(self, X: npt.NDArray[np.float32], backends: Sequence[str],
                fallback_cost: npt.NDArray[np.floating[Any]]) -> Prediction:
        """X: (n, d) unit rows; fallback_cost: (n, B) or (B,), the cost of each backend where no
        neighbour recorded one -> Prediction over ``backends``."""
        X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        cap = self.capability
        scales = cap.scales if cap is not None else []
        if self.repeats:
            by, repeats = search_with_repeats(self.datastore, X, scales)
        else:
            by = search(self.datastore, X, scales)
        quality, recorded, support = columns(by[OWN], backends)
        cost = _priced(recorded, fallback_cost)
        if cap is not None:
            blended = cap.predict(X, by)
            for j, b in enumerate(backends):
                c = cap.column(b)
                if c is not None:
                    quality[:, j] = blended[:, c]
        if self.repeats:
            quality = pool_repeats(quality, repeats, backends)
        return Prediction(tuple(backends), quality, cost, support)
