import math

import pytest

from router.core.errors import InvalidArgument, NoEligibleBackend, UnknownBackend
from router.policy.selection import Knobs, KnobsInput, select

NAMES = ["big", "mid", "small"]
Q = [0.9, 0.7, 0.4]
C = [10.0, 3.0, 1.0]


def test_lambda_zero_picks_best_quality():
    s = select(NAMES, Q, C, Knobs(cost_weight=0.0))
    assert [x.backend for x in s.ranked] == ["big", "mid", "small"]
    assert s.chosen.rank == 1 and s.ranked[-1].rank == 3


def test_utility_is_quality_minus_lambda_cost():
    s = select(NAMES, Q, C, Knobs(cost_weight=0.05))
    # big: 0.9-0.5=0.4, mid: 0.7-0.15=0.55, small: 0.4-0.05=0.35
    assert [x.backend for x in s.ranked] == ["mid", "big", "small"]
    assert math.isclose(s.chosen.utility, 0.55)


def test_large_lambda_picks_cheapest():
    assert select(NAMES, Q, C, Knobs(cost_weight=10)).chosen.backend == "small"


def test_ties_prefer_cheaper():
    s = select(["a", "b"], [0.5, 0.5], [2.0, 1.0], Knobs())
    assert s.chosen.backend == "b"


@pytest.mark.parametrize("knobs,eligible,reason_part", [
    (Knobs(min_quality=0.5), ["big", "mid"], "min_quality"),
    (Knobs(max_cost=5.0), ["mid", "small"], "max_cost"),
    (Knobs(allowed=frozenset({"small"})), ["small"], "allowed_backends"),
    (Knobs(denied=frozenset({"big"})), ["mid", "small"], "denied_backends"),
])
def test_constraints(knobs, eligible, reason_part):
    s = select(NAMES, Q, C, knobs)
    assert sorted(x.backend for x in s.ranked) == sorted(eligible)
    assert s.excluded and all(reason_part in e.reason for e in s.excluded)


def test_unavailable_backends_are_excluded_with_reason():
    s = select(NAMES, Q, C, Knobs(), unavailable={"big": "failed to load"})
    assert s.chosen.backend == "mid"
    assert s.excluded[0].backend == "big" and "failed to load" in s.excluded[0].reason


def test_no_eligible_backend_explains_every_exclusion():
    with pytest.raises(NoEligibleBackend) as ei:
        select(NAMES, Q, C, Knobs(min_quality=0.95))
    msg = str(ei.value)
    assert all(n in msg for n in NAMES) and "min_quality" in msg


@pytest.mark.parametrize("inp,err,part", [
    (KnobsInput(cost_weight=-1), InvalidArgument, "cost_weight must be >= 0"),
    (KnobsInput(cost_weight=float("nan")), InvalidArgument, "finite"),
    (KnobsInput(min_quality=1.5), InvalidArgument, "min_quality must be in [0, 1]"),
    (KnobsInput(min_quality=-0.1), InvalidArgument, "min_quality must be in [0, 1]"),
    (KnobsInput(max_cost=-2), InvalidArgument, "max_cost must be >= 0"),
    (KnobsInput(allowed=("nope",)), UnknownBackend, "allowed_backends names unknown backend"),
    (KnobsInput(denied=("ghost",)), UnknownBackend, "denied_backends names unknown backend"),
])
def test_knob_validation(inp, err, part):
    with pytest.raises(err) as ei:
        inp.resolve(Knobs(), NAMES)
    assert part in str(ei.value)


def test_knob_defaults_fill_unset_fields():
    k = KnobsInput(min_quality=0.3).resolve(Knobs(cost_weight=0.2, max_cost=7.0), NAMES)
    assert (k.cost_weight, k.min_quality, k.max_cost) == (0.2, 0.3, 7.0)
