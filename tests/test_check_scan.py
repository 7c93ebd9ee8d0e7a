"""`audit check` / `audit scan` and the Auditor API on tiny seeded models, through typer's CliRunner.

A temporary HOME and AUDIT_HOME keep the user's heads registry out of the tests.
"""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from audit import api
from audit.attacks import load_heads
from audit.cli import app
from audit.features import FeaturesConfig, FeatureStore
from audit.features.compute import Models
from audit.report.jsonl import read_jsonl
from audit.toy import scenes
from audit.auditor import image_row
from audit.errors import UnknownNameError, UsageError
from audit.verdict import Verdict

FIELDS = {"image", "caption", "caption_source", "target", "status", "verdict", "probability", "threshold", "attack",
          "scores", "warnings", "error", "heads", "decision"}
DECISION_FIELDS = {"rule", "max_fpr", "max_miss", "member_threshold", "nonmember_threshold", "validation_fpr",
                   "validation_miss", "fpr_resolution", "miss_resolution", "member_resolvable", "nonmember_resolvable",
                   "n_validation_nonmembers", "n_validation_members", "notes"}


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """Aux data, its feature store and heads trained (and registered) in a temporary AUDIT_HOME.

    Loaded models are cached across commands (the same real models each command would load) to keep this quick.
    """
    mp = pytest.MonkeyPatch()
    cache = {}
    load = Models.load.__func__

    def cached_load(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load(cls, *args, **kwargs)
        return cache[key]

    mp.setattr(Models, "load", classmethod(cached_load))
    home = tmp_path_factory.mktemp("home")
    mp.setenv("HOME", str(home))
    mp.setenv("AUDIT_HOME", str(home / "audit"))
    root = tmp_path_factory.mktemp("cs")
    images, captions = scenes.scene_images(1, "members", 6)
    aux = scenes.write_imagefolder(root / "aux", images, captions, [True, False] * 3)
    kw = dict(embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]), quiet=True)
    api.featurize(str(tiny_world["target"]), aux, root / "store.h5", n_gen=1, steps=2, seed=5, batch_size=8,
                  caption_tokens=6, **kw)
    trained = api.train(root / "store.h5", root / "heads", attacks="II-S,IV", epochs=3, register=True, folds=0)
    yield {"root": root, "aux": aux, "store": root / "store.h5", "heads": root / "heads",
           "registered": trained.registered, "opts": ["--target", str(tiny_world["target"]), "--embedder",
                                                         kw["embedder"], "--captioner", kw["captioner"]],
           "images": images, "captions": captions, "tiny": tiny_world}
    mp.undo()


def _check(world, *args):
    return CliRunner().invoke(app, ["check", *args, *world["opts"]])


