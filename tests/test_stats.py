"""The Student-t tail and the acceptance test, against closed forms and published values."""
from __future__ import annotations

import json
import math
import random

import pytest

from tests.fake_runs import fake_run
from pgolf import stats
from pgolf.runs import RunError

A = [2.010, 2.012, 2.011]
B = [2.020, 2.019, 2.021]


@pytest.mark.parametrize("t", [-7.5, -1.0, 0.0, 0.3, 1.0, 2.5, 40.0])
def test_t_sf_matches_closed_forms(t):
    assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12, abs=1e-15)  # Cauchy
    assert stats.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("t, df, expected", [
    (2.763769458112696, 10, 0.01),  # the 99th percentile of t(10) (tables: 2.764)
    (2.5705818356363155, 5, 0.025),  # the 97.5th percentile of t(5) (tables: 2.571)
    (1.0, 3.7, 0.18907069988022623),  # the rest: scipy.stats.t.sf, non-integer df as Welch gives
    (4.2, 2.3, 0.020390170110474656),
    (0.3, 7.5, 0.38616132928438907),
    (10.0, 4.0, 0.0002810018113579955),
    (-1.5, 6.2, 0.908644020150148),
    (25.0, 3.0, 7.016569497877428e-05),
])
def test_t_sf_known_values(t, df, expected):
    assert stats.t_sf(t, df) == pytest.approx(expected, rel=1e-9)


def test_betainc_identities_and_known_values():
    for x in (0.01, 0.3, 0.77, 0.999):
        assert stats.betainc(1, 1, x) == pytest.approx(x, rel=1e-13)
        assert stats.betainc(3.5, 1, x) == pytest.approx(x ** 3.5, rel=1e-12)
        assert stats.betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
    assert stats.betainc(4.2, 4.2, 0.5) == pytest.approx(0.5, rel=1e-13)
    assert stats.betainc(0.5, 0.5, 0.3) == pytest.approx(0.36901011956554536, rel=1e-12)  # = 2/pi asin(sqrt(.3))
    assert stats.betainc(10, 0.5, 0.9) == pytest.approx(0.15164090963470994, rel=1e-11)
    assert stats.betainc(2, 3, 0.0) == 0.0 and stats.betainc(2, 3, 1.0) == 1.0
    with pytest.raises(ValueError, match="x in \\[0, 1\\]"):
        stats.betainc(2, 3, 1.5)


def test_t_sf_agrees_with_scipy_over_a_wide_grid():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(2000):
        df = math.exp(rng.uniform(math.log(0.3), math.log(500)))
        t = rng.uniform(-40, 40) if rng.random() < 0.5 else rng.uniform(-3, 3)
        assert stats.t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_welch_and_one_sample_known_values():
    r = stats.welch_improvement(A, B, 0.005)  # scipy ttest_ind(B, A + 0.005, equal_var=False, alternative="greater")
    assert (r.t, r.df, r.p) == pytest.approx((4.898979485566356, 4.0, 0.0040249465504188595), rel=1e-9)
    assert r.gain == pytest.approx(0.009) and r.significant()
    r = stats.welch_improvement([2.0101, 2.0133, 2.0097, 2.0125], [2.0188, 2.0201, 2.0230], 0.005)
    assert (r.t, r.df, r.p) == pytest.approx((2.7766611309858558, 3.88135969764793, 0.025853284173560385), rel=1e-9)
    assert not r.significant()
    r = stats.improvement_over_value(A, 2.020, 0.005)  # scipy ttest_1samp(A + 0.005, 2.020, alternative="less")
    assert (r.t, r.df, r.p) == pytest.approx((6.92820323027474, 2.0, 0.010102051443366556), rel=1e-9)
    assert not r.significant()  # p = 0.0101: just misses 0.01


def test_degenerate_inputs():
    assert stats.welch_improvement([1.0, 1.0], [2.0, 2.0], 0.005).p == 0.0  # no spread, gain 1 > 0.005
    assert stats.welch_improvement([1.0, 1.0], [1.001, 1.001], 0.005).p == 1.0
    with pytest.raises(ValueError, match="at least 2 runs per group"):
        stats.welch_improvement([1.0], [2.0, 2.1], 0.005)
    assert stats.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))


def test_significance_command_verdicts(tmp_path, capsys):
    a = [fake_run(tmp_path, f"a{i}", seed=i, val_loss=v) for i, v in enumerate(A)]
    b = [fake_run(tmp_path, f"b{i}", seed=i, val_loss=v, matrix_lr=0.03) for i, v in enumerate(B)]
    assert stats.significance_command([*map(str, a), "--vs", *map(str, b)]) == 0
    out = capsys.readouterr().out
    assert "improvement mean(B) - mean(A): +0.00900 nats (required: > 0.005)" in out
    assert "Welch t = 4.899, df = 4.00, one-sided p = 0.00402" in out and "verdict: SIGNIFICANT" in out
    assert stats.significance_command([*map(str, a), "--vs-value", "2.020"]) == 1
    assert "one-sided p = 0.0101" in capsys.readouterr().out
    assert stats.significance_command([*map(str, a), "--vs", *map(str, b), "--min-gain-nats", "0.009"]) == 1


def test_significance_refuses_bad_groups(tmp_path):
    a = [fake_run(tmp_path, f"a{i}", seed=i, val_loss=v) for i, v in enumerate(A)]
    odd = fake_run(tmp_path, "odd", seed=9, num_layers=3)
    with pytest.raises(RunError, match=rf"group A mixes configurations: {a[0]} and {odd} differ in num_layers: 2 vs 3"):
        stats.significance_command([str(a[0]), str(a[1]), str(odd), "--vs-value", "2.1"])
    with pytest.raises(ValueError, match=rf"at least 2 runs of the candidate, got 1 \({a[0]}\)"):
        stats.significance_command([str(a[0]), "--vs-value", "2.1"])
    with pytest.raises(ValueError, match="at least 2 reference runs, got 1"):
        stats.significance_command([str(a[0]), str(a[1]), "--vs", str(a[2])])
    running = fake_run(tmp_path, "running", seed=7, finished=False)
    with pytest.raises(RunError, match=rf"{running}: metrics.jsonl has no \"final\" event"):
        stats.significance_command([str(a[0]), str(running), "--vs-value", "2.1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=rf"{tmp_path / 'empty'}: no metrics.jsonl"):
        stats.significance_command([str(a[0]), str(tmp_path / "empty"), "--vs-value", "2.1"])
    with (a[2] / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(RunError, match=r"metrics.jsonl:\d+: not a JSON line"):
        stats.significance_command([str(a[0]), str(a[2]), "--vs-value", "2.1"])
    assert json.loads((a[0] / "config.json").read_text())["seed"] == 0  # inputs untouched
