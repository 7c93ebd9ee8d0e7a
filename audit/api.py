"""The Python API. The CLI is a thin layer over these functions; pipelines call them in-process."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError


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

    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; valid devices are cpu, cuda")
    cfg = ToyBuildConfig.quick(seed) if quick else ToyBuildConfig(seed=seed)
    return build_world(Path(out), cfg, device)


def toy_aux_data(out: str | Path, n_members: int = 200, n_nonmembers: int = 200, seed: int = 0) -> Path:
    """An auxiliary ImageFolder for the bundled toy target."""
    from .toy import bundle_path
    from .toy.data import write_aux_folder

    if n_members < 0 or n_nonmembers < 0:
        raise UsageError("--n-members and --n-nonmembers must be >= 0")
    return write_aux_folder(Path(out), n_members, n_nonmembers, seed, world_dir=bundle_path("target").parent)


# ------------------------------------------------------------------------- features, check, scan, demo (A1)

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
              graybox_timesteps=None) -> dict:
    """Features of every row of an ImageFolder into an HDF5 feature store; returns a summary (rows, statuses).

    ``tier``: ``black-box`` (generate, caption, embed), ``gray-box`` (the target's own denoising errors; a local
    diffusion target only) or ``all``; ``graybox_timesteps`` overrides the gray-box timesteps.
    ``batch_size="auto"`` picks the largest batch that fits in the memory available (compiled targets; see
    ``audit.runtime.memory``), or, resuming, the batch size the store was begun with.
    ``ray``: compute the batches on a Ray cluster (``local``, ``auto``, ``ray://HEAD:10001``) with ``workers``
    actors of ``threads`` threads each (0: this machine's single-process setting); the store is the same."""
    import dataclasses

    from .errors import InputError
    from .features.compute import Backends, FeaturesConfig, compute_store, resolve_batch_size
    from .tiers import GRAY_BOX

    auto = batch_size == "auto"
    extra = {"graybox_timesteps": tuple(graybox_timesteps)} if graybox_timesteps else {}
    cfg = FeaturesConfig(target=str(target), embedder=embedder or "", captioner=captioner or "", n_gen=n_gen,
                         steps=steps, guidance=guidance, seed=seed, batch_size=8 if auto else _count(batch_size),
                         caption_tokens=caption_tokens, pixel_size=pixel_size, tier=tier, **extra).validate()
    cluster = _cluster(ray, workers, threads, device)
    if auto and cluster is not None:
        # The memory that decides is each worker's, which the driver cannot see before the actors start.
        raise UsageError("--batch-size auto measures this machine's memory; with --ray give a number (each worker "
                         "checks that its batch fits before it starts)")
    if Path(out).exists() and not resume:
        raise UsageError(f"{out}: feature store already exists; pass --resume to continue it, or delete it")
    if not Path(data).is_dir():
        raise InputError(f"{data}: not a folder" + (" (it is a file)" if Path(data).exists() else ""))
    if cluster is not None:
        from .cluster import featurize_on_ray

        if GRAY_BOX in cfg.tiers:
            from .targets.denoiser import check_graybox_spec

            check_graybox_spec(str(target))  # an HTTP or DALL-E target fails here, not in every worker
        return featurize_on_ray(data, out, cfg, cluster, allow_pickle=allow_pickle, resume=resume, quiet=quiet,
                                on_batch=on_batch)
    backends = Backends.load(str(target), embedder, captioner, device, allow_pickle, graybox=GRAY_BOX in cfg.tiers)
    if auto:
        cfg = dataclasses.replace(cfg, batch_size=resolve_batch_size(backends, cfg, out if resume else None))
    return compute_store(data, out, backends, cfg, resume=resume, quiet=quiet, on_batch=on_batch)


def _count(value: int | str) -> int:
    """--batch-size: a positive integer (or ``auto``, handled by the caller)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--batch-size must be a positive integer or auto, got {value!r}") from None


def check(image: str | Path, caption: str | None = None, *, target: str, heads: str | Path | None = None,
          embedder: str | None = None, captioner: str | None = None, attack: str | None = None,
          device: str = "cpu", allow_pickle: bool = False, max_fpr: float = 0.01, decision: str = "budget",
          max_miss: float | None = None, evidence: str | Path | None = None):
    """The Verdict for one image (with its caption; without one the captioner writes it): ``member``,
    ``non-member`` or ``inconclusive`` at the false-positive budget ``max_fpr`` (``decision="balanced"``: the
    two-way rule); see ``audit.attacks.decision``. ``evidence``: a database (file or URL) to log the verdict
    in (``audit.evidence``); the record's id is then the Verdict's ``evidence_id`` attribute."""
    from .attacks.decision import check_budget
    from .auditor import Auditor, image_row
    from .imagefolder import load_image

    # Bad arguments and unreadable images fail before any model loads.
    check_budget(max_fpr, max_miss, decision)
    image_row(image, caption)
    pixels = load_image(image)
    log = _evidence_log(evidence)
    auditor = Auditor(target, heads, embedder, captioner, attack, device=device, allow_pickle=allow_pickle,
                      max_fpr=max_fpr, decision=decision, max_miss=max_miss)
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
         evidence: str | Path | None = None) -> dict:
    """Verdicts for every image of a folder, one JSONL line each (resumable); optionally an HTML report.
    ``max_fpr``, ``decision``, ``max_miss``: the verdict rule, as for ``check``. ``evidence``: a database to log
    every row's verdict in, once per row of the results file (its job id is in the summary's ``evidence``).

    ``ray``: score the batches on a Ray cluster, as ``featurize`` does; the results are the same lines. Its HTML
    report shows the queries without their generated images (the driver holds no target to regenerate them)."""
    from .attacks.decision import check_budget
    from .auditor import Auditor, write_scan_html
    from .errors import InputError

    check_budget(max_fpr, max_miss, decision)
    cluster = _cluster(ray, workers, threads, device)
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: not a folder" + (" (it is a file)" if Path(folder).exists() else ""))
    if Path(out).exists() and Path(out).stat().st_size > 0 and not resume:
        raise UsageError(f"{out}: already exists; pass --resume to continue it, or delete it")
    rule = dict(max_fpr=max_fpr, decision=decision, max_miss=max_miss)
    if evidence is not None and cluster is not None:
        raise UsageError("--evidence logs verdicts from this machine's models; it does not apply with --ray yet")
    log = _evidence_log(evidence)
    if cluster is not None:
        from .cluster import scan_on_ray

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
        summary["report"] = write_scan_html(out, report, generate=generate)
    return summary


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
          register: bool = True, config=None, quiet: bool = False, **options) -> dict:
    """Train the attack heads (and the blind baseline) on a feature store; write ONNX heads + heads.json to
    ``out`` and, with ``register``, register them for the store's target so check/scan find them.

    ``attacks``: a comma-separated subset, or None / ``"all"`` for every attack whose features the store holds
    (with a ``config``, None keeps its attacks).
    ``options`` override fields of ``audit.attacks.TrainConfig`` (epochs, lr, patience, ...).
    Returns ``{"heads": out, "registered": path or None, "info": heads.json dict}``.
    """
    import dataclasses

    from .attacks import TrainConfig, parse_attacks, register_heads, train_heads
    from .attacks.inputs import available_attacks
    from .attacks.train import file_sha256
    from .errors import ArtifactError
    from .features.store import FeatureStore

    cfg = config or TrainConfig()
    fs = FeatureStore.open(store)
    if (attacks is None and config is None) or (isinstance(attacks, str) and attacks.strip().lower() == "all"):
        cfg = dataclasses.replace(cfg, attacks=available_attacks(fs.keys))
    elif attacks is not None:
        cfg = dataclasses.replace(cfg, attacks=parse_attacks(attacks if isinstance(attacks, str) else ",".join(attacks)))
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
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
    return {"heads": str(out), "registered": str(registered) if registered else None, "info": info}


def evaluate(store: str | Path, heads: str | Path | None = None, json_out: str | Path | None = None,
             plot: str | Path | None = None, n_boot: int = 1000, seed: int = 0,
             report: str | Path | None = None, max_fpr: float = 0.01, decision: str = "budget",
             max_miss: float | None = None) -> dict:
    """Metrics of each attack on the heads' test split of ``store``, with bootstrap 95% CIs, and what its
    verdicts at the budget ``max_fpr`` (or ``decision="balanced"``) do there: the fraction of rows decided, FPR,
    precision and TPR of the decided verdicts (each attack's ``verdicts`` entry).

    ``heads`` defaults to the heads registered for the store's target. With ``json_out`` the result is written
    there and a ROC plot beside it (``plot`` overrides where). With ``report`` an HTML report is written there.
    """
    from .attacks import evaluate_heads, resolve_heads
    from .attacks.train import file_sha256
    from .config import atomic_write_text
    from .features.store import FeatureStore
    import json

    from .attacks.decision import check_budget

    if n_boot < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {n_boot}")
    check_budget(max_fpr, max_miss, decision)
    fs = FeatureStore.open(store)
    h = resolve_heads(heads, fs.manifest.get("target"))
    if plot is None and json_out is not None:
        plot = Path(json_out).with_suffix(".png")
    result = evaluate_heads(fs.read(ok_only=True), h, fs.manifest, str(store), file_sha256(store), n_boot, seed,
                            plot, decision, max_fpr, max_miss)
    if json_out is not None:
        atomic_write_text(Path(json_out), json.dumps(result, indent=2) + "\n")
    if report is not None:
        from .report.html import write_evaluate_report

        result["report"] = str(write_evaluate_report(result, report, store=store, heads=h.path))
    return result


def report(results: str | Path, out: str | Path, store: str | Path | None = None,
           heads: str | Path | None = None) -> str:
    """An HTML report from files already written: a scan's JSONL results, or `audit evaluate --json` output
    (whose ROC curves and images are recomputed from the store and heads it names, or those given here)."""
    import json

    from .errors import InputError
    from .report.html import write_evaluate_report, write_scan_report

    path = Path(results)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        doc = None  # several JSON lines (or a torn one): scan results
    if isinstance(doc, dict) and "attacks" in doc:
        return str(write_evaluate_report(doc, out, store=store, heads=heads))
    return str(write_scan_report(path, out, store=store))


# ------------------------------------------------------------------------------------------------ export (B)

def export(target: str, out: str | Path, *, embedder: str | None = None, captioner: str | None = None,
           device: str = "cpu", precision: str = "fp32", allow_pickle: bool = False, quiet: bool = False) -> dict:
    """Compile ``target`` and its embedder and captioner (defaults: the target's) to validated ONNX graphs in
    ``out``; ``--target out`` then runs on onnxruntime with the compiled embedder/captioner as its defaults.
    Returns export.json's content (components, graphs' tolerances met, end-to-end checks)."""
    from .export import ExportConfig, export_all

    cfg = ExportConfig(target=str(target), embedder=embedder or "", captioner=captioner or "", device=device,
                       precision=precision, allow_pickle=allow_pickle)
    return export_all(cfg, out, quiet=quiet)


# ------------------------------------------------------------------------------------------ the study (E)

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


# ------------------------------------------------------------------------------------ set-level inference (E)

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
