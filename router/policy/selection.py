"""The selection policy: pure functions from predictions and knobs to a ranked decision.

    utility_b = quality_b - lambda * cost_b

over the backends that pass the caller's constraints (allow/deny lists, availability,
min_quality, max_cost). The chosen backend is the first of the ranking; the rest, in order, are
the fallbacks. No I/O, no grpc, no ray: everything here is unit-testable with plain numbers.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from router.core.errors import InvalidArgument, NoEligibleBackend, UnknownBackend


@dataclass(frozen=True)
class Knobs:
    cost_weight: float = 0.0
    min_quality: float = 0.0
    max_cost: float | None = None
    allowed: frozenset[str] = frozenset()
    denied: frozenset[str] = frozenset()
    budget: float | None = None          # average cost per request; replaces cost_weight when set
    budget_key: str = ""
    max_queue_ms: float | None = None    # skip a backend whose queue would hold the request longer


@dataclass(frozen=True)
class KnobsInput:
    """What a caller sent; None means "use the configured default"."""

    cost_weight: float | None = None
    min_quality: float | None = None
    max_cost: float | None = None
    allowed: Sequence[str] = ()
    denied: Sequence[str] = ()
    budget: float | None = None
    budget_key: str = ""
    max_queue_ms: float | None = None

    def resolve(self, defaults: Knobs, known: Sequence[str]) -> Knobs:
        """Validate against the configured backends and fill defaults; errors say what to fix."""
        def finite(name: str, v: float) -> None:
            if not math.isfinite(v):
                raise InvalidArgument(f"{name} must be a finite number, got {v}")

        lam = defaults.cost_weight if self.cost_weight is None else self.cost_weight
        finite("cost_weight", lam)
        if lam < 0:
            raise InvalidArgument(f"cost_weight must be >= 0 (quality given up per unit of cost), got {lam}")
        mq = defaults.min_quality if self.min_quality is None else self.min_quality
        finite("min_quality", mq)
        if not 0.0 <= mq <= 1.0:
            raise InvalidArgument(f"min_quality must be in [0, 1], got {mq}")
        mc = defaults.max_cost if self.max_cost is None else self.max_cost
        if mc is not None:
            finite("max_cost", mc)
            if mc < 0:
                raise InvalidArgument(f"max_cost must be >= 0, got {mc}")
        known_set = set(known)
        for what, names in (("allowed_backends", self.allowed), ("denied_backends", self.denied)):
            unknown = sorted(set(names) - known_set)
            if unknown:
                raise UnknownBackend(f"{what} names unknown backend(s) {', '.join(map(repr, unknown))}; "
                                     f"configured: {', '.join(known)}")
        if self.budget is not None:
            finite("budget_per_request", self.budget)
            if self.budget < 0:
                raise InvalidArgument(f"budget_per_request must be >= 0, got {self.budget}")
        if len(self.budget_key) > 256:
            raise InvalidArgument("budget_key is longer than 256 characters")
        mqm = defaults.max_queue_ms if self.max_queue_ms is None else self.max_queue_ms
        if mqm is not None:
            finite("max_queue_ms", mqm)
            if mqm < 0:
                raise InvalidArgument(f"max_queue_ms must be >= 0, got {mqm}")
        return Knobs(lam, mq, mc, frozenset(self.allowed), frozenset(self.denied), self.budget, self.budget_key,
                     mqm)


@dataclass(frozen=True)
class Scored:
    backend: str
    quality: float
    cost: float
    utility: float
    support: float
    rank: int = 0


@dataclass(frozen=True)
class Exclusion:
    backend: str
    reason: str


@dataclass(frozen=True)
class Selection:
    ranked: tuple[Scored, ...]
    excluded: tuple[Exclusion, ...] = field(default_factory=tuple)
    cost_weight: float = 0.0             # the lambda the ranking used

    @property
    def chosen(self) -> Scored:
        return self.ranked[0]


def select(backends: Sequence[str], quality: Sequence[float], cost: Sequence[float], knobs: Knobs, *,
           support: Sequence[float] | None = None, unavailable: Mapping[str, str] | None = None,
           ineligible: Mapping[str, str] | None = None) -> Selection:
    """Rank the eligible backends by utility (ties: cheaper first, then name).

    backends/quality/cost/support: aligned sequences of length B. unavailable: name -> reason.
    ineligible: name -> what the request needs that the backend lacks (router.policy.eligibility).
    Raises NoEligibleBackend, listing why each backend was excluded, when none is left.
    """
    unavailable = unavailable or {}
    ineligible = ineligible or {}
    support = support if support is not None else [0.0] * len(backends)
    kept: list[Scored] = []
    excluded: list[Exclusion] = []
    for b, q, c, s in zip(backends, quality, cost, support):
        if knobs.allowed and b not in knobs.allowed:
            excluded.append(Exclusion(b, "not in allowed_backends"))
        elif b in knobs.denied:
            excluded.append(Exclusion(b, "in denied_backends"))
        elif b in ineligible:
            excluded.append(Exclusion(b, f"ineligible: {ineligible[b]}"))
        elif b in unavailable:
            excluded.append(Exclusion(b, f"unavailable: {unavailable[b]}"))
        elif q < knobs.min_quality:
            excluded.append(Exclusion(b, f"predicted quality {q:.3f} < min_quality {knobs.min_quality:g}"))
        elif knobs.max_cost is not None and c > knobs.max_cost:
            excluded.append(Exclusion(b, f"predicted cost {c:.4g} > max_cost {knobs.max_cost:g}"))
        else:
            kept.append(Scored(b, float(q), float(c), float(q - knobs.cost_weight * c), float(s)))
    if not kept:
        why = "; ".join(f"{e.backend}: {e.reason}" for e in excluded) or "no backends are configured"
        raise NoEligibleBackend(f"no backend satisfies the request's constraints ({why}). "
                                "Relax min_quality / max_cost or the allow/deny lists.")
    kept.sort(key=lambda s: (-s.utility, s.cost, s.backend))
    ranked = tuple(Scored(s.backend, s.quality, s.cost, s.utility, s.support, i + 1) for i, s in enumerate(kept))
    return Selection(ranked, tuple(excluded), knobs.cost_weight)


def promote(selection: Selection, backend: str) -> Selection:
    """The same selection with ``backend`` (eligible) ranked first: a batch assignment may give a
    prompt its second-best backend at the batch's lambda to fit the budget exactly."""
    first = [s for s in selection.ranked if s.backend == backend]
    if not first:
        raise ValueError(f"{backend} is not among the eligible backends")
    rest = [s for s in selection.ranked if s.backend != backend]
    ranked = tuple(Scored(s.backend, s.quality, s.cost, s.utility, s.support, i + 1) for i, s in enumerate(first + rest))
    return Selection(ranked, selection.excluded, selection.cost_weight)
