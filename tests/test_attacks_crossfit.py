"""Cross-fitted heads (audit/attacks/crossfit.py, `audit train --folds K`) on planted signals, and the registry's
`audit heads` commands through the CLI runner in a temporary AUDIT_HOME."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attacks_data import TARGET, planted_batch, store_manifest, write_store
from audit import api
from audit.attacks import TrainConfig, load_heads, train_heads
from audit.attacks.crossfit import CrossFitHead, stratified_folds
from audit.attacks.decision import conformal_thresholds
from audit.attacks.export import export_head, ort_session, run_session
from audit.attacks.nets import ScoringHead, build_net
from audit.cli import app
from audit.errors import ArtifactError, InputError, UsageError

FAST = dict(epochs=15, patience=5, n_boot=50, threads=1)
runner = CliRunner()


def _train(batch, out, **kw):
    cfg = TrainConfig(**{**FAST, **kw})
    return train_heads(batch, out, cfg, store_manifest(len(batch["ids"])), "f" * 64, "planted.h5")


def _rows(batch, ids):
    index = {i: k for k, i in enumerate(batch["ids"].tolist())}
    rows = np.array([index[i] for i in ids])
    return {k: v[rows] for k, v in batch.items()}


@pytest.fixture(scope="module")
def planted():
    return planted_batch(30, 30, seed=3)


@pytest.fixture(scope="module")
def crossfit(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("cf") / "heads"
    return out, _train(planted, out, attacks=("II-S",), folds=3)


def test_folds_are_seeded_stratified_and_independent_of_row_order(planted):
    ids, y = planted["ids"].tolist(), planted["member"]
    pool = np.arange(len(ids))
    fold = stratified_folds(pool, y, ids, 4, seed=0)
    assert (stratified_folds(pool, y, ids, 4, seed=0) == fold).all()
    assert (stratified_folds(pool, y, ids, 4, seed=1) != fold).any()
    for cls in (0, 1):
        sizes = np.bincount(fold[y == cls], minlength=4)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 30
    order = np.random.default_rng(5).permutation(len(ids))  # the same rows in another order: the same folds by id
    moved = stratified_folds(pool, y[order], [ids[i] for i in order], 4, seed=0)
    assert {ids[order[i]]: int(moved[i]) for i in pool} == {ids[i]: int(fold[i]) for i in pool}
    with pytest.raises(InputError, match="needs at least 31 labelled members"):
        stratified_folds(pool, y, ids, 31, seed=0)


def test_every_labelled_row_outside_the_test_split_has_exactly_one_out_of_fold_score(planted, crossfit):
    out, info = crossfit
    split = info["split"]
    assert split["mode"] == "cross-fit" and split["folds"] == 3
    oof, test = split["out_of_fold"], split["test"]
    assert len(oof) == len(set(oof)) and not set(oof) & set(test)
    assert sorted(oof + test) == sorted(planted["ids"].tolist())
    assert len(test) == 14 and split["counts"]["test"] == {"members": 7, "nonmembers": 7}  # the split mode's rows
    assert sorted(set(split["fold_of"])) == [0, 1, 2]
    for j, stop in enumerate(split["early_stop"]):  # early stopping never on the member's own held-out fold
        held = {i for i, f in zip(oof, split["fold_of"]) if f == j}
        assert stop and not set(stop) & held and not set(stop) & set(test)
    for e in info["attacks"].values():
        assert len(e["cross_fit"]["out_of_fold"]["probability"]) == len(oof)
        assert len(e["training"]["members"]) == 3


def test_thresholds_come_from_all_out_of_fold_scores(planted, crossfit):
    out, info = crossfit
    heads = load_heads(out)
    e = info["attacks"]["II-S"]
    p = np.asarray(e["cross_fit"]["out_of_fold"]["probability"])
    y = _rows(planted, info["split"]["out_of_fold"])["member"]
    a, b = e["calibration"]["a"], e["calibration"]["b"]
    logit = np.asarray(e["cross_fit"]["out_of_fold"]["logit"])
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(a * logit + b))), atol=1e-6)
    d = heads.decision("II-S", max_fpr=0.1)
    assert d.n_validation_nonmembers == 23 and d.n_validation_members == 23 and d.calibrated_on == "out-of-fold"
    assert (d.member_threshold, d.nonmember_threshold) == conformal_thresholds(p[y == 0], p[y == 1], 0.1)
    assert "out-of-fold" in d.describe()
    assert e["validation"]["on"] == "out-of-fold" and e["validation"]["n"] == 46


def test_combined_score_is_the_mean_member_logit_and_onnx_equals_torch(tmp_path):
    torch.manual_seed(0)
    members = [ScoringHead(build_net("semantic", (6,), (8,), (), 4, 0.0), np.zeros(6), np.ones(6)) for _ in range(3)]
    head = CrossFitHead(members).eval()
    head.platt.copy_(torch.tensor([0.7, -0.2]))
    x = torch.randn(10, 6)
    with torch.no_grad():
        mean = torch.stack([m.score(x) for m in members]).mean(0)
        score, prob = head(x)
    torch.testing.assert_close(score, mean)
    torch.testing.assert_close(prob, torch.sigmoid(0.7 * mean - 0.2))
    parity = export_head(head, x.numpy(), tmp_path / "h.onnx")
    assert parity["max_abs_diff_probability"] < 1e-5
    o_score, o_prob = run_session(ort_session(tmp_path / "h.onnx"), x.numpy())
    np.testing.assert_allclose(o_score, score.numpy(), atol=1e-5)
    np.testing.assert_allclose(o_prob, prob.numpy(), atol=1e-6)


def test_heads_json_and_config_round_trip(crossfit):
    out, info = crossfit
    assert load_heads(out).info == json.loads((out / "heads.json").read_text())
    cfg = TrainConfig.load(out / "train_config.json")
    assert cfg == TrainConfig(**FAST, attacks=("II-S", "blind"), folds=3)
    assert json.loads((out / "heads.json").read_text())["attacks"]["II-S"]["cross_fit"]["rule"].startswith("mean")


def test_realised_fpr_on_unseen_nonmembers_stays_within_the_budget(tmp_path):
    """Weak signal, 300 held-out non-members none of the heads or thresholds saw; budget 0.1 (sd of one test
    split's FPR about 0.02)."""
    batch = planted_batch(120, 400, seed=4, strength=0.4)
    _train(batch, tmp_path / "h", attacks=("II-S",), folds=5, train_fraction=0.2, val_fraction=0.1, epochs=10)
    heads = load_heads(tmp_path / "h")
    test = _rows(batch, heads.info["split"]["test"])
    y = test["member"]
    assert (y == 0).sum() == 280
    fprs = []
    for attack in ("II-S", "blind"):
        d = heads.decision(attack, max_fpr=0.1)
        verdicts = d.decide_all(heads.predict(test, [attack])[attack]["probability"])
        fprs.append(float((verdicts[y == 0] == "member").mean()))
    assert all(f <= 0.1 + 2.5 * np.sqrt(0.1 * 0.9 / 280) for f in fprs), fprs


def test_no_test_split_with_folds_and_evaluate_says_so(planted, tmp_path):
    info = _train(planted, tmp_path / "h", attacks=("blind",), folds=2, train_fraction=0.6, val_fraction=0.4)
    assert info["split"]["test"] == [] and len(info["split"]["out_of_fold"]) == 60
    assert info["blind_baseline"]["on"] == "out-of-fold"
    store = write_store(planted, tmp_path / "s.h5")
    with pytest.raises(ArtifactError, match="no test split"):
        api.evaluate(store, tmp_path / "h", n_boot=0)
    with pytest.raises(UsageError, match="leave a test split"):
        _train(planted, tmp_path / "x", train_fraction=0.6, val_fraction=0.4)  # without folds it must
    with pytest.raises(UsageError, match="folds must be 0"):
        _train(planted, tmp_path / "x", folds=1)


# ------------------------------------------------------------------------------- the CLI, the registry


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_train_folds_through_the_cli_registers_nothing_unless_asked(planted, tmp_path, home):
    store = write_store(planted, tmp_path / "s.h5")
    r = runner.invoke(app, ["train", str(store), "--out", str(tmp_path / "h"), "--attacks", "blind", "--epochs", "5",
                            "--folds", "3", "--test-fraction", "0.5"])
    assert r.exit_code == 0, r.output
    assert "out-of-fold 15/15, test 15/15" in r.output and "3 cross-fitted folds" in r.output
    assert "registered" not in r.output and not (home / "heads").exists()
    ev = runner.invoke(app, ["evaluate", str(store), "--heads", str(tmp_path / "h"), "--bootstrap", "20",
                             "--max-fpr", "0.1"])
    assert ev.exit_code == 0, ev.output
    assert "thresholds fitted on the out-of-fold scores of 3 cross-fitted folds (15 non-members" in ev.output
    bad = runner.invoke(app, ["train", str(store), "--out", str(tmp_path / "x"), "--folds", "0",
                             "--test-fraction", "0"])
    assert bad.exit_code == 2 and "or 0 with --folds" not in bad.output and "--test-fraction" in bad.output


def test_heads_use_list_remove(planted, tmp_path, home):
    store = write_store(planted, tmp_path / "s.h5")
    api.train(store, tmp_path / "h", attacks="blind", epochs=3, quiet=True, folds=0)
    assert api.heads_list() == [e for e in api.heads_list() if e["source"] == "bundled"]
    r = runner.invoke(app, ["heads", "use", str(tmp_path / "h")])
    assert r.exit_code == 0, r.output
    key = f"planted-{TARGET['hash']}"
    assert key in r.output and (home / "heads" / key / "registered.json").is_file()
    listed = json.loads(runner.invoke(app, ["heads", "list", "--json"]).stdout)
    mine = [e for e in listed if e["key"] == key]
    assert len(mine) == 1 and mine[0]["registered_from"] == str((tmp_path / "h").resolve())
    assert mine[0]["store"] == str(store.resolve()) and mine[0]["n_calibration"] == 16
    text = runner.invoke(app, ["heads", "list"]).stdout
    assert f"{key}: target 'planted'" in text and "registered 20" in text and "16 validation rows" in text
    r = runner.invoke(app, ["heads", "remove", "planted"])
    assert r.exit_code == 0 and not (home / "heads" / key).exists()
    r = runner.invoke(app, ["heads", "remove", "planted"])
    assert r.exit_code == 1 and "no registered heads named 'planted'" in r.stderr
    r = runner.invoke(app, ["train", str(store), "--out", str(tmp_path / "h2"), "--attacks", "blind", "--epochs", "2",
                            "--register"])
    assert r.exit_code == 0 and f"registered at {home / 'heads' / key}" in r.output


def test_evaluation_reports_say_the_thresholds_come_from_out_of_fold_scores():
    from audit.attacks.evaluate import format_verdicts_table
    from audit.report.html import _verdicts_section

    evaluation = {"decision": {"rule": "budget", "max_fpr": 0.01, "max_miss": 0.01}, "default_attack": "IV",
                  "calibration": {"on": "out-of-fold", "folds": 5, "n_members": 150, "n_nonmembers": 150},
                  "attacks": {"IV": {"verdicts": {"decided_fraction": {"value": 0.5, "ci95": [0.4, 0.6]},
                                                  "tpr": {"value": 0.3, "ci95": [0.2, 0.4]}, "counts": {}}}}}
    said = "the out-of-fold scores of 5 cross-fitted folds (150 non-members, 150 members)"
    assert said in format_verdicts_table(evaluation)[0]
    (section,) = _verdicts_section(evaluation)
    assert any(said in note for note in section["notes"])
    decided = section["table"]["rows"][0]["cells"][1]
    assert decided == {"text": "0.500", "ci": ["0.400", "0.600"]}  # decided fraction with its interval
