"""The Python API. The CLI is a thin layer over these functions; pipelines call them in-process."""

from __future__ import annotations

import os
from pathlib import Path

from .config import check_device
from .errors import UsageError
from .paths import check_outputs
from .results import EvaluateResult, FeaturesSummary, ScanSummary, TrainResult


def list_models() -> list[dict]:
    """Registered targets, embedders and captioners with where each loads from."""
    from .registry import CAPTIONERS, EMBEDDERS, TARGETS
    from . import targets  # noqa: F401  (registers the built-ins)

    rows = []
    for kind, reg in (("target", TARGETS), ("embedder", EMBEDDERS), ("captioner", CAPTIONERS)):
        for e in reg.entries():
            # A source may be a callable: real models say where they would load from at the time of asking.
            source = e.source() if callable(e.source) else e.source
            rows.append({"kind": kind, "name": e.name, "source": source, "family": e.family,
                         "description": e.description})
    return rows


def build_toy_world(out: str | Path, quick: bool = False, seed: int = 0, device: str = "cpu") -> dict:
    """Rebuild the toy world from a seed (see ``audit.toy.build``)."""
    from .toy.build import ToyBuildConfig, build_world

    check_device(device)
    cfg = ToyBuildConfig.quick(seed) if quick else ToyBuildConfig(seed=seed)
    return build_world(Path(out), cfg, device)


def toy_aux_data(out: str | Path, n_members: int = 200, n_nonmembers: int = 200, seed: int = 0) -> Path:
    """An auxiliary ImageFolder for the bundled toy target."""
    from .toy import bundle_path
    from .toy.data import write_aux_folder

    if n_members < 0 or n_nonmembers < 0:
        raise UsageError("--n-members and --n-nonmembers must be >= 0")
    return write_aux_folder(Path(out), n_members, n_nonmembers, seed, world_dir=bundle_path("target").parent)


# ------------------------------------------------------------------------- features, check, scan, demo

def __getattr__(name: str):
    # Auditor and Verdict load lazily: `audit --help` should not pay for h5py/numpy imports.
    if name == "Auditor":
        from .auditor import Auditor

        return Auditor
    if name == "Verdict":
        from .verdict import Verdict

        return Verdict
    if name == "Client":
        from .service.client import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cluster(ray: str | None, workers: int, threads: int, device: str):
    """The ClusterConfig of ``ray=ADDRESS``, or None to run on this machine (where --workers/--threads mean
    nothing)."""
    if ray is None:
        if workers != 1 or threads:
            raise UsageError("--workers and --threads apply to runs on a Ray cluster; add --ray ADDRESS (or local)")
        return None
    from .cluster import ClusterConfig

    return ClusterConfig(address=str(ray), workers=workers, threads=threads, device=device).validate()


