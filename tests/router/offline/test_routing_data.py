import json

import numpy as np
import pytest

from router.core.errors import InvalidArgument
from router.offline.routing_data import load_routing_data, split_indices


def _write(p, rows):
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_cost_facts_in_order_of_precedence(tmp_path):
    p = _write(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "x", "scores": {"m": 1, "n": 0}, "cost": {"m": 0.5},
         "meta": {"price_per_M_tokens": {"m": 9.0, "n": 2.0}}},
        {"id": "b", "prompt": "y", "scores": {"m": 0, "n": 1}, "meta": {"price_per_M_tokens": {"m": 9.0, "n": 2.0}}},
    ])
    d = load_routing_data(p)
    assert d.backends == ["m", "n"]
    np.testing.assert_allclose(d.C, [[0.5, 2.0], [9.0, 2.0]])   # per-prompt cost beats the price
    np.testing.assert_allclose(d.Y, [[1, 0], [0, 1]])


def test_costs_file_fills_and_missing_costs_are_refused(tmp_path):
    p = _write(tmp_path / "d.jsonl", [{"prompt": "x", "scores": {"m": 1, "n": 0}},
                                      {"prompt": "y", "scores": {"m": 1}}])
    with pytest.raises(InvalidArgument, match="pass --costs"):
        load_routing_data(p)
    d = load_routing_data(p, {"m": 1.0, "n": 3.0})
    assert np.isnan(d.Y[1, 1]) and d.C[1, 1] == 3.0
    assert d.complete_rows().tolist() == [True, False]
    with pytest.raises(InvalidArgument, match="not in the data"):
        load_routing_data(p, {"m": 1.0, "n": 3.0, "zz": 1.0})


def test_split_uses_the_given_split_or_a_seeded_shuffle(tmp_path):
    rows = [{"prompt": f"p{i}", "scores": {"m": 1}, "split": "test" if i < 10 else "train"} for i in range(100)]
    d = load_routing_data(_write(tmp_path / "d.jsonl", rows), {"m": 1.0})
    tr, va, te = split_indices(d, seed=0)
    assert te.tolist() == list(range(10)) and len(va) == 9 and len(tr) == 81
    assert not set(tr) & set(va)
    rows = [{"prompt": f"p{i}", "scores": {"m": 1}} for i in range(100)]
    d = load_routing_data(_write(tmp_path / "e.jsonl", rows), {"m": 1.0})
    a, b = split_indices(d, seed=3), split_indices(d, seed=3)
    assert all((x == y).all() for x, y in zip(a, b)) and len(a[2]) == 20
    assert sorted(np.concatenate(a).tolist()) == list(range(100))


def test_reads_the_shared_llmrouter_prices(shared_data):
    d = load_routing_data(shared_data / "llmrouter.jsonl.gz")
    assert len(d.backends) == 9 and not np.isnan(d.C).any()
    assert (d.splits.count("test"), d.splits.count("train")) == (500, 5608)


def test_a_score_outside_the_unit_interval_is_refused_with_the_way_out_or_clipped_when_asked(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a", "scores": {"x": 1.5, "y": 0.2}, "cost": {"x": 1, "y": 1}},
        {"prompt": "b", "scores": {"x": 0.5, "y": -0.25}, "cost": {"x": 1, "y": 1}}]) + "\n")
    with pytest.raises(InvalidArgument, match=r"o.jsonl:1: scores\['x'\] = 1.5 is outside \[0, 1\].*--clip-scores"):
        load_routing_data(p)
    clipped: list[str] = []
    data = load_routing_data(p, clipped=clipped)
    assert data.Y.tolist() == [[1.0, pytest.approx(0.2)], [0.5, 0.0]]
    assert clipped == ["o.jsonl:1: scores['x'] = 1.5", "o.jsonl:2: scores['y'] = -0.25"]