def test_check_json_has_every_field_and_matches_the_store(world):
    img = world["aux"] / "img_00002.png"
    r = _check(world, str(img), "--caption", world["captions"][2], "--heads", str(world["heads"]), "--json")
    assert r.exit_code in (0,), r.output
    v = json.loads(r.stdout)
    assert FIELDS <= set(v)
    assert v["heads_source"]["source"] == "given" and v["heads_source"]["store"] == str(world["store"].resolve())
    assert v["heads_source"]["calibrated_on"] == "validation" and v["heads_source"]["n_calibration"] == 2
    assert f"heads: {v['heads']} (given with --heads; trained on" in r.stderr
    assert v["status"] == "ok" and v["error"] is None and v["caption_source"] == "argument"
    assert v["attack"] == "IV" and set(v["scores"]) == {"II-S", "IV", "blind"}
    # These heads hold 1 validation row per class: the default 1% budget is unresolvable on both sides, so every
    # verdict is inconclusive, and the verdict says why.
    assert DECISION_FIELDS <= set(v["decision"]) and v["decision"]["rule"] == "budget"
    assert v["decision"]["max_fpr"] == 0.01 and v["decision"]["member_resolvable"] is False
    assert v["verdict"] == "inconclusive" and v["threshold"] is None
    assert all(s["verdict"] == "inconclusive" for s in v["scores"].values())
    note = "max-fpr 0.01 needs >= 99 validation non-members; these heads have 1"
    assert note in v["decision"]["notes"][0] and any(note in w for w in v["warnings"])
    assert 0.0 <= v["probability"] <= 1.0 and v["heads"] == str(world["heads"].resolve())
    # The same features as `audit features` made for this row (the heads' n_gen/steps/seed), so the same probability.
    heads = load_heads(world["heads"])
    row = FeatureStore.open(world["store"]).read()
    pos = row["ids"].tolist().index("img_00002.png")
    expect = heads.predict({k: a[pos:pos + 1] for k, a in row.items()})
    for attack, s in v["scores"].items():
        assert s["probability"] == pytest.approx(float(expect[attack]["probability"][0]), abs=1e-4), attack
    # --max-fpr 0.5 is resolvable with one validation non-member; the rule is the one fitted from heads.json.
    r = _check(world, str(img), "--caption", world["captions"][2], "--heads", str(world["heads"]), "--json",
               "--max-fpr", "0.5")
    v = json.loads(r.stdout)
    for attack, s in v["scores"].items():
        rule = heads.decision(attack, max_fpr=0.5)
        assert (s["threshold"], s["nonmember_threshold"]) == (rule.member_threshold, rule.nonmember_threshold)
        assert s["verdict"] == rule.decide(s["probability"]) != "inconclusive"  # 1 row per class: regions meet
    assert v["decision"]["member_resolvable"] and v["decision"]["notes"] == []
    # --decision balanced: today's two-way rule at the balanced-accuracy threshold.
    r = _check(world, str(img), "--caption", world["captions"][2], "--heads", str(world["heads"]), "--json",
               "--decision", "balanced")
    v = json.loads(r.stdout)
    assert v["threshold"] == pytest.approx(heads.threshold("IV")) and v["decision"]["rule"] == "balanced"
    assert v["verdict"] == ("member" if v["probability"] >= v["threshold"] else "non-member")


def test_check_uses_registered_heads_and_the_captioner_when_no_caption(world):
    img = world["root"] / "lone.png"
    shutil.copy(world["aux"] / "img_00001.png", img)
    r = _check(world, str(img))
    assert r.exit_code == 0, r.output
    assert "(written by the captioner)" in r.stdout
    assert f"heads: {world['registered']} (registered " in r.stderr
    assert "the captioner wrote it" in r.stderr
    (world["root"] / "lone.txt").write_text("a small red square at the top", encoding="utf-8")
    v = json.loads(_check(world, str(img), "--json").stdout)
    assert v["caption_source"] == "txt" and v["caption"] == "a small red square at the top"
    assert not any("captioner" in w for w in v["warnings"])