def featurize(target: str, data: str | Path, out: str | Path, *, embedder: str | None = None,
              captioner: str | None = None, n_gen: int = 2, steps: int = 25, guidance: float = 1.0, seed: int = 0,
              batch_size: int | str = 8, caption_tokens: int = 30, pixel_size: int = 32, resume: bool = False,
              quiet: bool = False, device: str = "cpu", allow_pickle: bool = False, on_batch=None,
              ray: str | None = None, workers: int = 1, threads: int = 0, tier: str = "black-box",
              graybox_timesteps=None, var_strengths=None, n_var: int | None = None,
              reference: str | None = None) -> FeaturesSummary:
    """Features of every row of an ImageFolder into an HDF5 feature store; returns a summary (rows, statuses).

    ``tier``: ``black-box`` (generate, caption, embed), ``gray-box`` (the target's own denoising errors; a local
    diffusion target only), ``variation`` (the target's img2img variations of each image) or ``all``;
    ``graybox_timesteps`` overrides the gray-box timesteps, ``var_strengths`` and ``n_var`` the variation sweep.
    ``batch_size="auto"`` picks the largest batch that fits in the memory available (compiled targets; see
    ``audit.runtime.memory``), or, resuming, the batch size the store was begun with.
    ``ray``: compute the batches on a Ray cluster (``local``, ``auto``, ``ray://HEAD:10001``) with ``workers``
    actors of ``threads`` threads each (0: this machine's single-process setting); the store is the same.
    ``reference``: a second model (the base of a fine-tune) whose features are computed with the same seeds and
    noise and stored beside the target's (``audit.features.reference``); about twice the cost."""
    import dataclasses

    from .features.compute import FeaturesConfig, Models, compute_store, resolve_batch_size
    from .features.store import refuse_existing
    from .imagefolder import require_folder
    from .tiers import GRAY_BOX, VARIATION

    auto = batch_size == "auto"
    extra = {"graybox_timesteps": tuple(graybox_timesteps)} if graybox_timesteps else {}
    if var_strengths:
        extra["var_strengths"] = tuple(var_strengths)
    if n_var is not None:
        extra["n_var"] = int(n_var)
    cfg = FeaturesConfig(target=str(target), embedder=embedder or "", captioner=captioner or "", n_gen=n_gen,
                         steps=steps, guidance=guidance, seed=seed, batch_size=8 if auto else _count(batch_size),
                         caption_tokens=caption_tokens, pixel_size=pixel_size, tier=tier,
                         reference=_model_spec(reference), **extra).validate()
    cluster = _cluster(ray, workers, threads, device)
    if auto and cluster is not None:
        # The memory that decides is each worker's, which the driver cannot see before the actors start.
        raise UsageError("--batch-size auto measures this machine's memory; with --ray give a number (each worker "
                         "checks that its batch fits before it starts)")
    check_outputs({"--out": out}, {"--data": data, "--target": _local(target), "--embedder": _local(embedder),
                                   "--captioner": _local(captioner)})
    refuse_existing(out, resume)  # the user's paths fail here, before any model loads
    require_folder(data)
    if VARIATION in cfg.tiers:
        from .targets.variation import check_variation_spec

        check_variation_spec(str(target))  # a DALL-E target fails here, before any model loads
    if cluster is not None:
        from .cluster import featurize_on_ray

        if GRAY_BOX in cfg.tiers:
            from .targets.denoiser import check_graybox_spec

            check_graybox_spec(str(target))  # an HTTP or DALL-E target fails here, not in every worker
            if cfg.reference:
                check_graybox_spec(cfg.reference)
        return FeaturesSummary.from_dict(featurize_on_ray(data, out, cfg, cluster, allow_pickle=allow_pickle,
                                                          resume=resume, quiet=quiet, on_batch=on_batch))
    models = Models.load(str(target), embedder, captioner, device, allow_pickle, graybox=GRAY_BOX in cfg.tiers,
                         reference=cfg.reference or None)
    if auto:
        cfg = dataclasses.replace(cfg, batch_size=resolve_batch_size(models, cfg, out if resume else None))
    return FeaturesSummary.from_dict(compute_store(data, out, models, cfg, resume=resume, quiet=quiet,
                                                   on_batch=on_batch))


def _local(spec: str | None) -> str | None:
    """A model spec that names a local path (an input that outputs must not replace), else None."""
    return spec if spec and os.path.exists(spec) else None


def _model_spec(spec: str | None) -> str:
    """A model spec as workers on other processes can load it: an existing folder made absolute ("" for none)."""
    if not spec:
        return ""
    return str(Path(spec).resolve()) if Path(spec).is_dir() else str(spec)


def _count(value: int | str) -> int:
    """--batch-size: a positive integer (or ``auto``, handled by the caller)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--batch-size must be a positive integer or auto, got {value!r}") from None


def check(image: str | Path, caption: str | None = None, *, target: str, heads: str | Path | None = None,
          embedder: str | None = None, captioner: str | None = None, attack: str | None = None,
          device: str = "cpu", allow_pickle: bool = False, max_fpr: float = 0.01, decision: str = "budget",
          max_miss: float | None = None, reference: str | None = None,
          evidence: str | Path | None = None, tier: str | None = None):
    """The Verdict for one image (with its caption; without one the captioner writes it): ``member``,
    ``non-member`` or ``inconclusive`` at the false-positive budget ``max_fpr`` (``decision="balanced"``: the
    two-way rule); see ``audit.attacks.decision``. ``evidence``: a database (file or URL) to log the verdict
    in (``audit.evidence``); the record's id is then the Verdict's ``evidence_id`` attribute. ``tier``: score
    only the heads' attacks of these tiers (``variation``, ``all``, a comma list; None: every tier they read),
    computing only those tiers' features."""
    from .auditor import Auditor, image_row
    from .imagefolder import load_image

    # An unreadable image fails before any model loads (the Auditor checks the verdict rule before it loads them).
    image_row(image, caption)
    pixels = load_image(image)
    log = _evidence_log(evidence)
    auditor = Auditor(target, heads, embedder, captioner, attack, device=device, allow_pickle=allow_pickle,
                      max_fpr=max_fpr, decision=decision, max_miss=max_miss, reference=reference, tier=tier)
    verdict = auditor.check(image, caption, pixels=pixels)
    if log is not None:
        from .evidence import file_sha256, verdict_record

        verdict.evidence_id = log.append(verdict_record(verdict.to_dict(), auditor, file_sha256(image)))["id"]
    return verdict


