"""Young/Daly checkpoint cadence: formulas, optimality, and the waste it predicts."""
import math

import pytest

from mamba_slm.platform.cadence import daly_interval, job_mtbf_s, plan_cadence, young_interval


def test_young_and_daly_match_the_papers_formulas():
    assert young_interval(60, 3600 * 10) == pytest.approx(math.sqrt(2 * 60 * 36000))
    delta, m = 60.0, 36000.0
    r = delta / (2 * m)
    expected = math.sqrt(2 * delta * m) * (1 + math.sqrt(r) / 3 + r / 9) - delta
    assert daly_interval(delta, m) == pytest.approx(expected)
    assert daly_interval(100, 40) == 40  # delta >= 2M: checkpoint once per MTBF
    # For a small delta/M Daly converges to Young.
    assert daly_interval(1, 1e7) == pytest.approx(young_interval(1, 1e7), rel=1e-3)


def test_daly_interval_minimises_the_modelled_waste():
    delta, m, restart = 45.0, 8 * 3600.0, 300.0
    best = plan_cadence(delta, m, restart)
    for factor in (0.5, 0.8, 1.25, 2.0):
        other = plan_cadence(delta, m, restart, interval_s=best.interval_s * factor)
        assert other.waste_fraction > best.waste_fraction
    assert best.rework_fraction == pytest.approx((best.interval_s + delta) / 2 / m)
    assert best.checkpoint_fraction == pytest.approx(delta / best.interval_s)
    assert best.restart_fraction == pytest.approx(restart / m)
    assert best.wall_time_factor == pytest.approx(1 / (1 - best.waste_fraction))
    assert "checkpoint every" in best.describe()


def test_more_nodes_fail_more_often_and_waste_more():
    assert job_mtbf_s(0.05, 1) == pytest.approx(72000)
    assert job_mtbf_s(0.05, 4) == pytest.approx(18000)
    one = plan_cadence(30, job_mtbf_s(0.05, 1), 600)
    four = plan_cadence(30, job_mtbf_s(0.05, 4), 600)
    assert four.interval_s < one.interval_s and four.waste_fraction > one.waste_fraction


@pytest.mark.parametrize("kwargs,match", [
    (dict(checkpoint_write_s=0, mtbf_s=10), "checkpoint_write_s"),
    (dict(checkpoint_write_s=1, mtbf_s=-5), "mtbf_s"),
    (dict(checkpoint_write_s=1, mtbf_s=100, restart_s=-1), "restart_s"),
    (dict(checkpoint_write_s=50, mtbf_s=60, restart_s=100), "no progress"),
])
def test_bad_or_hopeless_inputs_raise_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_cadence(**kwargs)
