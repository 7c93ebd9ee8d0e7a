"""Metrics, bootstrap CIs and calibration (audit/attacks/metrics.py, calibration.py)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from audit.attacks import calibration, metrics


def _data(seed, n=60, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(size=n) + y
    if ties:
        s = np.round(s, 1)  # many tied scores, the case where shortcuts go wrong
    return y, s


@pytest.mark.parametrize("seed", range(5))
def test_fast_auc_equals_scikit_learn_with_ties(seed):
    y, s = _data(seed)
    assert metrics.fast_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr", [0.0, 0.001, 0.01, 0.1, 0.3])
def test_fast_tpr_at_fpr_equals_the_roc_curve_reading(seed, fpr):
    y, s = _data(seed)
    assert metrics.fast_tpr_at_fpr(y, s, fpr) == pytest.approx(metrics.tpr_at_fpr(y, s, fpr), abs=1e-12)


def test_tpr_at_fpr_is_a_step_not_an_interpolation():
    # 4 non-members: FPRs come in steps of 0.25. At 1% FPR only the threshold above every non-member counts.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.55, 0.3, 0.7, 0.5, 0.2, 0.1])
    assert metrics.tpr_at_fpr(y, s, 0.01) == 0.5  # the two members above 0.7
    assert metrics.tpr_at_fpr(y, s, 0.25) == 0.75  # one non-member allowed: 0.55 too
    assert metrics.tpr_at_fpr(y, s, 0.49) == 0.75  # 0.49 < 0.5: still one non-member, no credit for "half" of one


def test_attack_metrics_report_values_cis_and_resolution():
    y, s = _data(0, n=200, ties=False)
    p = 1 / (1 + np.exp(-s))
    m = metrics.attack_metrics(y, p, threshold=0.6, n_boot=200, seed=3)
    for k in ("accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
        lo, hi = m[k]["ci95"]
        assert lo <= m[k]["value"] <= hi
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert m["accuracy"]["value"] == pytest.approx(np.mean((p >= 0.6) == (y == 1)))
    assert m["n_test"] == 200 and m["n_members"] + m["n_nonmembers"] == 200
    assert m["fpr_resolution"] == pytest.approx(1 / m["n_nonmembers"])
    # Seeded: the same call gives the same intervals; another seed other ones.
    assert metrics.attack_metrics(y, p, 0.6, 200, 3) == m
    assert metrics.attack_metrics(y, p, 0.6, 200, 4)["auc"]["ci95"] != m["auc"]["ci95"]


def test_bootstrap_ci_narrows_with_more_data():
    y1, s1 = _data(1, n=40, ties=False)
    y2, s2 = _data(1, n=2000, ties=False)
    w1 = np.diff(metrics.bootstrap_ci(y1, s1, metrics.fast_auc, 300, 0))[0]
    w2 = np.diff(metrics.bootstrap_ci(y2, s2, metrics.fast_auc, 300, 0))[0]
    assert w2 < w1 / 3


def test_platt_recovers_the_logistic_law_that_made_the_labels():
    rng = np.random.default_rng(0)
    s = rng.normal(size=20000) * 3
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.7 * s - 0.4)))).astype(int)
    a, b = calibration.fit_platt(s, y)
    assert a == pytest.approx(0.7, abs=0.05) and b == pytest.approx(-0.4, abs=0.05)


def test_platt_stays_finite_on_perfectly_separated_validation_rows():
    s = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    y = np.array([0, 0, 0, 1, 1, 1])
    a, b = calibration.fit_platt(s, y)
    p = calibration.apply_platt(s, a, b)
    assert np.isfinite([a, b]).all() and a > 0
    # Smoothed targets: probabilities stay away from 0 and 1 with 3 rows per class.
    assert 0.1 < p.min() < 0.5 < p.max() < 0.9


def test_balanced_accuracy_threshold_sits_between_the_classes():
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    y = np.array([0, 0, 0, 1, 1, 1])
    t, ba = calibration.balanced_accuracy_threshold(p, y)
    assert ba == 1.0 and t == pytest.approx(0.45)


def test_balanced_accuracy_threshold_weights_classes_equally():
    # 2 members, 8 non-members: plain accuracy would call everything non-member.
    p = np.array([0.45, 0.5, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.47])
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    t, ba = calibration.balanced_accuracy_threshold(p, y)
    assert (p[y == 1] >= t).all() and ba > 0.9


def test_fpr_threshold_admits_at_most_the_allowed_false_positives():
    rng = np.random.default_rng(0)
    p = rng.random(300)
    y = (rng.random(300) < 0.5).astype(int)
    for f in (0.0, 0.01, 0.05, 0.2):
        r = calibration.fpr_threshold(p, y, f)
        assert r["fpr"] <= f + 1e-12
        assert r["fpr"] == np.mean(p[y == 0] >= r["threshold"])
        # The lowest such threshold: the next non-member down would exceed the budget.
        neg = np.sort(p[y == 0])[::-1]
        k = int(np.floor(f * len(neg)))
        assert r["threshold"] > neg[k] and (k == 0 or r["threshold"] <= neg[k - 1])
    assert calibration.fpr_threshold(p, y, 0.001)["resolution"] == pytest.approx(1 / (y == 0).sum())


def test_roc_plot_is_written(tmp_path):
    y, s = _data(2, ties=False)
    path = metrics.plot_roc({"II-S": (y, s), "blind": (y, np.zeros_like(s))}, tmp_path / "roc.png", "t")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
