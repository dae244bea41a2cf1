"""Routing data as arrays: prompts x backends, with true scores and per-request costs.

Any outcome file in the datastore schema loads; cost facts come, in this order, from a per-prompt
``cost`` object ({backend: cost}, as RouterBench has), from ``meta.price_per_M_tokens`` (a per-model
price; with no token counts in the data every request is taken as the same length, so cost is
proportional to price), or from a costs mapping (``--costs FILE``: backend -> cost per request).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from datastore.records import OutcomeRecord, read_outcomes
from router.core.errors import InvalidArgument
from router.core.files import sha256_file


@dataclass
class RoutingData:
    """n prompts x B backends. Y: float32 (n, B) scores, NaN where a backend was not run;
    C: float32 (n, B) cost per request, NaN where unknown."""

    prompts: list[str]
    ids: list[str]
    categories: list[str]
    splits: list[str]
    backends: list[str]
    Y: npt.NDArray[np.float32]
    C: npt.NDArray[np.float32]
    source_hash: str = ""
    records: list[OutcomeRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: npt.NDArray[np.int64] | Sequence[int]) -> RoutingData:
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return RoutingData(pick(self.prompts), pick(self.ids), pick(self.categories), pick(self.splits),
                           list(self.backends), self.Y[idx], self.C[idx], self.source_hash,
                           pick(self.records) if self.records else [])

    def complete_rows(self) -> npt.NDArray[np.bool_]:
        """Rows where every backend has a score and a cost."""
        return np.asarray(~np.isnan(self.Y).any(1) & ~np.isnan(self.C).any(1))

    def restrict_backends(self, names: Sequence[str]) -> RoutingData:
        cols = [self.backends.index(b) for b in names]
        return RoutingData(self.prompts, self.ids, self.categories, self.splits, list(names), self.Y[:, cols],
                           self.C[:, cols], self.source_hash, self.records)


def load_routing_data(path: str | Path, costs: Mapping[str, float] | None = None, *,
                      clipped: list[str] | None = None) -> RoutingData:
    """Read an outcome file; raise InvalidArgument when a backend has no cost facts at all.
    ``clipped``: clip scores outside [0, 1], noting each there (None: refuse them)."""
    p = Path(path)
    records: list[OutcomeRecord] = []
    prices: list[dict[str, float]] = []
    raw_meta = _read_price_meta(p)
    for i, r in enumerate(read_outcomes(p, clipped=clipped)):
        records.append(r)
        prices.append(raw_meta[i] if raw_meta else {})
    backends = sorted({b for r in records for b in r.scores})
    col = {b: j for j, b in enumerate(backends)}
    n, B = len(records), len(backends)
    Y = np.full((n, B), np.nan, dtype=np.float32)
    C = np.full((n, B), np.nan, dtype=np.float32)
    for i, r in enumerate(records):
        for b, s in r.scores.items():
            Y[i, col[b]] = s
        for b, c in r.cost.items():
            if b in col:
                C[i, col[b]] = c
        for b, c in prices[i].items():
            if b in col and np.isnan(C[i, col[b]]):
                C[i, col[b]] = c
    if costs:
        unknown = sorted(set(costs) - set(backends))
        if unknown:
            raise InvalidArgument(f"costs name backend(s) not in the data: {', '.join(unknown)}")
        for b, c in costs.items():
            C[:, col[b]] = np.where(np.isnan(C[:, col[b]]), c, C[:, col[b]])
    missing = [b for b in backends if np.isnan(C[:, col[b]]).all()]
    if missing:
        raise InvalidArgument(f"no cost facts for backend(s) {', '.join(missing)}: the data has no per-prompt "
                              "'cost' or 'meta.price_per_M_tokens' for them; pass --costs FILE "
                              "(JSON: backend -> cost per request)")
    return RoutingData([r.prompt for r in records], [r.id for r in records], [r.category for r in records],
                       [r.split for r in records], backends, Y, C, sha256_file(p), records)


def _read_price_meta(p: Path) -> list[dict[str, float]]:
    """meta.price_per_M_tokens per line (the record parser ignores meta)."""
    import gzip

    opener = gzip.open if p.suffix == ".gz" else open
    out: list[dict[str, float]] = []
    with opener(p, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            meta = json.loads(line).get("meta") or {}
            price = meta.get("price_per_M_tokens") if isinstance(meta, dict) else None
            out.append({k: float(v) for k, v in price.items()} if isinstance(price, dict) else {})
    return out


def split_indices(data: RoutingData, *, seed: int = 0, test_share: float = 0.2,
                  val_share: float = 0.1) -> tuple[npt.NDArray, npt.NDArray, npt.NDArray]:
    """(train, val, test) indices: the data's own ``split`` where it has one (val carved from
    train), else a seeded shuffle."""
    rng = np.random.default_rng(seed)
    n = len(data)
    given = np.array([s == "test" for s in data.splits])
    if given.any() and not given.all():
        test = np.where(given)[0]
        rest = rng.permutation(np.where(~given)[0])
    else:
        perm = rng.permutation(n)
        k = int(round(test_share * n))
        test, rest = np.sort(perm[:k]), perm[k:]
    nv = int(round(val_share * len(rest)))
    return np.sort(rest[nv:]), np.sort(rest[:nv]), np.sort(test)
