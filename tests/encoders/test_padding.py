"""Length groups for padded encoder forwards: exact, complete, and no worse than one batch."""
from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from encoders.padding import length_groups


def _cost(lengths, groups, overhead):
    return sum(overhead + len(g) * max(lengths[i] for i in g) for g in groups)


@given(st.lists(st.integers(1, 512), min_size=0, max_size=40), st.floats(0, 200), st.integers(1, 64))
def test_every_prompt_once_within_the_batch_cap_and_never_worse_than_one_forward(lengths, overhead, cap):
    groups = length_groups(lengths, overhead_tokens=overhead, max_batch=cap)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= cap for g in groups)
    if lengths and len(lengths) <= cap:
        assert _cost(lengths, groups, overhead) <= _cost(lengths, [list(range(len(lengths)))], overhead) + 1e-9


@given(st.lists(st.integers(1, 300), min_size=1, max_size=7), st.floats(0, 100))
def test_optimal_against_every_contiguous_split_of_the_sorted_order(lengths, overhead):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        _cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], overhead)
        for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r))
    assert abs(_cost(lengths, length_groups(lengths, overhead_tokens=overhead), overhead) - best) < 1e-6


def test_a_long_prompt_gets_its_own_forward():
    lengths = [12, 15, 300, 14, 13, 16, 11, 12]
    groups = length_groups(lengths)
    assert [2] in groups and len(groups) == 2
