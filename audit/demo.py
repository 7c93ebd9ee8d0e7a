"""`audit demo`: the whole audit on the bundled toy world, end to end, with every number computed here.

Steps: an auxiliary ImageFolder of known members and non-members (the same distribution) -> the models compiled
to ONNX (``runtime="onnx"``, the default) -> features -> heads
(train/validation/test split) -> evaluation on the test split -> verdicts on a few held-out toy images that are in
no split of the auxiliary set. The settings below were chosen to finish in under five minutes on two CPU cores.

The verdicts are three-way at a false-positive budget of 5%: the 200 + 200 auxiliary rows leave 50 validation
non-members, and a split-conformal threshold needs at least 1/budget - 1 of them (99 for the 1% default of
``check``/``scan``), so 1% cannot be resolved here; the printed report says so. ``folds=5`` (cross-fitted heads,
the default of ``audit train``) calibrates on all 150 non-members outside the test split and resolves 1%.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .attacks.decision import DEFAULT_MAX_FPR, check_budget
from .config import Config
from .errors import UsageError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig(Config):
    n_members: int = 200
    n_nonmembers: int = 200
    n_check: int = 5  # held-out members and as many held-out non-members checked at the end
    n_gen: int = 2
    steps: int = 10
    batch_size: int = 32
    seed: int = 0
    epochs: int = 200
    attacks: str = "all"  # as `audit train --attacks`; the blind baseline is always trained
    train_threads: int = 1  # the heads are tiny: one thread fits them as fast, and holds up on a busy machine
    # torch threads for generating, captioning and embedding. One: torch's two-thread default collapses when the
    # other core is busy (a UNet step measured going from 0.5 s to 3.3 s), one thread does not. 0: default.
    threads: int = 1
    # onnx: compile the target, CLIP and BLIP with `audit export` first (a minute on 2 cores), then featurise and
    # check on onnxruntime, the tool's default path for real audits; torch: PyTorch eager throughout.
    runtime: str = "onnx"
    # 0: one train/validation split (what the README's demo table was measured with); K >= 2: cross-fitted heads
    # (`audit train --folds K`), which resolve the 1% default from the same 200 + 200 rows.
    folds: int = 0
    # The false-positive budget of the held-out verdicts and the evaluation's verdict table. 50 validation
    # non-members resolve budgets down to 1/51; 0.05 leaves two of them above the member threshold.
    max_fpr: float = 0.05


RUNTIMES = ("onnx", "torch")


def _models(world_dir: Path | None) -> tuple[str, str, str, Path]:
    """(target, embedder, captioner, world folder): the bundled toy models by name, or those of another world."""
    if world_dir is None:
        from .toy import bundle_path

        return "toy", "toy-clip", "toy-blip", bundle_path("target").parent
    world_dir = Path(world_dir)
    return str(world_dir / "target"), str(world_dir / "clip"), str(world_dir / "blip"), world_dir


def _held_out(world_dir: Path, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Member and non-member indices for the final checks, drawn apart from the auxiliary set's seed."""
    from .toy.build import load_world_config

    world = load_world_config(world_dir)
    need_m, need_n = cfg.n_members + cfg.n_check, cfg.n_nonmembers + cfg.n_check
    if world.n_members < need_m or world.n_nonmembers < need_n:
        raise UsageError(f"the toy world in {world_dir} has {world.n_members} members and {world.n_nonmembers} "
                         f"non-members; the demo needs {need_m} and {need_n}")
    rng = np.random.default_rng([cfg.seed, 7])
    return (rng.choice(world.n_members, cfg.n_check, replace=False),
            rng.choice(world.n_nonmembers, cfg.n_check, replace=False))