def _evidence_log(evidence: str | Path | None):
    """The EvidenceLog of ``--evidence`` (opened before any model loads, so a bad URL fails fast), or None."""
    if evidence is None:
        return None
    from .evidence import EvidenceLog

    return EvidenceLog(evidence)


def log_scan_results(log, results: str | Path, auditor, job_id: str) -> int:
    """Append a scan's result lines to the evidence log, each row once (a resumed scan logs only its new rows);
    returns how many records were added."""
    from .evidence import file_sha256, verdict_record
    from .report.jsonl import read_jsonl

    before = log.count(job_id)
    for line in read_jsonl(results)[0]:
        try:
            digest = file_sha256(line["image"])
        except (OSError, TypeError, KeyError):
            digest = None
        log.append(verdict_record(line, auditor, digest, job_id=job_id, row_id=line.get("id"), source="scan"),
                   skip_existing=True)
    return log.count(job_id) - before


def scan(folder: str | Path, out: str | Path, *, target: str, heads: str | Path | None = None,
         embedder: str | None = None, captioner: str | None = None, attack: str | None = None,
         report: str | Path | None = None, resume: bool = False, batch_size: int = 8, quiet: bool = False,
         device: str = "cpu", allow_pickle: bool = False, max_fpr: float = 0.01, decision: str = "budget",
         max_miss: float | None = None, ray: str | None = None, workers: int = 1, threads: int = 0,
         reference: str | None = None, evidence: str | Path | None = None,
         tier: str | None = None) -> ScanSummary:
    """Verdicts for every image of a folder, one JSONL line each (resumable); optionally an HTML report.
    ``max_fpr``, ``decision``, ``max_miss``: the verdict rule, as for ``check``. ``evidence``: a database to log
    every row's verdict in, once per row of the results file (its job id is in the summary's ``evidence``).
    ``tier``: score only the heads' attacks of these tiers, as for ``check``.

    ``ray``: score the batches on a Ray cluster, as ``featurize`` does; the results are the same lines. Its HTML
    report shows the queries without their generated images (the driver holds no target to regenerate them)."""
    from .attacks.decision import check_budget
    from .auditor import Auditor, write_scan_html
    from .imagefolder import require_folder
    from .report.jsonl import check_results, refuse_existing_results

    cluster = _cluster(ray, workers, threads, device)
    require_folder(folder)  # the user's paths fail here, before any model loads
    check_outputs({"--out": out, "--report": report}, {"DIR": folder, "--heads": heads})
    refuse_existing_results(out, resume)
    if resume and Path(out).exists():
        check_results(out)  # not a results file: refused unchanged, before any model loads
    rule = dict(max_fpr=max_fpr, decision=decision, max_miss=max_miss)
    if tier is not None:  # every Ray worker's Auditor scores the same attacks
        from .tiers import parse_tier

        parse_tier(tier)  # a bad value fails here, before any model loads
        rule["tier"] = tier
    if reference:  # the Auditor's argument, handed to every Ray worker's Auditor with the rule
        rule["reference"] = _model_spec(reference)
    if evidence is not None and cluster is not None:
        raise UsageError("--evidence logs verdicts from this machine's models; it does not apply with --ray yet")
    log = _evidence_log(evidence)
    if cluster is not None:
        from .cluster import scan_on_ray

        check_budget(max_fpr, max_miss, decision)  # on this machine, before the workers build their Auditors

        summary = scan_on_ray(folder, out, cluster, target=target, heads=heads, embedder=embedder,
                              captioner=captioner, attack=attack, batch_size=batch_size, allow_pickle=allow_pickle,
                              resume=resume, quiet=quiet, **rule)
        generate = None
    else:
        auditor = Auditor(target, heads, embedder, captioner, attack, device=device, allow_pickle=allow_pickle,
                          batch_size=batch_size, **rule)
        summary = auditor.scan(folder, out, resume=resume, quiet=quiet)
        generate = auditor.regenerate if auditor.generates else None
        if log is not None:
            import hashlib

            job = "scan-" + hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:24]
            summary["evidence"] = {"db": log.url, "job_id": job,
                                   "added": log_scan_results(log, out, auditor, job)}
    if report is not None:
        summary["report"] = write_scan_html(out, report, generate=generate, images_root=folder)
    return ScanSummary.from_dict(summary)


