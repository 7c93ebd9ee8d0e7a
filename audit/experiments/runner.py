"""`audit experiment`: plan the study, run its tasks, compute every number, write RESULTS.md and its plots."""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..attacks.inputs import tier_of
from ..config import atomic_write_text
from ..errors import UsageError
from ..features import graybox
from . import analysis
from .cells import RESULT
from .config import ExperimentConfig
from .plan import Plan, make_plan
from .schedule import run_tasks, simulate

log = logging.getLogger(__name__)

CONFIG_FILE = "experiment_config.json"
NUMBERS_FILE = "experiment.json"
TIMINGS_FILE = "timings.json"


def _load(plan: Plan, work: Path, label: str) -> dict:
    return json.loads((plan.cells[label].folder(work) / RESULT).read_text(encoding="utf-8"))


def _agg(plan: Plan, work: Path, by_seed: dict, attacks: list[str]) -> dict:
    results = [_load(plan, work, lab) for lab in by_seed.values()]
    out = analysis.aggregate(results, attacks)
    out["_counts"] = results[0]["counts"]
    out["_seeds"] = list(by_seed)
    return out


def _table(plan: Plan, work: Path, layout: dict, attacks: list[str]) -> dict:
    return {str(k): _agg(plan, work, v, attacks) for k, v in layout.items()}


def compute_numbers(cfg: ExperimentConfig, plan: Plan, work: Path, done: dict) -> dict:
    """Every number the report shows, from the finished cells, stores and models."""
    from ..toy import BUNDLE
    from .models import bundle_clip_top1
    from .stores import read_store

    attacks = list(cfg.attacks) + ["blind"]
    gray = list(cfg.graybox_attacks)
    t = plan.tables
    # RQ1 and RQ3 list both tiers (black-box attacks, then gray-box, then the blind baseline); the ablations,
    # defences and FID analogue are about generated images, so black-box only.
    var = list(cfg.variation_attacks) if t.get("rq1_variation") else []
    nums: dict = {"attacks": attacks, "graybox_attacks": gray, "variation_attacks": var,
                  "both_tiers": list(cfg.attacks) + gray + var + ["blind"]}
    nums["tiers"] = {a: tier_of(a) for a in nums["both_tiers"]}
    nums["rq1"] = _with_gray(_table(plan, work, {"bundle": t["rq1"]}, attacks)["bundle"],
                             _agg(plan, work, t["rq1_gray"], gray) if gray else None, gray)
    if var:
        nums["rq1"] = _with_gray(nums["rq1"], _agg(plan, work, t["rq1_variation"], var + ["blind"]), var)
        nums["rq1_variation_blind"] = _agg(plan, work, t["rq1_variation"], ["blind"])["blind"]
        nums["var_strength"] = _table(plan, work, t["var_strength"], var + ["blind"])
    nums["verdicts"] = _verdicts(plan, work, t.get("verdicts") or {}, cfg.verdict_max_fpr)
    nums["verdict_max_fpr"] = cfg.verdict_max_fpr
    nums["rq1_blind"] = {s: _load(plan, work, lab)["blind_baseline"] for s, lab in t["rq1"].items()}
    for key in ("n_gen", "steps", "aux", "caption", "embedder", "defence", "defence_transfer", "rq3"):
        nums[key] = _table(plan, work, t[key], attacks)
    for label, by_seed in t["rq3_gray"].items():
        nums["rq3"][label] = _with_gray(nums["rq3"][label], _agg(plan, work, by_seed, gray), gray)
    nums["unet_evaluations_per_query"] = {
        "black-box": cfg.n_gen * cfg.steps,
        "gray-box": graybox.unet_evaluations(tuple(graybox.DATASETS), len(cfg.graybox_timesteps)),
        "gray-box by attack": {a: graybox.unet_evaluations((a,), len(cfg.graybox_timesteps))
                               for a in graybox.DATASETS}}
    if var:
        from ..features.variation import unet_evaluations

        nums["unet_evaluations_per_query"]["variation"] = unet_evaluations(cfg.var_strengths, cfg.n_var, cfg.steps)
        nums["unet_evaluations_per_query"]["variation by strength"] = {
            str(st): unet_evaluations((st,), cfg.n_var, cfg.steps) for st in cfg.var_strength_grid}

    def store_batch(label: str, n_gen: int | None = None) -> dict:
        return read_store(plan.stores[label].path(work), n_gen)[0]

    base = store_batch("base", cfg.n_gen)
    nums["fid"] = {"bundle": analysis.fid_table(base)}
    nums["pixel_gap"] = {"bundle": analysis.pixel_distance(base)}
    for label, seeds in t["stores"]["rq3"].items():
        b = store_batch(seeds[0])
        nums["fid"][f"rq3-{label}"] = analysis.fid_table(b)
        nums["pixel_gap"][f"rq3-{label}"] = analysis.pixel_distance(b)
    nums["defence_cost"] = {"none": {"psnr_db": None, "fd_generated_vs_real": analysis.frechet(
        base["gen_img_emb"].reshape(-1, base["gen_img_emb"].shape[-1]), base["query_img_emb"])}}
    for d, label in t["stores"]["defended"].items():
        nums["defence_cost"][d] = analysis.defence_cost(base, store_batch(label))

    # Set-level inference: every attack on the bundled target; the default attack on the RQ3 targets.
    main_attack = "IV" if "IV" in cfg.attacks else cfg.attacks[0]
    nums["set_attack"] = main_attack

    def curves(by_seed: dict, attack: str) -> list[dict]:
        per_seed = [analysis.set_level(_load(plan, work, lab), attack, cfg.set_ks, cfg.set_alpha, cfg.set_trials,
                                       cfg.set_method, cfg.set_resamples, seed=1000 + s)
                    for s, lab in by_seed.items()]
        return analysis.mean_curves(per_seed)

    nums["setlevel"] = {"bundle": {**{a: curves(t["rq1"], a) for a in attacks if a != "blind"},
                                   **{a: curves(t["rq1_gray"], a) for a in gray},
                                   "blind": curves(t["rq1"], "blind")}}
    nums["set_graybox_attack"] = cfg.graybox_set_attack if gray else None
    for label, by_seed in t["rq3"].items():
        nums["setlevel"][f"rq3-{label}"] = {main_attack: curves(by_seed, main_attack)}
        if gray:
            nums["setlevel"][f"rq3-{label}"][cfg.graybox_set_attack] = curves(t["rq3_gray"][label],
                                                                               cfg.graybox_set_attack)
    for d, by_seed in t["defence"].items():
        if d != "none":
            nums["setlevel"][f"defence {d}"] = {main_attack: curves(by_seed, main_attack)}

    world = json.loads((BUNDLE / "world.json").read_text(encoding="utf-8"))
    nums["models"] = {
        "bundle": {"config": world["config"], "metrics": world["metrics"]},
        "clip2": done_result(done, "model clip2"),
        "bundle_clip_top1_same_heldout": bundle_clip_top1(cfg.clip2_seed),
        **{f"rq3-{lab}": done_result(done, f"model rq3-{lab}") for lab in ("weak", "strong")},
    }
    return nums