def run_demo(workdir: str | Path | None = None, quiet: bool = False, world_dir: str | Path | None = None,
             **settings) -> dict:
    """Run the demo; returns timings, the evaluation (``api.evaluate``'s dict) and the held-out verdicts."""
    from . import api
    from .auditor import Auditor
    from .imagefolder import read_imagefolder
    from .toy import scenes
    from .toy.data import split_rows, write_aux_folder

    cfg = DemoConfig(**settings)
    target, embedder, captioner, world = _models(world_dir)
    cleanup = workdir is None
    work = Path(tempfile.mkdtemp(prefix="audit-demo-")) if cleanup else Path(workdir)
    if not cleanup:
        taken = [p.name for p in (work / "aux", work / "check", work / "export", work / "features.h5", work / "heads")
                 if p.exists()]
        if taken:
            raise UsageError(f"{work}: already holds {', '.join(taken)} from an earlier demo; use another --workdir "
                             "or delete them")
    if cfg.threads < 0 or cfg.train_threads < 0:
        raise UsageError("threads must be >= 0")
    check_budget(cfg.max_fpr)
    if cfg.runtime not in RUNTIMES:
        raise UsageError(f"unknown demo runtime {cfg.runtime!r}; valid runtimes are {', '.join(RUNTIMES)}")
    times: dict[str, float] = {}
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    def lap(name: str) -> None:
        times[name] = round(time.perf_counter() - started - sum(times.values()), 1)

    try:
        check_m, check_n = _held_out(world, cfg)
        aux = write_aux_folder(work / "aux", cfg.n_members, cfg.n_nonmembers, cfg.seed, world_dir=world,
                               exclude_members=check_m, exclude_nonmembers=check_n)
        m_img, m_cap = split_rows(world, "members", check_m)
        n_img, n_cap = split_rows(world, "nonmembers", check_n)
        check_dir = scenes.write_imagefolder(work / "check", np.concatenate([m_img, n_img]), m_cap + n_cap,
                                             [True] * len(m_cap) + [False] * len(n_cap), prefix="heldout")
        lap("data")
        if cfg.runtime == "onnx":
            compiled = work / "export"
            api.export(target, compiled, embedder=embedder, captioner=captioner, quiet=quiet)
            target, embedder, captioner = str(compiled), str(compiled / "embedder"), str(compiled / "captioner")
            lap("export")
        store = work / "features.h5"
        feats = api.featurize(target, aux, store, embedder=embedder, captioner=captioner, n_gen=cfg.n_gen,
                              steps=cfg.steps, seed=cfg.seed, batch_size=cfg.batch_size, quiet=quiet)
        lap("features")
        trained = api.train(store, work / "heads", attacks=cfg.attacks, seed=cfg.seed, register=False,
                            epochs=cfg.epochs, threads=cfg.train_threads, folds=cfg.folds)
        lap("train")
        evaluation = api.evaluate(store, work / "heads", json_out=work / "evaluate.json", seed=cfg.seed,
                                  max_fpr=cfg.max_fpr)
        lap("evaluate")
        auditor = Auditor(target, work / "heads", embedder, captioner, batch_size=cfg.batch_size,
                          max_fpr=cfg.max_fpr)
        default_budget = auditor.heads.decision(auditor.attack, max_fpr=DEFAULT_MAX_FPR)
        rows = read_imagefolder(check_dir)
        checks = [{**v.to_dict(), "truly_member": r.member} for v, r in zip(auditor.score_rows(rows), rows)]
        lap("check")
    finally:
        torch.set_num_threads(previous_threads)
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "workdir": None if cleanup else str(work),
        "config": cfg.to_dict(),
        "models": {"target": feats.target, "embedder": feats.embedder, "captioner": feats.captioner},
        "features": {"rows": feats.rows, "ok": feats.ok, "status": feats.status},
        "default_attack": trained.info.get("default_attack"),
        "evaluation": evaluation.to_dict(),
        "checks": checks,
        "decision": auditor.decision.to_dict(),
        # What the 1% default of check/scan would do with these heads (whether it can be resolved at all).
        "default_budget": default_budget.to_dict(),
        "seconds": times,
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def format_results(result: dict) -> str:
    """The demo's printed report: settings, the per-attack table, the blind baseline, held-out verdicts, timings."""
    from .attacks.decision import Decision
    from .attacks.evaluate import format_table
    from .verdict import VERDICTS

    cfg = result["config"]
    ev = result["evaluation"]
    lines = [
        f"toy world audit: {cfg['n_members']} members + {cfg['n_nonmembers']} non-members of the auxiliary set, "
        f"n_gen {cfg['n_gen']}, {cfg['steps']} denoising steps; target {result['models']['target']['name']} on "
        + ("onnxruntime (compiled by audit export)" if cfg.get("runtime") == "onnx" else "PyTorch eager"),
        "",
        "attacks on the test split (accuracy at the calibration rows' two-way threshold; verdicts at the budget below "
        "it):",
        format_table(ev),
    ]
    blind = ev.get("blind_baseline") or {}
    if blind.get("distribution_shift_warning"):
        lines.append(f"WARNING: {blind.get('message') or 'the blind baseline separates the auxiliary data'}")
    elif "blind" in ev["attacks"]:
        lines.append("blind baseline (query image and caption only, no generated image): not flagged, so the "
                     "auxiliary members and non-members do not differ in distribution by its test")
    for w in ev.get("warnings") or []:
        lines.append(f"warning: {w}")
    rule = Decision.from_dict(result["decision"])
    lines += ["", f"held-out images (in no split of the auxiliary set), attack {result['default_attack']}, verdicts at "
                  f"{rule.describe()}:"]
    if rule.max_fpr != DEFAULT_MAX_FPR:  # at the default itself, the rule's own notes above say it
        for note in (result.get("default_budget") or {}).get("notes") or []:
            lines.append(f"  (the 1% default of check/scan cannot be used here: {note})")
    for c in result["checks"]:
        truth = "member" if c["truly_member"] else "non-member"
        if c["status"] != "ok":
            lines.append(f"  {Path(c['image']).name}: truly {truth}; not scored ({c['status']}): {c['error']}")
            continue
        mark = "undecided" if c["verdict"] == "inconclusive" else ("right" if c["verdict"] == truth else "wrong")
        lines.append(f"  {Path(c['image']).name}: truly {truth:<10} verdict {c['verdict']:<12} P(member) "
                     f"{c['probability']:.3f} {mark}")
    counts = {v: sum(c.get("verdict") == v for c in result["checks"]) for v in VERDICTS}
    lines.append("  " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    secs = result["seconds"]
    lines += ["", "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
              + f"; total {result['total_seconds']:.0f} s"]
    if result.get("workdir"):
        lines.append(f"files: {result['workdir']} (features.h5, heads/, evaluate.json + ROC plot"
                     + (", export/)" if result["config"].get("runtime") == "onnx" else ")"))
    return "\n".join(lines)