def test_check_fail_on_member_fires_on_member_never_on_inconclusive(world):
    t = world["tiny"]
    models = Models.load(str(t["target"]), str(t["clip"]), str(t["blip"]))
    rows = [api.Auditor(str(t["target"]), world["heads"], models=models, **kw).score_rows(
        [image_row(world["aux"] / f"img_{i:05d}.png", world["captions"][i]) for i in range(6)])
        for kw in ({}, {"decision": "balanced"})]
    assert {v.verdict for v in rows[0]} == {"inconclusive"}
    members = [i for i, v in enumerate(rows[1]) if v.verdict == "member"]
    assert members, "precondition: the two-way rule calls some aux image a member"
    img, caption = str(world["aux"] / f"img_{members[0]:05d}.png"), world["captions"][members[0]]
    r = _check(world, img, "--caption", caption, "--fail-on-member", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["verdict"] == "inconclusive", r.output
    r = _check(world, img, "--caption", caption, "--fail-on-member", "--decision", "balanced")
    assert r.exit_code == 3 and f"{img}: member (P(member)" in r.stdout, r.output
    assert "rule (IV): the two-way rule" in r.stdout
    r = _check(world, img, "--caption", caption)
    assert r.exit_code == 0 and f"{img}: inconclusive" in r.stdout
    assert "no member verdict possible, no non-member verdict possible" in r.stdout
    assert "needs >= 99 validation non-members" in r.stderr


def test_heads_of_an_older_audit_are_refused_in_one_line(world, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(world["heads"], old)
    info = json.loads((old / "heads.json").read_text())
    for e in info["attacks"].values():
        del e["validation_probabilities"]
    (old / "heads.json").write_text(json.dumps(info))
    r = _check(world, str(world["aux"] / "img_00000.png"), "--caption", "x", "--heads", str(old))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.count("\n") == 1 and "made by an older audit" in r.stderr and "audit train" in r.stderr


def test_check_errors_are_one_line_with_exit_codes(world, tmp_path, monkeypatch):
    r = _check(world, str(tmp_path / "missing.png"), "--caption", "x")
    assert r.exit_code == 1 and "missing.png: file not found" in r.stderr and "Traceback" not in r.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = _check(world, str(bad), "--caption", "x")
    assert r.exit_code == 1 and "bad.png: not a readable image" in r.stderr
    r = _check(world, str(world["aux"] / "img_00000.png"), "--caption", "   ")
    assert r.exit_code == 2 and "--caption is empty" in r.stderr
    r = _check(world, str(world["aux"] / "img_00000.png"), "--caption", "x", "--attack", "III-T")
    assert r.exit_code == 2 and "'III-T' is not in" in r.stderr
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "empty"))
    r = _check(world, str(world["aux"] / "img_00000.png"), "--caption", "x")
    assert r.exit_code == 1 and "no heads registered" in r.stderr and "audit train" in r.stderr