def _verdicts(plan: Plan, work: Path, layout: dict, max_fpr: float) -> dict:
    """``{question: {target: {tier: {variant: {"metrics", "verdicts", "_seeds", "_counts"}}}}}``: every attack of
    every variant's cells, seed-aggregated, with what its verdicts at ``max_fpr`` do on the test rows."""
    out: dict = {}
    for q, targets in layout.items():
        for target, tiers in targets.items():
            for tier, variants in tiers.items():
                for variant, by_seed in variants.items():
                    results = [_load(plan, work, lab) for lab in by_seed.values()]
                    attacks = list(results[0]["test"]["probability"])
                    per_seed = [analysis.cell_verdicts(plan.cells[lab].folder(work) / "heads", r, max_fpr)
                                for lab, r in zip(by_seed.values(), results)]
                    out.setdefault(q, {}).setdefault(target, {}).setdefault(tier, {})[variant] = {
                        "metrics": analysis.aggregate(results, attacks),
                        "ci95_first_seed": {a: {m: results[0]["metrics"][a][m].get("ci95")
                                                for m in ("tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")}
                                            for a in attacks},
                        "verdicts": analysis.aggregate_verdicts(per_seed, attacks),
                        "_seeds": list(by_seed),
                        "_counts": results[0]["counts"],
                    }
    return out


