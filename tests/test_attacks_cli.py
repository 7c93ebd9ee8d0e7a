"""`audit train` and `audit evaluate` through typer's CliRunner, on a real feature store file."""

import json

import pytest
from typer.testing import CliRunner

from attacks_data import TARGET, planted_batch, write_store
from audit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(planted_batch(24, 24, seed=2), tmp_path_factory.mktemp("store") / "store.h5")


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """`audit train` once, into a temporary AUDIT_HOME (module scope: training is the slow part)."""
    home = tmp_path_factory.mktemp("home")
    heads = tmp_path_factory.mktemp("out") / "heads"
    mp = pytest.MonkeyPatch()
    mp.setenv("AUDIT_HOME", str(home))
    result = runner.invoke(app, ["train", str(store), "--out", str(heads), "--attacks", "II-S", "--epochs", "30",
                                 "--folds", "0", "--register"])
    mp.undo()
    return result, heads, home


def test_train_writes_heads_registers_them_and_prints_validation_table(trained):
    result, heads, home = trained
    assert result.exit_code == 0, result.output
    assert "II-S" in result.output and "blind" in result.output and "val AUC" in result.output
    assert "split (members/non-members): train 12/12, validation 6/6, test 6/6" in result.output
    assert f"registered at {home / 'heads' / ('planted-' + TARGET['hash'])}" in result.output
    info = json.loads((heads / "heads.json").read_text())
    assert set(info["attacks"]) == {"II-S", "blind"} and info["default_attack"] == "II-S"


