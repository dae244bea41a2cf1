"""Metrics against cases computed by hand."""
import math

import numpy as np
import pytest

from router.offline import evaluation as M


def test_envelope_drops_dominated_and_non_concave_points():
    pts = [(1, 0.2), (2, 0.3), (3, 0.6), (4, 0.5), (5, 0.6)]
    # (2, 0.3) lies below the chord (1,0.2)-(3,0.6) (0.4 there); (4,.5) and (5,.6) are not better.
    np.testing.assert_allclose(M.envelope(pts), [[1, 0.2], [3, 0.6]])


def test_quality_at_and_cost_to_reach():
    pts = [(1, 0.2), (3, 0.6)]
    assert M.quality_at(pts, 0.5) == 0.0
    assert math.isclose(M.quality_at(pts, 2), 0.4)
    assert math.isclose(M.quality_at(pts, 10), 0.6)
    assert math.isclose(M.cost_to_reach(pts, 0.5), 2.5)
    assert M.cost_to_reach(pts, 0.1) == 1
    assert M.cost_to_reach(pts, 0.7) == math.inf


def test_aiq_by_hand():
    # Two single models (1, .2) and (3, .6): area of the trapezoid over [1, 3] = (0.2 + 0.6) / 2 * 2.
    assert math.isclose(M.aiq([(1, 0.2), (3, 0.6)], 1, 3), 0.4, rel_tol=1e-6)
    # A router point (2, 0.55) above the chord: areas (0.2+0.55)/2 + (0.55+0.6)/2 = 0.95 over width 2.
    assert math.isclose(M.aiq([(1, 0.2), (3, 0.6), (2, 0.55)], 1, 3), 0.475, rel_tol=1e-6)
    # Nothing reachable below cost 2: zero there; (0.5+0.5)/2 over [2, 3] -> 0.5 / 2.
    assert math.isclose(M.aiq([(2, 0.5)], 1, 3), 0.25, rel_tol=1e-3)


def test_sweep_points():
    Y = np.array([[1.0, 0.0], [0.0, 1.0]])
    C = np.array([[1.0, 3.0], [1.0, 3.0]])
    Q = np.array([[0.9, 0.1], [0.2, 0.8]])
    pts = M.sweep_points(Q, C, Y, C, [0.0, 10.0])
    assert pts == [(2.0, 1.0), (1.0, 0.5)]


def test_pgr_apgr_cpt_by_hand():
    # 4 prompts; strong beats weak on prompts 0 and 1 only.
    ys = np.array([1.0, 1.0, 1.0, 0.0])
    yw = np.array([0.0, 0.0, 1.0, 0.0])
    perfect = np.array([4.0, 3.0, 2.0, 1.0])
    share, pgr = M.pgr_curve(perfect, ys, yw)
    np.testing.assert_allclose(share, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(pgr, [0, 0.5, 1, 1, 1])
    # trapezoid: 0.25 * ((0+.5)/2 + (.5+1)/2 + 1 + 1) = 0.75
    assert math.isclose(M.apgr(perfect, ys, yw), 0.75)
    assert M.cpt(perfect, ys, yw, 0.5) == 0.25 and M.cpt(perfect, ys, yw, 0.8) == 0.5
    worst = -perfect
    assert math.isclose(M.apgr(worst, ys, yw), 0.25 * ((0 + 0) / 2 + 0 + (0 + 0.5) / 2 + (0.5 + 1) / 2))
    assert M.cpt(worst, ys, yw, 0.8) == 1.0


def test_random_router_apgr_is_about_half():
    rng = np.random.default_rng(0)
    ys = (rng.random(4000) < 0.8).astype(float)
    yw = (rng.random(4000) < 0.5).astype(float)
    assert abs(M.apgr(rng.random(4000), ys, yw) - 0.5) < 0.05


def test_per_backend_accuracy():
    assert M.per_backend_accuracy(np.array([[1, 0], [0, 0]]), ["a", "b"]) == {"a": 0.5, "b": 0.0}


def test_envelope_needs_points():
    with pytest.raises(ValueError):
        M.envelope([])


def test_equal_costs_reduce_aiq_to_the_best_quality_at_that_cost_and_report_accuracy():
    import numpy as np

    from router.offline.evaluation import aiq, evaluate, zero_router

    Y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)
    C = np.ones_like(Y)
    Qhat = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.4], [0.3, 0.6]], np.float32)
    m = evaluate(Qhat, C, Y, C)
    assert m["equal_costs"] == 1.0 and m["accuracy"] == 0.75 and m["oracle"] == 0.75 and m["best_single"] == 0.5
    assert m["aiq"] == 0.75
    assert zero_router(Y, C)["aiq"] == 0.5
    assert aiq([(1.0, 0.4), (1.0, 0.7)], 1.0, 1.0) == 0.7