def evidence_verify(db: str | Path) -> dict:
    """Check an evidence log's whole hash chain: ``{"ok", "records", "first_bad", "head"}``."""
    from .evidence import EvidenceLog

    _existing_db(db)
    return EvidenceLog(db).verify()


def evidence_export(db: str | Path, out: str | Path, since: str | None = None, until: str | None = None,
                    job: str | None = None) -> dict:
    """Write an evidence log's records (optionally a time range, ``since <= time < until`` in ISO UTC, or one
    job) as JSONL, each with its in-toto Statement; returns ``{"out", "records"}``."""
    from .evidence import EvidenceLog, export_jsonl

    _existing_db(db)
    return {"out": str(out), "records": export_jsonl(EvidenceLog(db), out, since=since, until=until, job=job)}


def _existing_db(db: str | Path) -> None:
    """A file path must name an existing database: reading a log never creates an empty one."""
    from .errors import InputError

    if "://" not in str(db) and not Path(db).is_file():
        raise InputError(f"{db}: no such evidence database")


def serve(config) -> None:
    """Run the auditing service (``audit.service.ServiceConfig``) until interrupted."""
    from .service import serve as _serve

    _serve(config)


def demo(workdir: str | Path | None = None, quiet: bool = False, **settings) -> dict:
    """The whole audit on the bundled toy world: aux data, features, train, evaluate, check on held-out images."""
    from .demo import run_demo

    return run_demo(workdir, quiet=quiet, **settings)


def train(store: str | Path, out: str | Path, attacks: str | list[str] | None = None, seed: int | None = None,
          register: bool = False, config=None, quiet: bool = False, folds: int | None = None,
          test_fraction: float | None = None, **options) -> TrainResult:
    """Train the attack heads (and the blind baseline) on a feature store; write ONNX heads + heads.json to
    ``out`` and, with ``register``, register them as the store target's default heads, which check/scan use
    without ``heads`` (nothing is registered unless asked: ``audit heads use`` does it later).

    ``folds``: K >= 2 cross-fits K heads per attack on every labelled row outside the test split and calibrates on
    all their out-of-fold scores (``audit.attacks.crossfit``); 0, one train/validation split; None, the
    ``config``'s folds, or ``DEFAULT_FOLDS`` (5, as ``audit train``) without a config.
    ``test_fraction``: the share of rows held out as the test split (default 0.25; 0 only with ``folds``); the
    rest is split 2:1 into train and validation (or dealt into the folds).

    ``attacks``: a comma-separated subset, or None / ``"all"`` for every attack whose features the store holds
    (with a ``config``, None keeps its attacks).
    ``options`` override fields of ``audit.attacks.TrainConfig`` (epochs, lr, patience, ...).
    Returns the heads folder, where they were registered (or None) and their heads.json.
    """
    import dataclasses

    from .attacks import TrainConfig, parse_attacks, register_heads, train_heads
    from .attacks.inputs import available_attacks
    from .manifest import file_sha256
    from .errors import ArtifactError
    from .features.store import FeatureStore

    check_outputs({"--out": out}, {"STORE": store})
    cfg = config or TrainConfig()
    fs = FeatureStore.open(store)
    if (attacks is None and config is None) or (isinstance(attacks, str) and attacks.strip().lower() == "all"):
        cfg = dataclasses.replace(cfg, attacks=available_attacks(fs.keys))
    elif attacks is not None:
        cfg = dataclasses.replace(cfg, attacks=parse_attacks(attacks if isinstance(attacks, str) else ",".join(attacks)))
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    if folds is None and config is None:
        from .attacks.crossfit import DEFAULT_FOLDS

        folds = DEFAULT_FOLDS
    if folds is not None:
        cfg = dataclasses.replace(cfg, folds=int(folds))
    if test_fraction is not None:
        cfg = dataclasses.replace(cfg, **_fractions(test_fraction, bool(cfg.folds)))
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise UsageError(f"unknown training option(s) {unknown}")
    cfg = dataclasses.replace(cfg, **options).validate()
    if not fs.complete:
        raise ArtifactError(f"{store}: feature store is incomplete ({fs.n_committed} of {fs.n_rows} rows); finish it "
                            "with `audit features ... --resume` before training")
    info = train_heads(fs.read(ok_only=True), out, cfg, fs.manifest, file_sha256(store), str(Path(store).resolve()),
                       quiet=quiet)
    registered = register_heads(out) if register else None
    return TrainResult(heads=str(out), registered=str(registered) if registered else None, info=info)