def _with_gray(black: dict, gray_agg: dict | None, gray: list[str]) -> dict:
    """A table row set of black-box cells with the gray-box attacks of the matching gray-box cells inserted
    before the blind baseline (the black-box cells' counts and seeds are kept: the splits are the same)."""
    if not gray_agg:
        return black
    out = {k: v for k, v in black.items() if k != "blind"}
    out.update({a: gray_agg[a] for a in gray})
    out["blind"] = black["blind"]
    for k in ("_counts", "_seeds"):
        out[k] = black[k]
    return out


def done_result(done: dict, name: str) -> dict:
    return done[name]["result"]


def _timings(done: dict) -> dict:
    stages: dict = {}
    for name, d in done.items():
        s = stages.setdefault(d["stage"], {"tasks": 0, "seconds": 0.0, "cpu_seconds": 0.0})
        s["tasks"] += 1
        s["seconds"] = round(s["seconds"] + d["seconds"], 1)
        s["cpu_seconds"] = round(s["cpu_seconds"] + d["cpu_seconds"], 1)
    return stages


def run_experiment(cfg: ExperimentConfig | None = None, out: str | Path = "docs", workdir: str | Path | None = None,
                   quiet: bool = False) -> dict:
    """Run the study; write ``out/RESULTS.md``, its PNG plots and ``out/experiment.json``; returns the numbers.

    Everything heavy is cached in ``workdir`` (default ``$AUDIT_HOME/experiment``) under hashes of its settings,
    so a rerun after an interruption continues where it stopped and a changed setting recomputes only what it
    affects.
    """
    from ..attacks import audit_home
    from ..progress import progress
    from .plots import write_plots
    from .report import write_results

    cfg = (cfg or ExperimentConfig()).validate()
    out = Path(out)
    work = Path(workdir) if workdir else audit_home() / "experiment"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    work.mkdir(parents=True, exist_ok=True)
    cfg.save(work / CONFIG_FILE)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    plan = make_plan(cfg, work)
    log.info("experiment: %d tasks in %s", len(plan.tasks), work)
    # Times of each task when it was computed; a task served from the cache keeps the times of the run that
    # computed it, so the report's timings always describe computing everything.
    ledger_path = work / TIMINGS_FILE
    ledger = json.loads(ledger_path.read_text(encoding="utf-8")) if ledger_path.is_file() else {}
    computed: list[str] = []

    with progress(total=len(plan.tasks), desc="experiment", unit="task", quiet=quiet) as bar:
        def on_done(name: str, info: dict) -> None:
            result = info["result"]
            if isinstance(result, dict) and result.get("cached") and name in ledger:
                info.update(seconds=ledger[name]["seconds"], cpu_seconds=ledger[name]["cpu_seconds"])
            else:
                computed.append(name)
                ledger[name] = {"seconds": info["seconds"], "cpu_seconds": info["cpu_seconds"],
                                "stage": info["stage"],
                                "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                atomic_write_text(ledger_path, json.dumps(ledger, indent=1) + "\n")
            bar.update(1)

        done = run_tasks(plan.tasks, cfg.workers, on_done)
    tasks_wall = time.perf_counter() - t0
    nums = compute_numbers(cfg, plan, work, done)
    nums["config"] = cfg.to_dict()
    nums["run"] = {
        "started": started.isoformat(timespec="seconds"),
        "tasks_seconds": round(tasks_wall, 1),
        "computed_now": len(computed),
        "reused": len(done) - len(computed),
        "stages": _timings(done),
        "tasks": {n: {k: d[k] for k in ("seconds", "cpu_seconds", "stage")} for n, d in done.items()},
        # Wall-clock on an idle machine: the same schedule replayed with each task's measured CPU seconds.
        "idle_estimate_seconds": round(simulate(plan.tasks, {n: d["cpu_seconds"] for n, d in done.items()},
                                                cfg.workers), 1),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "workdir": str(work),
    }
    nums["data"] = {"aux": plan.data["aux"], "rq3": plan.data["rq3"]}
    out.mkdir(parents=True, exist_ok=True)
    nums["plots"] = write_plots(nums, out)
    nums["run"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(nums, out / "RESULTS.md")
    atomic_write_text(out / NUMBERS_FILE, json.dumps(_clean(nums), indent=1) + "\n")
    return nums


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
