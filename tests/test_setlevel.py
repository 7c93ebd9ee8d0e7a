"""Set-level inference: p-values are valid under the null (also with a small null), the combinations equal
scipy's, power grows with k."""

import numpy as np
import pytest
from scipy import stats

from audit.attacks.setlevel import METHODS, combine, empirical_pvalues, power_curve, set_test
from audit.errors import InputError, UnknownNameError, UsageError


def test_empirical_pvalues_count_null_scores_at_least_as_large():
    null = np.array([0.1, 0.2, 0.3, 0.4])
    p = empirical_pvalues([0.05, 0.2, 0.35, 0.9], null)
    # (1 + #{null >= s}) / (1 + 4): ties count as at least as large; never zero.
    assert np.allclose(p, [5 / 5, 4 / 5, 2 / 5, 1 / 5])


@pytest.mark.parametrize("method", ["fisher", "stouffer"])
def test_combinations_equal_scipy(method):
    p = np.array([0.01, 0.2, 0.5, 0.03])
    stat, pv = combine(p, method)
    ref = stats.combine_pvalues(p, method=method)
    assert np.isclose(stat, ref.statistic) and np.isclose(pv, ref.pvalue)


def test_permutation_test_of_one_image_is_its_empirical_pvalue():
    # With k = 1 a draw from the pooled 1 + n scores is at least the image's score with probability
    # (1 + #{null >= s}) / (1 + n): the empirical p-value.
    rng = np.random.default_rng(0)
    null = rng.normal(size=200)
    for s in (-1.0, 0.5, 2.0):
        p = set_test([s], null, n_resamples=40_000, seed=1)["p_value"]
        assert abs(p - empirical_pvalues([s], null)[0]) < 0.01


def test_result_fields_and_determinism():
    rng = np.random.default_rng(1)
    null, scores = rng.normal(size=100), rng.normal(1.0, 1.0, size=7)
    r = set_test(scores, null, seed=3)
    assert set(r) == {"p_value", "k", "statistic", "method", "n_null", "verdict", "alpha", "min_p_value", "reason"}
    assert r["k"] == 7 and r["n_null"] == 100 and r["method"] == "permutation"
    assert np.isclose(r["statistic"], scores.mean())
    assert set_test(scores, null, seed=3) == r
    # Clearly member-like sets get small p-values, clearly non-member-like ones large.
    assert set_test(null.max() + np.ones(5), null)["p_value"] < 0.001
    assert set_test(null.min() - np.ones(5), null)["p_value"] > 0.99


@pytest.mark.parametrize("method", METHODS)
def test_false_positive_rate_is_at_most_alpha_on_nonmember_sets(method):
    # Non-member and member scores from one score distribution per class, as a head would give.
    rng = np.random.default_rng(2)
    nonmembers = rng.normal(size=600)
    members = rng.normal(0.8, 1.0, size=300)
    curve = power_curve(members, nonmembers, ks=(1, 5, 10, 20), alpha=0.05, n_sets=300, method=method,
                        n_resamples=400, seed=0)
    fpr = [r["fpr"] for r in curve]
    power = [r["power"] for r in curve]
    # Binomial noise on 300 sets: 0.05 + 3 sd is about 0.09.
    assert max(fpr) <= 0.09, fpr
    assert power[0] < power[1] < power[2] <= power[3] + 0.02, power
    assert power[3] > 0.9
    assert curve[0]["n_null"] == 300


def test_permutation_test_stays_valid_with_a_small_null():
    # 15 null scores and sets of 10: the permutation test accounts for the null being a small sample.
    rng = np.random.default_rng(4)
    curve = power_curve(rng.normal(1.0, 1.0, size=30), rng.normal(size=30), ks=(10,), alpha=0.05, n_sets=400,
                        n_resamples=200, seed=5)
    assert curve[0]["n_null"] == 15 and curve[0]["fpr"] <= 0.09 and curve[0]["power"] > 0.5


def test_sets_larger_than_a_pool_are_reported_not_drawn():
    rng = np.random.default_rng(3)
    curve = power_curve(rng.normal(size=4), rng.normal(size=30), ks=(2, 5, 20), n_sets=10, n_resamples=100)
    assert curve[0]["power"] is not None and curve[1]["power"] is None and curve[1]["fpr"] is not None
    assert curve[2]["fpr"] is None  # 15 non-members are left beside the null


@pytest.mark.parametrize("scores, null, err, words", [
    ([], np.zeros(20), InputError, "no scores"),
    ([0.5, np.nan], np.zeros(20), InputError, "NaN"),
    ([0.5], np.zeros(5), InputError, "at least 10"),
])
def test_bad_inputs_fail_clearly(scores, null, err, words):
    with pytest.raises(err, match=words):
        set_test(scores, null)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="permutation, fisher, stouffer"):
        set_test([0.1], np.zeros(20), method="max")


def test_set_verdicts_are_member_at_alpha_else_inconclusive_never_non_member():
    rng = np.random.default_rng(6)
    null = rng.normal(size=200)
    member_like = set_test(null.max() + np.ones(5), null, alpha=0.01)
    assert member_like["verdict"] == "member" and member_like["p_value"] <= 0.01 and member_like["alpha"] == 0.01
    nonmember_like = set_test(null.min() - np.ones(5), null, alpha=0.01)
    assert nonmember_like["verdict"] == "inconclusive" and "no non-member verdict" in nonmember_like["reason"]
    # Non-member sets are called members at most alpha of the time (the test's level), over many sets.
    calls = [set_test(rng.normal(size=5), null, n_resamples=200, seed=i, alpha=0.1)["verdict"] for i in range(300)]
    assert calls.count("member") / 300 <= 0.1 + 3 * np.sqrt(0.1 * 0.9 / 300)
    assert set(calls) <= {"member", "inconclusive"}


@pytest.mark.parametrize("method", METHODS)
def test_an_alpha_below_the_smallest_attainable_p_value_says_so(method):
    # One image against 10 null scores: the smallest p-value is 1/11, so alpha 0.05 cannot be reached.
    null = np.linspace(0, 1, 10)
    r = set_test([5.0], null, method=method, n_resamples=1000, alpha=0.05)
    assert r["verdict"] == "inconclusive" and r["min_p_value"] == pytest.approx(1 / 11, rel=1e-6)
    assert "below the smallest p-value this test can give" in r["reason"]
    assert set_test([5.0], null, method=method, n_resamples=1000, alpha=0.1)["verdict"] == "member"
    with pytest.raises(UsageError, match="alpha"):
        set_test([5.0], null, alpha=0)