def heads_list() -> list[dict]:
    """The registered heads (one default per target: ``key`` NAME-HASH, provenance) and the bundled toy heads."""
    from .attacks.heads import list_registered

    return list_registered()


def heads_use(heads: str | Path) -> dict:
    """Make a heads folder the default of the target it was trained for (a copy in the registry); its provenance."""
    from .attacks.heads import folder_provenance, read_heads_json, register_heads

    dest = register_heads(heads)
    return {"key": dest.name, **folder_provenance(dest, read_heads_json(dest / "heads.json"), "registered")}


def heads_remove(name: str) -> list[str]:
    """Unregister heads by key (as ``heads_list`` gives it) or target name; returns the folders removed."""
    from .attacks.heads import remove_registered

    return [str(p) for p in remove_registered(name)]


def _fractions(test_fraction: float, folds: bool) -> dict:
    """``--test-fraction`` as TrainConfig's train/validation fractions (2:1, as the default 50/25/25)."""
    low_ok = folds and test_fraction == 0
    if not (0 < test_fraction < 1 or low_ok):
        raise UsageError(f"--test-fraction must be in (0, 1){' or 0 with --folds' if folds else ''}, got "
                         f"{test_fraction}")
    rest = 1.0 - float(test_fraction)
    return {"train_fraction": round(rest * 2 / 3, 10), "val_fraction": round(rest - round(rest * 2 / 3, 10), 10)}


def evaluate(store: str | Path, heads: str | Path | None = None, json_out: str | Path | None = None,
             plot: str | Path | None = None, n_boot: int = 1000, seed: int = 0,
             report: str | Path | None = None, max_fpr: float = 0.01, decision: str = "budget",
             max_miss: float | None = None) -> EvaluateResult:
    """Metrics of each attack on the heads' test split of ``store``, with bootstrap 95% CIs, and what its
    verdicts at the budget ``max_fpr`` (or ``decision="balanced"``) do there: the fraction of rows decided, FPR,
    precision and TPR of the decided verdicts (each attack's ``verdicts`` entry).

    ``heads`` defaults to the heads registered for the store's target. With ``json_out`` the result is written
    there and a ROC plot beside it (``plot`` overrides where). With ``report`` an HTML report is written there.
    """
    from .attacks import evaluate_heads, resolve_heads
    from .manifest import file_sha256
    from .config import atomic_write_text
    from .features.store import FeatureStore
    import json

    from .attacks.decision import check_budget

    if n_boot < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {n_boot}")
    check_budget(max_fpr, max_miss, decision)
    if plot is None and json_out is not None:
        plot = Path(json_out).with_suffix(".png")
    check_outputs({"--json": json_out, "--plot": plot, "--report": report}, {"STORE": store, "--heads": heads})
    fs = FeatureStore.open(store)
    h = resolve_heads(heads, fs.manifest.get("target"))
    result = evaluate_heads(fs.read(ok_only=True), h, fs.manifest, str(store), file_sha256(store), n_boot, seed,
                            plot, decision, max_fpr, max_miss)
    if json_out is not None:
        atomic_write_text(Path(json_out), json.dumps(result, indent=2) + "\n")
    if report is not None:
        from .report.html import write_evaluate_report

        result["report"] = str(write_evaluate_report(result, report, store=store, heads=h.path))
    return EvaluateResult.from_dict(result)