def test_evaluate_writes_json_with_cis_and_a_roc_plot(trained, store, tmp_path):
    _, heads, _ = trained
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", str(store), "--heads", str(heads), "--json", str(out),
                                 "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["attacks"]) == {"II-S", "blind"}
    assert data["n_test"] == 12 and data["store"] == str(store) and data["heads"] == str(heads)
    for attack, m in data["attacks"].items():
        for key in ("accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr"):
            lo, hi = m[key]["ci95"]
            assert lo <= m[key]["value"] <= hi, (attack, key)
        assert m["n_test"] == 12 and m["fpr_resolution"] == pytest.approx(1 / 6)
    assert data["attacks"]["II-S"]["auc"]["value"] >= 0.8  # planted reconstruction signal
    png = tmp_path / "eval.png"
    assert data["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert "TPR@1%FPR" in result.output and "II-S" in result.output and f"written to {out}" in result.output


def test_evaluate_reports_the_verdicts_at_the_budget_with_cis(trained, store, tmp_path):
    """Each attack's `verdicts`: its rule fitted on validation, and on the test rows the fraction decided, FPR,
    precision and TPR with bootstrap CIs, equal to what the rule does to the heads' test predictions."""
    import numpy as np

    from audit.attacks import load_heads
    from audit.features import FeatureStore

    _, heads, _ = trained
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", str(store), "--heads", str(heads), "--json", str(out),
                                 "--bootstrap", "200", "--max-fpr", "0.3"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["decision"] == {"rule": "budget", "max_fpr": 0.3, "max_miss": 0.3}
    assert "verdicts at max-fpr 0.3" in result.output and "decided" in result.output
    h = load_heads(heads)
    batch = FeatureStore.open(store).read(ok_only=True)
    rows = [batch["ids"].tolist().index(i) for i in h.info["split"]["test"]]
    sub = {k: v[rows] for k, v in batch.items()}
    y = sub["member"]
    for attack, m in data["attacks"].items():
        v = m["verdicts"]
        assert v["rule"] == "budget" and v["n_validation_nonmembers"] == 6 and v["member_resolvable"]
        verdicts = h.decision(attack, max_fpr=0.3).decide_all(h.predict(sub, [attack])[attack]["probability"])
        expect = {"decided_fraction": (verdicts != "inconclusive").mean(),
                  "fpr": (verdicts[y == 0] == "member").mean(), "tpr": (verdicts[y == 1] == "member").mean()}
        for key, value in expect.items():
            assert v[key]["value"] == pytest.approx(value), (attack, key)
            lo, hi = v[key]["ci95"]
            assert lo <= v[key]["value"] <= hi, (attack, key)
        if (verdicts == "member").any():
            assert v["precision"]["value"] == pytest.approx((y[verdicts == "member"] == 1).mean())
        assert sum(v["counts"].values()) == 12 and v["counts"]["member"] == (verdicts == "member").sum()
    assert data["attacks"]["II-S"]["verdicts"]["tpr"]["value"] > 0  # the planted signal reaches member verdicts
    # The default 1% budget cannot be resolved with 6 validation non-members: nothing is decided, and it says so.
    unresolved = runner.invoke(app, ["evaluate", str(store), "--heads", str(heads), "--json", str(out),
                                     "--bootstrap", "50"])
    data = json.loads(out.read_text())
    assert "max-fpr 0.01 needs >= 99 validation non-members; these heads have 6" in unresolved.stderr
    assert data["attacks"]["II-S"]["verdicts"]["decided_fraction"]["value"] == 0
    assert data["attacks"]["II-S"]["verdicts"]["counts"]["inconclusive"] == 12
    # --decision balanced: the two-way rule decides every row, as the accuracy column always did.
    runner.invoke(app, ["evaluate", str(store), "--heads", str(heads), "--json", str(out), "--bootstrap", "50",
                        "--decision", "balanced"])
    m = json.loads(out.read_text())["attacks"]["II-S"]
    assert m["verdicts"]["decided_fraction"]["value"] == 1.0
    assert m["verdicts"]["tpr"]["value"] == pytest.approx(m["tpr_at_threshold"])
    assert m["verdicts"]["accuracy_among_decided"]["value"] == pytest.approx(m["accuracy"]["value"])
    bad = runner.invoke(app, ["evaluate", str(store), "--heads", str(heads), "--max-fpr", "0"])
    assert bad.exit_code == 2 and "--max-fpr must be in (0, 1)" in bad.output


def test_evaluate_without_heads_uses_the_registered_ones(trained, store, monkeypatch):
    _, heads, home = trained
    monkeypatch.setenv("AUDIT_HOME", str(home))
    result = runner.invoke(app, ["evaluate", str(store), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    assert "II-S" in result.output and "blind" in result.output


def test_evaluate_is_deterministic(trained, store, tmp_path):
    _, heads, _ = trained
    outs = []
    for name in ("a.json", "b.json"):
        runner.invoke(app, ["evaluate", str(store), "--heads", str(heads), "--json", str(tmp_path / name),
                            "--bootstrap", "100"])
        data = json.loads((tmp_path / name).read_text())
        outs.append((data["attacks"], data["n_test"]))
    assert outs[0] == outs[1]


def test_evaluate_refuses_a_store_of_another_target_naming_both(trained, tmp_path):
    _, heads, _ = trained
    other = write_store(planted_batch(6, 6, seed=3), tmp_path / "other.h5",
                        target={"name": "sd-1.5", "hash": "9999999999999999"})
    result = runner.invoke(app, ["evaluate", str(other), "--heads", str(heads)])
    assert result.exit_code == 1
    err = result.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "'planted'" in err[0] and "'sd-1.5'" in err[0]


def test_evaluate_with_nothing_registered_says_how_to_train(store, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "empty_home"))
    result = runner.invoke(app, ["evaluate", str(store)])
    assert result.exit_code == 1 and "audit train" in result.output and "Traceback" not in result.output


def test_evaluate_on_a_store_without_the_test_ids_is_refused(trained, tmp_path):
    _, heads, _ = trained
    other = write_store(planted_batch(6, 6, seed=3), tmp_path / "o.h5")
    # Same target, but ids img0000..img0011 do not cover the heads' test split of 48 rows.
    result = runner.invoke(app, ["evaluate", str(other), "--heads", str(heads)])
    assert result.exit_code == 1 and "test ids" in result.output


def test_train_usage_and_input_errors_are_one_line(store, tmp_path):
    bad = runner.invoke(app, ["train", str(store), "--out", str(tmp_path / "h"), "--attacks", "II-S,V"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "unknown attack 'V'; valid attacks are: I-P, I-S, II-P, II-S, III-X, III-T, IV, loss," in bad.output
    assert all(f" {a}," in bad.output for a in ("CLiD", "var-pixel", "IV-ref", "blind"))
    missing = runner.invoke(app, ["train", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "h")])
    assert missing.exit_code == 1 and "nope.h5: feature store not found" in missing.output
    assert "Traceback" not in bad.output + missing.output


def test_train_shows_a_progress_bar_over_the_heads_unless_quiet(store, tmp_path):
    args = ["train", str(store), "--attacks", "II-S,III-X", "--epochs", "2", "--no-register"]
    shown = runner.invoke(app, [*args, "--out", str(tmp_path / "a")], env={"AUDIT_PROGRESS": "1"})
    assert shown.exit_code == 0, shown.output
    assert "train: 100%" in shown.stderr and "3/3" in shown.stderr and "head/s" in shown.stderr  # + blind
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--quiet"], env={"AUDIT_PROGRESS": "1"})
    assert quiet.exit_code == 0 and "train:" not in quiet.stderr
