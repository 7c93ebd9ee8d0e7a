"""Loading heads and the per-user heads registry (audit/attacks/heads.py), in a temporary AUDIT_HOME."""

import json
import shutil

import numpy as np
import pytest

from attacks_data import CAPTIONER, EMBEDDER, TARGET, planted_batch, store_manifest
from audit.attacks import (TrainConfig, audit_home, find_heads, load_heads, register_heads, resolve_heads,
                           train_heads)
from audit.errors import ArtifactError


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "h"
    batch = planted_batch(12, 12, seed=0)
    train_heads(batch, out, TrainConfig(attacks=("blind",), epochs=5, n_boot=50),
                store_manifest(len(batch["ids"])), "e" * 64, "planted.h5")
    return out


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_registry_round_trip(heads_dir, home):
    assert find_heads(TARGET) is None
    registered = register_heads(heads_dir)
    assert registered == home / "heads" / f"planted-{TARGET['hash']}"
    assert find_heads(TARGET) == registered
    heads = resolve_heads(None, TARGET)
    assert heads.path == registered and heads.info == load_heads(heads_dir).info
    assert sorted(p.name for p in registered.iterdir()) == ["blind.onnx", "heads.json", "registered.json",
                                                            "train_config.json"]
    assert heads.source == "registered" and json.loads((registered / "registered.json").read_text())["from"] == str(
        heads_dir.resolve())


def test_same_weights_under_another_name_find_the_heads_by_hash(heads_dir, home):
    register_heads(heads_dir)
    assert find_heads({"name": "/some/folder/planted", "hash": TARGET["hash"]}) is not None
    assert find_heads({"name": "planted", "hash": "ffffffffffffffff"}) is None


def test_registering_again_replaces_the_previous_heads(heads_dir, home, tmp_path):
    first = register_heads(heads_dir)
    changed = tmp_path / "changed"
    shutil.copytree(heads_dir, changed)
    info = json.loads((changed / "heads.json").read_text())
    info["manifest"]["created"] = "changed-for-this-test"  # (a default_attack that is not an attack is refused)
    (changed / "heads.json").write_text(json.dumps(info))
    assert register_heads(changed) == first
    assert load_heads(first).info["manifest"]["created"] == "changed-for-this-test"
    assert not list(first.parent.glob(".*"))  # no temporary or old copies left behind


def test_no_registered_heads_says_how_to_train_them(home):
    with pytest.raises(ArtifactError, match=r"no heads registered for target 'planted'.*audit train"):
        resolve_heads(None, TARGET)


def test_bundled_toy_heads_are_the_fallback_for_their_target(heads_dir, home, tmp_path, monkeypatch):
    import audit.attacks.heads as heads_mod

    bundled = tmp_path / "bundle" / "heads"
    shutil.copytree(heads_dir, bundled)
    monkeypatch.setattr(heads_mod, "bundled_heads_path", lambda: bundled)
    assert find_heads(TARGET) == bundled
    assert find_heads({"name": "toy", "hash": "0000000000000000"}) is None  # only for the weights they fit
    assert find_heads(TARGET) == bundled and register_heads(heads_dir) == find_heads(TARGET)  # user's first


def test_heads_for_another_target_are_refused_naming_both(heads_dir):
    other = {"name": "sd-1.5", "hash": "9999999999999999"}
    with pytest.raises(ArtifactError, match=r"made for target 'planted' \(weights 0123456789abcdef\), not for "
                                            r"'sd-1.5' \(weights 9999999999999999\)"):
        load_heads(heads_dir, target=other)


def test_features_of_another_embedder_are_refused_naming_both(heads_dir):
    heads = load_heads(heads_dir)
    heads.check_compatible(target=TARGET, embedder=EMBEDDER, captioner=CAPTIONER)
    with pytest.raises(ArtifactError, match="embedder 'planted-clip'.*not 'openai/clip'"):
        heads.check_compatible(embedder={"name": "openai/clip", "hash": "abababababababab"})


def test_a_modified_onnx_head_is_refused(heads_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(heads_dir, copy)
    with open(copy / "blind.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="blind.onnx: head of attack blind was modified after training"):
        load_heads(copy)


def test_missing_or_foreign_heads_folders_are_one_line_errors(tmp_path, heads_dir):
    with pytest.raises(ArtifactError, match="no such heads folder"):
        load_heads(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no heads.json.*audit train"):
        load_heads(tmp_path / "empty")
    store_like = tmp_path / "store_like"
    shutil.copytree(heads_dir, store_like)
    info = json.loads((store_like / "heads.json").read_text())
    info["manifest"]["kind"] = "features"
    (store_like / "heads.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="is a 'features' artifact, expected 'heads'"):
        load_heads(store_like)


def test_heads_json_path_works_as_well_as_the_folder(heads_dir):
    assert load_heads(heads_dir / "heads.json").path == heads_dir


def test_default_home_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("AUDIT_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert audit_home() == tmp_path / ".cache" / "audit"


def test_predictions_of_registered_copy_equal_the_original(heads_dir, home):
    batch = planted_batch(12, 12, seed=5)
    a = load_heads(heads_dir).predict(batch)["blind"]["probability"]
    b = load_heads(register_heads(heads_dir)).predict(batch)["blind"]["probability"]
    np.testing.assert_array_equal(a, b)


def test_the_bundled_toy_heads_are_found_for_the_bundled_toy_target(home):
    """Fails when the toy target is rebuilt without retraining its heads (their weights hash would differ)."""
    from audit.attacks.heads import bundled_heads_path
    from audit.manifest import weights_hash
    from audit.toy import bundle_path

    toy = {"name": "toy", "hash": weights_hash(bundle_path("target"))}
    assert find_heads(toy) == bundled_heads_path()
    heads = load_heads(find_heads(toy), target=toy)  # manifest and every ONNX file's sha256 verified
    assert heads.attacks == ["I-P", "I-S", "II-P", "II-S", "III-X", "III-T", "IV", "blind"]
    assert heads.default_attack == "IV" and heads.warnings == []


def test_a_steep_calibration_slope_does_not_fail_the_onnx_parity_check(tmp_path):
    """Scores in a narrow range get a steep Platt slope; float rounding of the score then moves the probability by
    up to slope / 4 times as much. The check allows that, and still checks the score itself tightly."""
    import torch

    from audit.attacks.export import export_head
    from audit.attacks.nets import MLP, ScoringHead

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(256, 800)).astype(np.float32)
    head = ScoringHead(MLP(800, (256, 128), 0.0), x.mean(0), x.std(0))
    with torch.no_grad():
        s = head.score(torch.from_numpy(x))
        slope = 4.0 / float(s.std())  # scores spread over about one probability unit, as calibration does...
        head.platt[:] = torch.tensor([slope * 1e3, -slope * 1e3 * float(s.median())])  # ...then 1000x steeper
    parity = export_head(head, x, tmp_path / "h.onnx")
    assert parity["rows_checked"] == 256 and parity["max_abs_diff_score"] <= 1e-4
    assert parity["max_abs_diff_probability"] > 1e-5  # what the old fixed tolerance refused