def report(results: str | Path, out: str | Path, store: str | Path | None = None,
           heads: str | Path | None = None, images: str | Path | None = None) -> str:
    """An HTML report from files already written: a scan's JSONL results, or `audit evaluate --json` output
    (whose ROC curves and images are recomputed from the store and heads it names, or those given here).
    ``images``: the scanned folder, the only place a scan report reads query images from (by row id); default:
    the results file's folder."""
    import json

    from .errors import InputError
    from .imagefolder import UserFileError, read_user_file
    from .report.html import write_evaluate_report, write_scan_report
    from .report.jsonl import MAX_RESULTS_BYTES

    path = Path(results)
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such file")
    check_outputs({"--out": out}, {"RESULTS": path, "--store": store, "--heads": heads, "--images": images})
    try:
        data = read_user_file(path, None, MAX_RESULTS_BYTES, "a results file")
    except UserFileError as exc:
        raise InputError(str(exc)) from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        doc = None  # several JSON lines (or a torn one): scan results
    if isinstance(doc, dict) and "attacks" in doc:
        return str(write_evaluate_report(doc, out, store=store, heads=heads))
    return str(write_scan_report(path, out, store=store, images_root=images))


# ------------------------------------------------------------------------------------------------ export

def export(target: str, out: str | Path, *, embedder: str | None = None, captioner: str | None = None,
           device: str = "cpu", precision: str = "fp32", allow_pickle: bool = False, quiet: bool = False) -> dict:
    """Compile ``target`` and its embedder and captioner (defaults: the target's) to validated ONNX graphs in
    ``out``; ``--target out`` then runs on onnxruntime with the compiled embedder/captioner as its defaults.
    Returns export.json's content (components, graphs' tolerances met, end-to-end checks)."""
    from .export import ExportConfig, export_all

    cfg = ExportConfig(target=str(target), embedder=embedder or "", captioner=captioner or "", device=device,
                       precision=precision, allow_pickle=allow_pickle)
    return export_all(cfg, out, quiet=quiet)


# ------------------------------------------------------------------------------------------ the study

def experiment(out: str | Path = "docs", *, workdir: str | Path | None = None, quick: bool = False,
               workers: int | None = None, config=None) -> dict:
    """Run the paper's study on the toy world and write ``out``/RESULTS.md, its plots and experiment.json.

    ``config`` (an ``audit.experiments.ExperimentConfig``) overrides the full (or ``quick``) settings. Returns
    every number of the report (the content of experiment.json).
    """
    import dataclasses

    from .experiments import ExperimentConfig, run_experiment

    cfg = config or (ExperimentConfig.quick() if quick else ExperimentConfig())
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=workers)
    return run_experiment(cfg, out, workdir)


# ------------------------------------------------------------------------------------ set-level inference

def set_test(scores, heads: str | Path | None = None, *, null=None, attack: str | None = None,
             store: str | Path | None = None, method: str = "permutation", n_resamples: int = 10_000,
             seed: int = 0, alpha: float = 0.05) -> dict:
    """One-sided test that a set of one owner's images was trained on, from their per-image scores.

    ``scores``: the images' P(member) from ``attack`` of ``heads`` (e.g. the ``probability`` of each verdict of a
    scan). The null comes from held-out NON-members only: ``null`` if given, else the heads' test-split
    non-members (never fitted on) scored from the feature store the heads were trained on (or ``store``).
    ``method``: ``permutation`` (default), ``fisher`` or ``stouffer`` (see ``audit.attacks.setlevel``).
    Returns ``{"p_value", "k", "statistic", "method", "n_null", "null_from", "verdict", "alpha", "min_p_value",
    "reason"}``: ``verdict`` is ``member`` when p <= ``alpha``, else ``inconclusive`` (a set test has no
    non-member verdict; ``reason`` says why, including when alpha is below the smallest p-value it can give).
    """
    import numpy as np

    from .attacks.setlevel import heads_null_scores
    from .attacks.setlevel import set_test as _set_test

    if null is None:
        if heads is None:
            raise UsageError("set_test needs the heads whose scores these are (for the non-member null) or a null")
        null, source = heads_null_scores(heads, attack, str(store) if store else None)
    else:
        source = {"given": True, "n": int(np.size(null))}
    result = _set_test(scores, null, method, n_resamples, seed, alpha)
    result["null_from"] = source
    return result