def test_scan_writes_every_row_and_resumes_without_duplicates(world, tmp_path):
    folder = tmp_path / "scan"
    shutil.copytree(world["aux"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    shutil.copy(world["aux"] / "img_00003.png", folder / "uncaptioned.png")
    out = tmp_path / "results.jsonl"
    args = ["scan", str(folder), "--out", str(out), "--heads", str(world["heads"]), "--batch-size", "3", "--quiet",
            *world["opts"]]
    r = CliRunner().invoke(app, [*args, "--report", str(tmp_path / "report.html")])
    assert r.exit_code == 0, r.output
    assert "scanned 8 rows" in r.stdout and "1 unreadable" in r.stdout
    # The three verdicts are always counted; with 1 validation row per class nothing is decided at 1%.
    assert "0 member, 0 non-member, 7 inconclusive" in r.stdout and "rule (IV): max-fpr 0.01" in r.stdout
    rows, _ = read_jsonl(out)
    assert [x["id"] for x in rows] == ["broken.png"] + [f"img_{i:05d}.png" for i in range(6)] + ["uncaptioned.png"]
    by_id = {x["id"]: x for x in rows}
    assert by_id["broken.png"]["status"] == "unreadable" and by_id["broken.png"]["verdict"] is None
    assert "broken.png" in by_id["broken.png"]["error"]
    assert by_id["uncaptioned.png"]["caption_source"] == "captioner"
    assert any("captioner" in w for w in by_id["uncaptioned.png"]["warnings"])
    assert all(FIELDS <= set(x) for x in rows)
    page = (tmp_path / "report.html").read_text()
    # The gallery shows each query beside the images it was scored on, generated again (no feature store here).
    assert "the images the target generated from its caption" in page and "alt='generated'" in page

    # Without --resume an existing results file is refused; with it, finished rows are skipped.
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "--resume" in r.stderr
    data = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(data[:3]) + data[3][:20])  # killed mid-line after 3 rows
    r = CliRunner().invoke(app, [*args, "--resume", "--max-fpr", "0.5"])
    assert r.exit_code == 2 and "cannot resume" in r.stderr and "max-fpr" in r.stderr  # one rule per file
    r = CliRunner().invoke(app, [*args, "--resume", "--fail-on-member"])
    assert "3 skipped" in r.stdout
    resumed, _ = read_jsonl(out)
    assert [x["id"] for x in resumed] == list(by_id)  # every row once, in order, no duplicates
    for x in resumed:
        assert x["status"] == by_id[x["id"]]["status"] and x["verdict"] == by_id[x["id"]]["verdict"]
        if x["probability"] is not None:
            assert x["probability"] == pytest.approx(by_id[x["id"]]["probability"], abs=1e-4)
    # --fail-on-member: inconclusive rows never fail the scan.
    assert {x["verdict"] for x in resumed if x["status"] == "ok"} == {"inconclusive"}
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report.html").read_text()
    assert "verdict inconclusive</dt><dd>7" in page and "max-fpr 0.01" in page


def test_auditor_api_scores_in_process(world):
    t = world["tiny"]
    models = Models.load(str(t["target"]), str(t["clip"]), str(t["blip"]))
    auditor = api.Auditor(str(t["target"]), world["heads"], models=models)
    assert auditor.config.n_gen == 1 and auditor.config.steps == 2 and auditor.config.seed == 5
    v = auditor.check(world["aux"] / "img_00004.png", world["captions"][4])
    assert isinstance(v, Verdict) and v.status == "ok" and v.attack == "IV"
    assert Verdict.from_dict(json.loads(v.to_json())) == v
    half = api.Auditor(str(t["target"]), world["heads"], models=models, max_fpr=0.5).check(
        world["aux"] / "img_00004.png", world["captions"][4])
    assert half.decision["max_fpr"] == 0.5 and half.verdict in ("member", "non-member")
    assert Verdict.from_dict(json.loads(half.to_json())) == half
    with pytest.raises(UsageError, match="--max-fpr must be in"):
        api.Auditor(str(t["target"]), world["heads"], models=models, max_fpr=2)
    with pytest.raises(UnknownNameError, match="valid rules are: budget, balanced"):
        api.Auditor(str(t["target"]), world["heads"], models=models, decision="strict")
    other = api.Auditor(str(t["target"]), world["heads"], models=models, attack="II-S").check(
        world["aux"] / "img_00004.png", world["captions"][4])
    assert other.attack == "II-S" and other.probability == v.scores["II-S"]["probability"]
    missing = auditor.check(world["root"] / "nope.png", "a caption")
    assert missing.status == "unreadable" and missing.verdict is None and "file not found" in missing.error


def test_pixel_size_is_recorded_and_check_follows_the_heads(world, tmp_path):
    store, heads = tmp_path / "px16.h5", tmp_path / "heads16"
    r = CliRunner().invoke(app, ["features", *world["opts"], "--data", str(world["aux"]), "--out", str(store),
                                 "--n-gen", "1", "--steps", "2", "--seed", "5", "--caption-tokens", "6",
                                 "--pixel-size", "16", "-q"])
    assert r.exit_code == 0, r.output
    fs = FeatureStore.open(store)
    rows = fs.read()
    assert rows["query_pixels"].shape == (6, 16, 16, 3) and rows["gen_pixels"].shape == (6, 1, 16, 16, 3)
    assert fs.manifest["config"]["pixel_size"] == 16
    api.train(store, heads, attacks="II-P", epochs=2, register=False, folds=0)
    assert load_heads(heads).info["input_signature"]["pixel_size"] == 16
    img = world["aux"] / "img_00003.png"
    v = json.loads(_check(world, str(img), "--caption", world["captions"][3], "--heads", str(heads), "--json").stdout)
    pos = rows["ids"].tolist().index("img_00003.png")
    expect = load_heads(heads).predict({k: a[pos:pos + 1] for k, a in rows.items()})
    # check computed 16x16 thumbnails as the store did (32x32 ones would not even fit the heads' input)
    assert v["scores"]["II-P"]["probability"] == pytest.approx(float(expect["II-P"]["probability"][0]), abs=1e-4)
