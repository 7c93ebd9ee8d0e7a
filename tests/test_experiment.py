"""`audit experiment --quick`: every stage of the study runs on tiny settings and writes RESULTS.md, plots and
experiment.json whose numbers agree with the cells they came from; a rerun reuses every cached result."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from audit.cli import app


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    out, work = root / "docs", root / "work"
    result = CliRunner().invoke(app, ["experiment", "--quick", "--out", str(out), "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    return {"out": out, "work": work, "output": result.output,
            "nums": json.loads((out / "experiment.json").read_text())}


def test_writes_results_plots_and_numbers(quick_run):
    out = quick_run["out"]
    text = (out / "RESULTS.md").read_text()
    for section in ("## Findings", "## Setup", "## RQ1/RQ2", "## The FID table's analogue", "## RQ3",
                    "## RQ4: ablations", "## RQ5: output defences", "## Set-level inference", "## Timings",
                    "## Verdicts at a 1% budget: cross-fitting and the reference", "### RQ1, the bundled target",
                    "### RQ3, the weak fine-tune", "### img2img strength (variation tier)"):
        assert section in text
    pngs = re.findall(r"!\[[^\]]*\]\(\./([^)]+\.png)\)", text)
    assert len(pngs) == 7
    for name in pngs:
        with Image.open(out / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert "wrote" in quick_run["output"] and "RESULTS.md" in quick_run["output"]


def test_rq1_table_is_the_mean_of_the_cells(quick_run):
    nums, work = quick_run["nums"], quick_run["work"]
    cells = {p.parent.name: json.loads(p.read_text()) for p in (work / "cells").glob("*/result.json")}
    main = [r for name, r in cells.items() if name.startswith("main_seed")]
    assert len(main) == len(nums["config"]["seeds"])
    for attack in nums["attacks"]:
        want = np.mean([r["metrics"][attack]["auc"]["value"] for r in main])
        assert nums["rq1"][attack]["auc"]["mean"] == pytest.approx(want)
    text = (quick_run["out"] / "RESULTS.md").read_text()
    assert f"| II-S | black-box | {nums['rq1']['II-S']['accuracy']['mean']:.3f}" in text
    # The gray-box rows come from the gray-box cells of the same seeds, beside the black-box ones.
    gray = [r for name, r in cells.items() if name.startswith("gray_seed")]
    assert len(gray) == len(nums["config"]["seeds"])
    for attack in nums["graybox_attacks"]:
        want = np.mean([r["metrics"][attack]["auc"]["value"] for r in gray])
        assert nums["rq1"][attack]["auc"]["mean"] == pytest.approx(want)
        assert f"| {attack} | gray-box | {nums['rq1'][attack]['accuracy']['mean']:.3f}" in text
    assert [r["test"]["ids"] for r in gray] == [r["test"]["ids"] for r in main]


def test_every_research_question_has_its_settings(quick_run):
    nums = quick_run["nums"]
    cfg = nums["config"]
    assert sorted(map(float, nums["aux"])) == sorted(cfg["aux_fractions"])
    assert sorted(map(int, nums["steps"])) == sorted(cfg["steps_grid"])
    assert sorted(map(int, nums["n_gen"])) == sorted(cfg["n_gen_grid"])
    assert set(nums["caption"]) == {"given", "blip"} and set(nums["embedder"]) == {"toy-clip", "clip2"}
    assert set(nums["defence"]) == {"none", *cfg["defences"]} and set(nums["defence_transfer"]) == set(cfg["defences"])
    assert list(nums["rq3"]) == ["untuned", "weak", "strong"]
    assert all(set(cfg["graybox_attacks"]) <= set(agg) and "IV" not in agg and "II-S" in agg
               for agg in nums["rq3"].values())
    # Fine-tuning lengths are what the models record; the untuned control is the bundled target itself.
    assert [nums["models"][f"rq3-{k}"]["recipe"]["finetune_steps"] for k in ("weak", "strong")] == \
        list(cfg["rq3_finetune_steps"])
    for name in ("bundle", "rq3-untuned"):
        fid = nums["fid"][name]
        assert fid["members"]["fd"] >= 0 and fid["nonmembers"]["fd"] >= 0
    cost = nums["defence_cost"]["downscale:2"]
    assert 5 < cost["psnr_db"] < 100
    for attack in ("II-S", *cfg["graybox_attacks"]):
        curve = nums["setlevel"]["bundle"][attack]
        assert [r["k"] for r in curve] == list(cfg["set_ks"])
        assert all(r["fpr"] is None or 0 <= r["fpr"] <= 1 for r in curve)
    assert all(cfg["graybox_set_attack"] in nums["setlevel"][f"rq3-{k}"] for k in ("untuned", "weak", "strong"))


def test_stores_are_shared_between_questions(quick_run):
    nums, work = quick_run["nums"], quick_run["work"]
    stores = sorted(p.name for p in (work / "stores").glob("*.h5"))
    # base (n_gen 2, used for n_gen 1 and 2, the reference, aux fractions), one extra steps store, BLIP captions,
    # second CLIP, one defence, and three RQ3 targets x one seed; then the gray-box stores: the bundled target and
    # the three RQ3 targets x one seed.
    # Then the stores with a reference model (the bundled target and the weak fine-tune, both tiers) and one
    # variation store (its single strength is also RQ4's strength grid, so one store serves both).
    assert len(stores) == 17, stores
    from audit.features.store import FeatureStore

    base = [p for p in stores if p.startswith("base-")]
    assert len(base) == 1 and FeatureStore.open(work / "stores" / base[0]).n_gen == 2
    gray = [FeatureStore.open(work / "stores" / p) for p in stores if "gray" in p]
    assert len(gray) == 6 and all(fs.tiers == ("gray-box",) and fs.n_gen == 0 for fs in gray)
    assert all(fs.n_timesteps == len(nums["config"]["graybox_timesteps"]) for fs in gray)
    assert nums["run"]["stages"]["features"]["tasks"] == 17
    refs = [FeatureStore.open(work / "stores" / p) for p in stores if "reference_seed" in p]
    assert len(refs) == 4 and all(fs.manifest.get("reference") for fs in refs)


def test_replayed_images_are_the_targets_own(quick_run):
    from audit.experiments.stores import ReplayGenerator, read_store
    from audit.targets.builtin import load_target

    work = quick_run["work"]
    base = next((work / "stores").glob("base-*.h5"))
    batch, manifest = read_store(base)
    replay = ReplayGenerator(base)
    cfg = manifest["config"]
    caption = str(batch["caption"][0])
    fresh = load_target("toy").generate([caption], 2, cfg["seed"], cfg["steps"])
    replayed = replay.generate([caption], 2, cfg["seed"], cfg["steps"])
    # The store's images were made in a batch, these alone: equal up to one uint8 level of CPU kernel rounding.
    assert replayed.shape == fresh.shape and np.abs(replayed.astype(int) - fresh.astype(int)).max() <= 1
    assert (replayed != fresh).mean() < 0.01
    assert replay.identity() == manifest["target"]


def test_set_test_api_takes_its_null_from_the_heads(quick_run):
    from audit import api
    from audit.attacks.setlevel import heads_null_scores
    from audit.errors import InputError

    work = quick_run["work"]
    folder = next((work / "cells").glob("main_seed0-*"))
    cell = json.loads((folder / "result.json").read_text())
    scores = [p for p, m in zip(cell["test"]["probability"]["II-S"], cell["test"]["member"]) if m == 1]
    # The heads' test-split non-members (never fitted on), scored from the store the heads were trained on (its
    # n_gen prefix): the cell's own scores of those rows.
    null, source = heads_null_scores(folder / "heads", "II-S")
    test_nonmembers = [p for p, m in zip(cell["test"]["probability"]["II-S"], cell["test"]["member"]) if m == 0]
    np.testing.assert_allclose(null, test_nonmembers, rtol=1e-6)
    assert source["n"] == len(null) and source["attack"] == "II-S"
    # The quick run's validation split is too small for a meaningful test: refused, saying why.
    with pytest.raises(InputError, match=f"at least 10 non-member scores, got {len(null)}"):
        api.set_test(scores, folder / "heads", attack="II-S")
    r = api.set_test(scores, null=list(null) * 4)
    assert r["k"] == len(scores) and 0 < r["p_value"] <= 1 and r["null_from"] == {"given": True, "n": 4 * len(null)}


def test_rerun_reuses_every_cached_result(quick_run, tmp_path):
    work = quick_run["work"]
    stamps = {p: p.stat().st_mtime for p in (work / "cells").glob("*/result.json")}
    result = CliRunner().invoke(app, ["experiment", "--quick", "--out", str(tmp_path), "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime for p in stamps} == stamps
    again = json.loads((tmp_path / "experiment.json").read_text())
    assert again["rq1"] == quick_run["nums"]["rq1"] and again["defence"] == quick_run["nums"]["defence"]


def test_bad_settings_fail_with_one_line(tmp_path):
    from audit import api
    from audit.errors import UsageError
    from audit.experiments import ExperimentConfig

    bad = ExperimentConfig.quick()
    bad.defences = ("blur:3",)
    with pytest.raises(Exception, match="unknown defence 'blur'"):
        api.experiment(tmp_path, config=bad)
    bad = ExperimentConfig.quick()
    bad.n_gen = 4
    with pytest.raises(UsageError, match="n_gen_grid"):
        api.experiment(tmp_path, config=bad)


def test_default_spec_keys_are_those_of_before_the_new_fields():
    """Stores and cells are cached by key: fields added for the verdict and variation rows must leave every
    existing store's and cell's key as it was (values computed on the code before those fields)."""
    from audit.experiments.cells import CellSpec
    from audit.experiments.stores import StoreSpec

    assert StoreSpec().key() == "094576ccd5a7"
    assert StoreSpec(tier="gray-box", graybox_timesteps=(100, 200)).key() == "97e930392411"
    assert CellSpec().key() == "72883d4e2d62"
    assert CellSpec(store="/x.h5", attacks=("IV",), train={"epochs": 60}).key() == "2f99559c8a45"
    assert StoreSpec(reference="toy-base").key() != StoreSpec().key()
    assert CellSpec(folds=5).key() != CellSpec().key()


def test_verdict_rows_compare_on_the_same_test_rows(quick_run):
    from audit.attacks.heads import read_heads_info
    from audit.experiments import analysis

    nums, work = quick_run["nums"], quick_run["work"]
    cells = {p.parent.name: (p.parent, json.loads(p.read_text())) for p in (work / "cells").glob("*/result.json")}
    k = nums["config"]["crossfit_folds"]

    def one(prefix):
        (name,) = [n for n in cells if n.startswith(prefix + "-")]
        return cells[name]

    split_dir, split = one("main_seed0")
    cf_dir, cf = one(f"main_crossfit{k}_seed0")
    ref = one(f"main_reference_crossfit{k}_seed0")[1]
    assert split["test"]["ids"] == cf["test"]["ids"] == ref["test"]["ids"]
    assert read_heads_info(cf_dir / "heads")["split"]["mode"] == "cross-fit"
    assert read_heads_info(split_dir / "heads")["split"]["mode"] == "split"
    # The reference cell scores the plain attacks and their reference forms on the same store.
    assert {"II-S", "II-S-ref", "II-S-ref-score", "blind"} <= set(ref["metrics"])
    assert {"PIA-ref", "PIA-ref-score"} <= set(one(f"gray_reference_crossfit{k}_seed0")[1]["metrics"])
    # The verdict numbers are those of the heads' thresholds at the budget on the cell's test rows.
    got = nums["verdicts"]["rq1"]["bundle"]["black-box"]["crossfit"]
    want = analysis.cell_verdicts(cf_dir / "heads", cf, nums["verdict_max_fpr"])
    for attack, v in want.items():
        assert got["verdicts"][attack]["counts"] == v["counts"]
        assert sum(v["counts"].values()) == len(cf["test"]["ids"])
        want_tpr = cf["metrics"][attack]["tpr_at_0_1pct_fpr"]["value"]
        assert got["metrics"][attack]["tpr_at_0_1pct_fpr"]["values"] == [want_tpr]
    assert set(nums["verdicts"]["rq3"]) == set(nums["config"]["verdict_rq3"])
    assert set(nums["verdicts"]["rq3"]["weak"]["gray-box"]) == {"split", "crossfit", "reference crossfit"}
    text = (quick_run["out"] / "RESULTS.md").read_text()
    assert "| II-S-ref | cross-fit + reference |" in text and "Issue #20's goal on the weak fine-tune" in text


def test_variation_rows_beside_the_other_tiers(quick_run):
    nums, work = quick_run["nums"], quick_run["work"]
    cfg = nums["config"]
    cells = {p.parent.name: json.loads(p.read_text()) for p in (work / "cells").glob("var_seed*/result.json")}
    assert len(cells) == len(cfg["seeds"])
    for attack in cfg["variation_attacks"]:
        assert nums["tiers"][attack] == "variation"
        want = np.mean([r["metrics"][attack]["auc"]["value"] for r in cells.values()])
        assert nums["rq1"][attack]["auc"]["mean"] == pytest.approx(want)
    assert [r["test"]["ids"] for r in cells.values()] == [
        json.loads(next((work / "cells").glob("main_seed0-*/result.json")).read_text())["test"]["ids"]]
    assert sorted(map(float, nums["var_strength"])) == sorted(cfg["var_strength_grid"])
    text = (quick_run["out"] / "RESULTS.md").read_text()
    assert f"| {cfg['variation_attacks'][0]} | variation |" in text
