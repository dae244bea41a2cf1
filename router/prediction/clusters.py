"""A cluster router: k-means regions of the embedding space, each holding its backends' mean score.

The idea of Avengers / Avengers-Pro (Zhang et al., 2025), which LLMRouterBench found level with
the leading learned routers: much of what a router can learn is coarse domain structure, which a
table of per-region means captures with little variance. Here it is a possible member of
``caprouter train``'s ensembles, beside the datastore's neighbourhoods, the MLP and the blend: a
region's mean pools more prompts than a k=40 neighbourhood and errs differently from a fitted map.

Measured (seed 0, `benchmarks/routing_alternatives.py --try clusters`; vouched margin over plain
kNN on 3 random / 3 category-held-out folds of the training rows, then the test split for
reference), the served ensemble without -> with a 32-region table: LLMRouter +0.0027 / +0.0031 ->
+0.0023 / +0.0042 (test +0.0008 -> +0.0047); RouteLLM +0.0019 / +0.0037 -> +0.0026 / +0.0033
(+0.0021 -> +0.0022); MMLU-Pro (the MF ensemble) +0.0150 / +0.0206 -> +0.0162 / +0.0203 (+0.0082
-> +0.0115). Small and mixed on the folds, so ``caprouter train`` tries each ensemble with and
without it (router/offline/candidates.py). 32 regions came from a first, ad hoc measurement; 8,
16 and 64 lie within 0.0006 of it on each set's folds. The soft assignment (the 3 nearest
regions, softmax of cosine x 20) and the prior (10 pseudo-records at the backend's overall mean)
were fixed before measuring, not tuned.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CLUSTERS = 32            # regions, fewer where the data has under PROMPTS_PER_CLUSTER prompts per region
PROMPTS_PER_CLUSTER = 20
NEAREST = 3              # regions a prompt is assigned to, softly
SHARPNESS = 20.0         # softmax of cosine similarity x this over those regions
PRIOR = 10.0             # pseudo-records at the backend's overall mean in every region


@dataclass(frozen=True)
class ClusterTable:
    """centroids (K, d) unit rows; quality (K, B): each region's shrunk mean score per backend,
    columns in ``backends`` order; prior_mean (B,): the backend's overall mean, the shrinkage target."""

    centroids: npt.NDArray[np.float32]
    quality: npt.NDArray[np.float32]
    prior_mean: npt.NDArray[np.float32]
    backends: tuple[str, ...]

    @classmethod
    def fit(cls, X: npt.NDArray[np.float32], Y: npt.NDArray[np.floating], backends: Sequence[str], *,
            clusters: int = CLUSTERS, seed: int = 0) -> ClusterTable:
        """Spherical k-means (FAISS) of X (n, d) unit rows into ``clusters`` regions (at most one per
        ``PROMPTS_PER_CLUSTER`` prompts, at least 2), then each region's mean of Y (n, B) scores, NaN
        where not recorded, shrunk towards each backend's overall mean."""
        import faiss

        X = np.ascontiguousarray(X, dtype=np.float32)
        k = int(max(2, min(clusters, len(X) // PROMPTS_PER_CLUSTER)))
        # The best of 5 seeded starts: from one, two seeds drawn in the same topic stay there (a test
        # with three clear topics caught it); the starts cost milliseconds at these sizes.
        km = faiss.Kmeans(X.shape[1], k, niter=25, nredo=5, seed=int(seed), spherical=True,
                           min_points_per_centroid=1, verbose=False)   # min: no warning below 39 a region
        km.train(X)
        centroids = np.asarray(km.centroids, dtype=np.float32)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        quality, prior_mean = _region_means(centroids, X, Y)
        return cls(centroids, quality, prior_mean, tuple(backends))

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """X (n, d) unit rows -> (n, B) quality: the nearest regions' means, softly weighted."""
        sim = np.asarray(X, dtype=np.float32) @ self.centroids.T                     # (n, K)
        m = min(NEAREST, sim.shape[1])
        near = np.argpartition(-sim, m - 1, axis=1)[:, :m]                           # (n, m)
        s = np.take_along_axis(sim, near, 1)
        w = np.exp((s - s.max(1, keepdims=True)) * SHARPNESS)
        w /= w.sum(1, keepdims=True)
        return np.einsum("nm,nmb->nb", w, self.quality[near]).astype(np.float32)

    def column(self, backend: str) -> int | None:
        return self.backends.index(backend) if backend in self.backends else None

    def with_backend(self, name: str, X: npt.NDArray[np.float32], y: npt.NDArray[np.floating]) -> ClusterTable:
        """A copy that also predicts ``name`` (or predicts it anew) from its results y (m,) on the
        prompts X (m, d) (onboarding): each region's shrunk mean of the results that fall in it."""
        col, g = _region_means(self.centroids, X, np.asarray(y)[:, None])
        j = self.column(name)
        if j is None:
            return ClusterTable(self.centroids, np.concatenate([self.quality, col], 1),
                                np.concatenate([self.prior_mean, g]), (*self.backends, name))
        quality, prior = self.quality.copy(), self.prior_mean.copy()
        quality[:, j], prior[j] = col[:, 0], g[0]
        return ClusterTable(self.centroids, quality, prior, self.backends)


def _region_means(centroids: npt.NDArray[np.float32], X: npt.NDArray[np.float32], Y: npt.NDArray[np.floating]
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """X (n, d) assigned to the nearest of centroids (K, d); scores Y (n, B), NaN where not
    recorded -> ((K, B) per-region (sum + PRIOR x prior mean) / (records + PRIOR), (B,) prior
    mean: each column's mean over its recorded scores)."""
    region = (np.asarray(X, dtype=np.float32) @ centroids.T).argmax(1)
    Y = np.asarray(Y, dtype=np.float64)
    seen = ~np.isnan(Y)
    total = np.where(seen, Y, 0.0)
    prior_mean = total.sum(0) / np.maximum(seen.sum(0), 1)
    s = np.zeros((len(centroids), Y.shape[1]))
    c = np.zeros((len(centroids), Y.shape[1]))
    np.add.at(s, region, total)
    np.add.at(c, region, seen)
    return ((s + PRIOR * prior_mean) / (c + PRIOR)).astype(np.float32), prior_mean.astype(np.float32)
