"""`audit demo`: the pipeline on a small world of tiny models (fast), and the real demo on the bundle (slow)."""

import json
import time

import pytest
from typer.testing import CliRunner

from audit import api
from audit.cli import app
from audit.demo import format_results
from audit.toy.build import ToyBuildConfig


@pytest.fixture
def small_world(tiny_world, tmp_path):
    """The tiny seeded models as a toy world folder (their world.json fixes the toy scene splits)."""
    world = tmp_path / "world"
    world.mkdir()
    for name in ("target", "clip", "blip"):
        (world / name).symlink_to(tiny_world[name], target_is_directory=True)
    cfg = ToyBuildConfig(n_members=12, n_nonmembers=12)
    (world / "world.json").write_text(json.dumps({"config": cfg.to_dict()}), encoding="utf-8")
    return world


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_demo_pipeline_reports_only_what_it_computed(small_world, tmp_path, monkeypatch, runtime):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    result = api.demo(work, quiet=True, world_dir=small_world, n_members=8, n_nonmembers=8, n_check=1, n_gen=1,
                      steps=2, batch_size=8, epochs=2, attacks="II-S,IV", runtime=runtime)
    # onnx (the default) compiles the models first and featurises and checks on onnxruntime, under the same
    # identity as the torch models, so its store and heads are interchangeable with the torch path's.
    assert ("export" in result["seconds"]) == (runtime == "onnx") == (work / "export" / "export.json").is_file()
    from audit.targets import load_target

    assert result["models"]["target"] == load_target(str(small_world / "target")).identity()
    assert ("onnxruntime" in format_results(result)) == (runtime == "onnx")
    # The aux set holds the requested rows, and the held-out checks are none of them.
    aux_meta = [json.loads(line) for line in (work / "aux" / "metadata.jsonl").read_text().splitlines()]
    assert sum(r["member"] for r in aux_meta) == 8 and len(aux_meta) == 16
    check_caps = [json.loads(line)["text"] for line in (work / "check" / "metadata.jsonl").read_text().splitlines()]
    assert not set(check_caps) & {r["text"] for r in aux_meta}
    # The evaluation printed is the one on disk, and re-evaluating the same store and heads gives it again.
    on_disk = json.loads((work / "evaluate.json").read_text())
    assert result["evaluation"]["attacks"] == on_disk["attacks"]
    again = api.evaluate(work / "features.h5", work / "heads", seed=0, max_fpr=result["config"]["max_fpr"])
    assert again.attacks == on_disk["attacks"]
    assert [c["truly_member"] for c in result["checks"]] == [True, False]
    assert all(c["status"] == "ok" and c["verdict"] in ("member", "non-member", "inconclusive")
               for c in result["checks"])
    # Two validation rows per class cannot resolve the demo's 5% budget (19 needed): the report says so, and
    # that nothing was decided.
    assert result["decision"]["max_fpr"] == 0.05 and not result["decision"]["member_resolvable"]
    assert {c["verdict"] for c in result["checks"]} == {"inconclusive"}
    text = format_results(result)
    assert "max-fpr 0.05: no member verdict possible" in text and "0 member, 0 non-member, 2 inconclusive" in text
    assert "(the 1% default of check/scan cannot be used here: max-fpr 0.01 needs >= 99" in text
    iv = on_disk["attacks"]["IV"]["auc"]["value"]
    assert f"{iv:.3f}" in text and "blind" in text and "held-out" in text
    assert not (tmp_path / "home" / "heads").exists()  # the demo does not register its heads for the user


def test_demo_refuses_a_used_workdir_and_an_unknown_runtime(small_world, tmp_path):
    (tmp_path / "features.h5").write_bytes(b"")
    with pytest.raises(Exception, match="already holds features.h5"):
        api.demo(tmp_path, quiet=True, world_dir=small_world, n_members=8, n_nonmembers=8)
    with pytest.raises(Exception, match="unknown demo runtime 'tensorrt'; valid runtimes are onnx, torch"):
        api.demo(tmp_path / "other", quiet=True, world_dir=small_world, runtime="tensorrt")


@pytest.mark.slow
def test_full_demo_on_the_bundle_meets_the_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    start = time.perf_counter()
    r = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--quiet"])
    elapsed = time.perf_counter() - start
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "demo" / "evaluate.json").read_text())
    assert ev["attacks"]["IV"]["auc"]["value"] >= 0.90
    assert ev["attacks"]["blind"]["auc"]["value"] <= 0.60
    assert "IV" in r.stdout and "blind" in r.stdout
    # 50 validation non-members resolve the demo's 5% budget but not 1%, and the report says both.
    assert ev["decision"]["max_fpr"] == 0.05 and ev["attacks"]["IV"]["verdicts"]["member_resolvable"]
    assert "verdicts at max-fpr 0.05" in r.stdout and "max-fpr 0.01 needs >= 99 validation non-members" in r.stdout
    assert elapsed < 300, f"demo took {elapsed:.0f} s"
