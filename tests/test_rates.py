"""Divergence rates with exact intervals and the tests between arms (mxprobe.app.rates), checked
against scipy and against values worked out by hand."""

import math

import pytest
from scipy.stats import beta

from mxprobe.app.rates import arm_tests, by_arm, rate, rates


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (8, 45), (1, 1)])
def test_interval_is_clopper_pearson(k, n):
    # The exact interval from the beta quantiles, independently of binomtest.
    low = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    r = rate("mx", k, n)
    assert r.low == pytest.approx(low, abs=1e-9) and r.high == pytest.approx(high, abs=1e-9)
    assert r.words().startswith(f"{k}/{n} (")


def test_no_finished_run_is_said_so():
    r = rate("mx", 0, 0, unfinished=2)
    assert math.isnan(r.rate) and r.words() == "0/0 (no finished run)"


def _rows(arm, outcomes):
    return [
        {"scheme": arm, "seed": str(s), "diverged": {True: "true", False: "false"}.get(d, "")}
        for s, d in enumerate(outcomes)
    ]


def test_paired_arms_get_mcnemar_on_discordant_seeds():
    # 7 seeds where mx diverges and the rule does not, none the other way, 3 alike.
    mx = _rows("mx", [True] * 7 + [False] * 3)
    rule = _rows("rule", [False] * 7 + [False] * 3)
    arms = by_arm(mx + rule, lambda r: r["scheme"])
    (row,) = arm_tests(arms)
    assert row["test"].startswith("exact McNemar")
    assert (row["n"], row["a_only"], row["b_only"]) == (10, 7, 0)
    assert row["p_value"] == pytest.approx(2 * 0.5**7, abs=1e-6)  # two-sided binomial
    assert [(r.arm, r.diverged, r.n) for r in rates(arms)] == [("mx", 7, 10), ("rule", 0, 10)]


def test_unpaired_arms_get_fisher_and_unfinished_runs_are_counted_apart():
    a = _rows("a", [True, True, False, None])
    b = [{**r, "seed": str(10 + i)} for i, r in enumerate(_rows("b", [False, False, False]))]
    arms = by_arm(a + b, lambda r: r["scheme"])
    (row,) = arm_tests(arms)
    assert row["test"].startswith("Fisher") and (row["a_diverged"], row["b_diverged"]) == (2, 0)
    # Fisher's two-sided p for [[2, 1], [0, 3]]: tables at least as extreme, by hand = 0.4.
    assert row["p_value"] == pytest.approx(0.4, abs=1e-6)
    assert rates(arms)[0].unfinished == 1 and rates(arms)[0].n == 3
