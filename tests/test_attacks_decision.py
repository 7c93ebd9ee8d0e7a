"""Three-way verdicts at a false-positive budget (audit/attacks/decision.py): split-conformal thresholds fitted on
validation keep the FPR on unseen non-members within the budget, heads at chance decide almost nothing, and a
budget the validation split cannot resolve gives no verdict on that side and says so."""

import json

import numpy as np
import pytest

from attacks_data import planted_batch, store_manifest
from audit.attacks import TrainConfig, load_heads, train_heads
from audit.attacks.decision import conformal_thresholds, fit_decision, rows_needed, validation_record
from audit.errors import ArtifactError, UsageError


def _entry(nonmembers, members, threshold=0.5):
    return {"validation_probabilities": {"members": sorted(map(float, members)),
                                         "nonmembers": sorted(map(float, nonmembers))}, "threshold": threshold}


def test_the_member_rule_is_the_conformal_p_value_at_most_the_budget():
    rng = np.random.default_rng(0)
    neg, pos = rng.random(40), rng.random(30)
    d = fit_decision(_entry(neg, pos), "IV", max_fpr=0.1)
    assert d.nonmember_threshold < d.member_threshold  # one distribution for both classes: the regions are apart
    for q in np.r_[rng.random(500), neg, pos]:  # validation values themselves: ties count as at least as large
        p_fpr = (1 + (neg >= q).sum()) / (len(neg) + 1)
        p_miss = (1 + (pos <= q).sum()) / (len(pos) + 1)
        assert (d.decide(q) == "member") == (p_fpr <= 0.1), q
        assert (d.decide(q) == "non-member") == (p_miss <= 0.1), q
    assert d.validation_fpr == pytest.approx((neg >= d.member_threshold).mean()) and d.validation_fpr <= 0.1
    assert d.validation_miss == pytest.approx((pos < d.nonmember_threshold).mean()) and d.validation_miss <= 0.1
    assert list(d.decide_all([q for q in neg])) == [d.decide(q) for q in neg]


def test_fpr_on_unseen_exchangeable_nonmembers_is_at_most_the_budget_over_many_draws():
    """The guarantee is marginal over the validation draw: averaged over draws the FPR is (k + 1) / (n + 1)."""
    rng = np.random.default_rng(1)
    n, reps, budget = 30, 4000, 0.1
    calls = 0
    for _ in range(reps):
        neg = rng.normal(size=n)
        member_t, _ = conformal_thresholds(neg, rng.normal(2, 1, size=n), budget)
        calls += rng.normal() >= member_t
    k = int(np.floor(budget * (n + 1))) - 1
    assert calls / reps == pytest.approx((k + 1) / (n + 1), abs=3 * np.sqrt(budget * (1 - budget) / reps))
    assert calls / reps <= budget + 3 * np.sqrt(budget * (1 - budget) / reps)


def test_an_unresolvable_budget_gives_no_verdict_on_that_side_and_says_so():
    rng = np.random.default_rng(2)
    d = fit_decision(_entry(rng.random(50), rng.random(50) + 0.5), "IV", max_fpr=0.01)
    assert d.member_threshold is None and d.nonmember_threshold is None
    assert not d.member_resolvable and not d.nonmember_resolvable
    assert set(d.decide_all(np.linspace(0, 1.5, 200))) == {"inconclusive"}
    assert "max-fpr 0.01 needs >= 99 validation non-members; these heads have 50" in d.notes[0]
    assert "needs >= 99 validation members" in d.notes[1]
    assert d.to_dict()["fpr_resolution"] == 0.02 and d.to_dict()["member_resolvable"] is False
    # The boundary: 99 non-members resolve 1%, 98 do not; a separate miss budget is checked on its own.
    assert rows_needed(0.01) == 99 and rows_needed(0.05) == 19
    assert fit_decision(_entry(rng.random(99), rng.random(10)), "IV", max_fpr=0.01).member_resolvable
    d = fit_decision(_entry(rng.random(98), rng.random(10)), "IV", max_fpr=0.01, max_miss=0.2)
    assert not d.member_resolvable and d.nonmember_resolvable and len(d.notes) == 1


def test_well_separated_classes_are_cut_at_one_threshold_and_balanced_is_two_way():
    neg, pos = np.linspace(0.0, 0.3, 40), np.linspace(0.7, 1.0, 40)
    d = fit_decision(_entry(neg, pos), "IV", max_fpr=0.05)
    # The member region starts above the 2nd-largest non-member, the non-member region ends at the 2nd-smallest
    # member: they overlap, so the rule cuts at the middle and every row is decided; both bounds still hold.
    assert d.member_threshold == d.nonmember_threshold and 0.3 < d.member_threshold < 0.7
    assert "inconclusive" not in set(d.decide_all(np.linspace(0, 1, 101)))
    b = fit_decision(_entry(neg, pos, threshold=0.42), "IV", rule="balanced")
    assert (b.member_threshold, b.nonmember_threshold, b.max_fpr) == (0.42, 0.42, None)
    assert [b.decide(x) for x in (0.41, 0.42, 0.9)] == ["non-member", "member", "member"]
    with pytest.raises(UsageError, match="--max-fpr must be in"):
        fit_decision(_entry(neg, pos), "IV", max_fpr=1.5)


