"""The Datastore interface: kNN estimates of each backend's quality and cost for new prompts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import numpy.typing as npt

from router.registry import Registry


@dataclass(frozen=True)
class Estimate:
    """Predictions for n prompts over the datastore's B backends (columns in ``backends`` order).

    quality: float32 (n, B) in [0, 1]; support: float32 (n, B), the similarity mass of the
    neighbours that scored each backend (0: the estimate is the prior alone); cost: float32 (n, B),
    NaN where no neighbour recorded a cost for that backend.
    """

    backends: tuple[str, ...]
    quality: npt.NDArray[np.float32]
    support: npt.NDArray[np.float32]
    cost: npt.NDArray[np.float32]

    def column(self, backend: str) -> int | None:
        try:
            return self.backends.index(backend)
        except ValueError:
            return None


@dataclass(frozen=True)
class BackendStats:
    outcomes: int
    mean_score: float


class Datastore(Protocol):
    """Prompt embeddings (unit-norm, dim d) with per-backend outcomes."""

    def __len__(self) -> int: ...

    def estimate(self, embeddings: npt.NDArray[np.float32]) -> Estimate:
        """embeddings: float32 (n, d), unit rows."""
        ...

    def recorded(self, embeddings: npt.NDArray[np.float32]) -> Estimate:
        """The scores stored for these very prompts (duplicates of stored ones), NaN elsewhere."""
        ...

    def add(self, embeddings: npt.NDArray[np.float32], records: Sequence[dict]) -> list[str]:
        """Durably append outcomes (one record per row: prompt, scores, optional cost); returns ids."""
        ...

    def stats(self) -> dict[str, BackendStats]: ...

    def close(self) -> None: ...


DATASTORES: Registry = Registry("datastore")
