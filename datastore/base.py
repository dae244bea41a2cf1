"""The Datastore interface: kNN estimates of each backend's quality and cost for new prompts, and
the outcomes (aptitude results, Feedback) they are drawn from."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from datastore.records import OutcomeRecord
from router.core.registry import Registry


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
    """Prompt embeddings (unit-norm, dim d) with per-backend outcomes: everything its callers use
    (the service, prediction, onboarding's fit, training)."""

    def __len__(self) -> int: ...

    def estimate(self, embeddings: npt.NDArray[np.float32], *, k: int | None = None,
                 temperature: float | None = None) -> Estimate:
        """embeddings: float32 (n, d), unit rows; k and temperature override the store's own."""
        ...

    def estimate_many(self, embeddings: npt.NDArray[np.float32], scales: Sequence[tuple[float, float]], *,
                      recorded: bool = False) -> list[Estimate]:
        """One Estimate per neighbourhood (k, temperature) (0: the store's own), one search; with
        ``recorded``, ``recorded``'s Estimate last, from the same search."""
        ...

    def recorded(self, embeddings: npt.NDArray[np.float32]) -> Estimate:
        """The scores stored for these very prompts (duplicates of stored ones), NaN elsewhere."""
        ...

    def add(self, embeddings: npt.NDArray[np.float32], records: Sequence[dict[str, Any]]) -> list[str]:
        """Durably append outcomes (one record per row: prompt, scores, optional cost); returns
        their ids once they are durable."""
        ...

    def insert(self, embeddings: npt.NDArray[np.float32], records: Sequence[OutcomeRecord]) -> None:
        """Make outcomes visible to estimates without logging them (another log owns their
        durability: onboarded backends' aptitude results)."""
        ...

    def retract(self, ids: Sequence[str], backend: str) -> int:
        """Withdraw ``backend``'s scores on the records ``ids``; returns how many were withdrawn."""
        ...

    def retract_feedback(self, key: str, since: float | None = None) -> int:
        """Withdraw, durably, the feedback API key ``key`` sent at or after ``since`` (unix time);
        returns how many records were withdrawn."""
        ...

    def follow(self, encoder: Any) -> int:
        """Apply what other replicas appended since the last call; returns how many entries."""
        ...

    def stats(self) -> dict[str, BackendStats]: ...

    def close(self) -> None: ...


class DatastoreKind(Protocol):
    """A datastore implementation as the registry holds it: ``open`` loads (or builds) a store
    in a state folder from outcome files, or from already-embedded ``base`` outcomes."""

    def open(self, state_dir: str | Path, encoder: Any, outcome_files: Sequence[str | Path], *, k: int = ...,
             prior_strength: float = ..., temperature: float = ..., encoder_settings: str = ...,
             progress: bool = ...,
             base: tuple[npt.NDArray[np.float32], Sequence[OutcomeRecord], str] | None = ...,
             feedback_log: Any = ..., ann: Any = ...) -> Datastore: ...


DATASTORES: Registry[DatastoreKind] = Registry("datastore")