def test_heads_of_an_older_audit_are_refused_with_one_clear_line(tmp_path):
    batch = planted_batch(12, 12, seed=3)
    cfg = TrainConfig(attacks=("II-S",), epochs=3, patience=2, n_boot=10)
    train_heads(batch, tmp_path / "h", cfg, store_manifest(24), "f" * 64, "p.h5")
    info = json.loads((tmp_path / "h" / "heads.json").read_text())
    for entry in info["attacks"].values():
        del entry["validation_probabilities"]
    (tmp_path / "h" / "heads.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match=r"older audit .* retrain them: `audit train STORE.h5 --out") as exc:
        load_heads(tmp_path / "h")
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------------------ trained heads on planted data

STRENGTH = 0.8  # classes overlap (test AUC about 0.85), so the thresholds sit inside the non-member scores


def _fresh(n, seed, signal=True):
    """Rows never seen in training, from the same planted distribution (both classes)."""
    return planted_batch(n, n, seed=seed, signal=signal, strength=STRENGTH)


def _train(batch, out):
    cfg = TrainConfig(attacks=("II-S",), epochs=40, patience=10, n_boot=50, threads=1)
    return train_heads(batch, out, cfg, store_manifest(len(batch["ids"])), "f" * 64, "planted.h5")


@pytest.fixture(scope="module")
def planted_heads(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    info = _train(planted_batch(200, 800, seed=10, strength=STRENGTH), out)
    return load_heads(out), info


def test_heads_record_each_class_validation_probabilities(planted_heads):
    heads, info = planted_heads
    val = info["attacks"]["II-S"]["validation_probabilities"]
    counts = info["split"]["counts"]["validation"]
    assert len(val["members"]) == counts["members"] and len(val["nonmembers"]) == counts["nonmembers"] == 200
    assert val["members"] == sorted(val["members"])
    # They are the exported heads' own probabilities of the validation rows.
    full = planted_batch(200, 800, seed=10, strength=STRENGTH)
    rows = np.isin(full["ids"], info["split"]["validation"])
    batch = {k: v[rows] for k, v in full.items()}
    again = validation_record(heads.predict(batch, ["II-S"])["II-S"]["probability"], batch["member"])
    for cls in ("members", "nonmembers"):
        np.testing.assert_allclose(again[cls], val[cls], atol=1e-6)


@pytest.mark.parametrize("budget", [0.05, 0.1])
def test_planted_heads_keep_the_fpr_on_unseen_nonmembers_within_the_budget(planted_heads, budget):
    heads, _ = planted_heads
    fresh = _fresh(3000, seed=11)
    d = heads.decision("II-S", max_fpr=budget)
    v = d.decide_all(heads.predict(fresh, ["II-S"])["II-S"]["probability"])
    y = fresh["member"]
    fpr = (v[y == 0] == "member").mean()
    # For one validation split the FPR is about Beta(k + 1, n - k) around the budget (n = 200): within 3 sd of it,
    # and not far below it either (a conservative rule would waste the budget).
    sd = np.sqrt(budget * (1 - budget) / 200)
    assert d.nonmember_threshold < d.member_threshold  # the conformal thresholds themselves, not a midpoint cut
    assert budget - 3 * sd <= fpr <= budget + 3 * sd, (fpr, d.describe())
    assert (v[y == 1] == "member").mean() > 0.25  # the planted signal is found at this budget
    # The miss budget holds for members the same way (50 validation members).
    assert (v[y == 1] == "non-member").mean() <= budget + 3 * np.sqrt(budget * (1 - budget) / 50)


def test_heads_at_chance_decide_about_twice_the_budget_of_rows(tmp_path):
    heads_dir = tmp_path / "chance"
    _train(planted_batch(200, 200, seed=12, signal=False), heads_dir)  # labels independent of every feature
    heads = load_heads(heads_dir)
    fresh = _fresh(2000, seed=13, signal=False)
    p = heads.predict(fresh, ["II-S"])["II-S"]["probability"]
    for budget in (0.05, 0.1):
        v = heads.decision("II-S", max_fpr=budget).decide_all(p)
        decided = (v != "inconclusive").mean()
        # Labels carry no information: each side fires on about `budget` of all rows, so about 2 * budget decide.
        # The spread is that of one validation split of 50 rows per class.
        assert decided <= 2 * budget + 3 * np.sqrt(2 * budget * (1 - budget) / 50), (budget, decided)
        assert (v == "member").mean() <= budget + 3 * np.sqrt(budget * (1 - budget) / 50)
