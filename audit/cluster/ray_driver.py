"""The Ray driver: `audit features` and `audit scan` with their batches computed by a pool of Ray Data actors.

The driver reads the folder exactly as one machine does (the same rows, ids and statuses), cuts it into the same
fixed batches (``batch_slices``), and alone writes the one feature store or JSONL file, in row order, committing
each batch as one machine does, so ``--resume`` continues a killed driver from what was committed. In between::

    from_items(one row per batch: index + rows)            on the driver
      -> map_batches(read_batch)  1 batch per call, pinned to the driver's node (label ray.io/node-id): the image
                                  bytes, so workers need no shared file system
      -> map_batches(FeaturesWorker | ScanWorker)  ActorPoolStrategy(size=workers), 1 batch per call: each actor
                                  loads the models once and calls featurize_rows / Auditor.score_rows
      -> iter_rows()              in batch order (preserve_order): finished batches wait in the object store,
                                  which Ray Data's backpressure bounds, not in the driver

Faults: Ray Data's actors run with ``max_restarts=-1`` and ``max_task_retries=-1`` (its defaults), so a worker
process or node that dies is restarted elsewhere and its batch computed again; the result is the same bits. Errors
of the workers' own (missing models, a bug) come back as data and end the run with one ``ClusterError`` line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..config import Config, check_device
from ..errors import ClusterError, UsageError
from ..imagefolder import Row
from .workers import FORWARDED_ENV, WORKERS, WorkerSpec, read_batch, read_payload, rows_item

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'audit[ray]'"


@dataclasses.dataclass
class ClusterConfig(Config):
    """Where and how a run's batches are computed on Ray."""

    # "local": a private cluster on this machine, stopped afterwards; "auto": the cluster this machine belongs to;
    # "ray://HEAD:10001" (Ray Client) or "HOST:PORT" (the head's GCS).
    address: str = "local"
    workers: int = 1  # actors; each holds its own copy of the models (and, with device cuda, one GPU)
    threads: int = 0  # torch and onnxruntime threads per worker; 0: those the single-machine command uses here
    device: str = "cpu"
    object_store_mib: int = 0  # object store of a `local` cluster; 0: Ray's default

    def validate(self) -> "ClusterConfig":
        if not self.address.strip():
            raise UsageError("--ray needs an address: local, auto, ray://HEAD:10001 or HOST:PORT")
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0: the single-machine default), got {self.threads}")
        check_device(self.device)
        return self


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--ray needs Ray Data, which is not installed ({exc}); {INSTALL_HINT}") from None
    return ray


@contextlib.contextmanager
def connected(cluster: ClusterConfig) -> Iterator:
    """Ray, connected to ``cluster.address`` for the duration (disconnected, and a `local` cluster stopped,
    afterwards). A process the caller already connected keeps its connection, whatever the address says."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    kwargs: dict = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if cluster.address == "local":
        from ..runtime.session import usable_cores

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private cluster reports nothing home
        kwargs.update(num_cpus=usable_cores(), include_dashboard=False,
                      object_store_memory=cluster.object_store_mib * 2**20 or None)
    try:
        ray.init(address=cluster.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"--ray {cluster.address}: cannot connect to a Ray cluster ({first})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _located(spec: str | None, registry) -> tuple[str | None, str | None]:
    """(spec as the workers get it, the folder every node must have or None): folders are sent as absolute paths
    (workers have their own working directory); registered names, hub ids and URLs resolve on each worker."""
    if not spec or spec.startswith(("http://", "https://")) or (registry is not None and spec in registry):
        return spec, None
    path = Path(spec).expanduser()
    if not path.exists() and spec.count("/") == 1 and not spec.startswith(("/", ".", "~")):
        return spec, None  # a hub id (org/name), found in each node's Hugging Face cache
    return str(path.absolute()), str(path.absolute())


def _threads(cluster: ClusterConfig) -> tuple[int, int]:
    """(torch, onnxruntime) threads per worker: --threads, else what this machine's single-process command uses."""
    if cluster.threads:
        return cluster.threads, cluster.threads
    import torch

    from ..runtime.session import RuntimeOptions

    return torch.get_num_threads(), RuntimeOptions().threads()


def worker_spec(kind: str, cluster: ClusterConfig, target: str, embedder: str | None, captioner: str | None,
                allow_pickle: bool, **extra) -> WorkerSpec:
    from ..registry import CAPTIONERS, EMBEDDERS, TARGETS
    from ..runtime.session import _env_count
    from .. import targets  # noqa: F401  (registers the built-in names)

    folders = {}
    models = {}
    for role, spec, registry in (("target", target, TARGETS), ("embedder", embedder, EMBEDDERS),
                                 ("captioner", captioner, CAPTIONERS), ("heads", extra.pop("heads", None), None)):
        models[role], folder = _located(spec or None, registry)
        if folder is not None:
            folders[role] = folder
    torch_threads, ort_threads = _threads(cluster)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return WorkerSpec(kind=kind, target=models["target"], embedder=models["embedder"],
                      captioner=models["captioner"], heads=models["heads"], device=cluster.device,
                      allow_pickle=allow_pickle, torch_threads=torch_threads, ort_threads=ort_threads,
                      replicas=_env_count("AUDIT_REPLICAS"), env=env, folders=folders, **extra)


@contextlib.contextmanager
def _quiet_data_context(ray) -> Iterator:
    """Ray Data settings of a run, restored afterwards: results in batch order, no bars or plans of its own (the
    command draws one bar of committed rows)."""
    ctx = ray.data.DataContext.get_current()
    data_log = logging.getLogger("ray.data")
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             data_log.level)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not logging.getLogger().isEnabledFor(logging.INFO):
        data_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         level) = saved
        data_log.setLevel(level)


class ClusterRun:
    """One pass of batches through the actor pool: results in order, failures as ``ClusterError``, every worker
    checked to hold the same models as the first, and what each worker did (for the summary)."""

    def __init__(self, ray, cluster: ClusterConfig, spec: WorkerSpec, models_key: str):
        self.ray, self.cluster, self.spec, self.models_key = ray, cluster, spec, models_key
        self.started = time.perf_counter()
        self.first_batch_seconds: float | None = None
        self.workers: dict[tuple, dict] = {}
        self._models: tuple[str, object] | None = None

    def results(self, rows: Sequence[Row], slices: Sequence[tuple[int, int]],
                batch_size: int) -> Iterator[tuple[tuple[int, int], dict]]:
        indexes = [a // batch_size for a, _ in slices]
        items = [rows_item(k, list(rows[a:b])) for k, (a, b) in zip(indexes, slices)]
        due = iter(zip(indexes, slices))
        with _quiet_data_context(self.ray), contextlib.closing(self._dataset(items)) as done:
            for index, result in done:
                want, bounds = next(due, (None, None))
                if index != want:  # preserve_order promises this; a wrong row would silently shift the outputs
                    raise RuntimeError(f"Ray returned batch {index} where batch {want} was due")
                self._record(result)
                yield bounds, result
        missing = [index for index, _ in due]
        if missing:
            raise RuntimeError(f"Ray returned no result for batch(es) {missing}")

    def _dataset(self, items: list[dict]):
        from ray.data import ActorPoolStrategy, TaskPoolStrategy
        from ray.util.client import ray as client

        ray, cluster = self.ray, self.cluster
        if client.is_connected():
            # A Ray Client driver is no node of the cluster: it reads the images itself and uploads them up front.
            ds = ray.data.from_items([{"index": it["index"], "payload": read_payload(it["rows"])} for it in items],
                                     override_num_blocks=len(items))
        else:
            node = ray.get_runtime_context().get_node_id()
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                read_batch, batch_size=1, num_cpus=0, compute=TaskPoolStrategy(size=min(4, cluster.workers)),
                label_selector={"ray.io/node-id": node})
        ds = ds.map_batches(WORKERS[self.spec.kind], batch_size=1, compute=ActorPoolStrategy(size=cluster.workers),
                            fn_constructor_args=(self.spec,), **self._resources())
        return ((int(r["index"]), pickle.loads(r["result"])) for r in ds.iter_rows())

    def _resources(self) -> dict:
        """CPUs (and a GPU) per actor: its threads, capped at the largest node so that every actor can start."""
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        most_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
        threads = max(self.spec.torch_threads, self.spec.ort_threads)
        if self.cluster.device == "cuda":
            if not any(n["Resources"].get("GPU", 0.0) >= 1 for n in nodes):
                raise ClusterError(f"--device cuda: no node of the Ray cluster at {self.cluster.address} has a GPU")
            return {"num_gpus": 1, "num_cpus": min(threads, most_cpus)}
        if most_cpus <= 0:
            raise ClusterError(f"the Ray cluster at {self.cluster.address} has no CPUs for workers")
        return {"num_cpus": min(threads, most_cpus)}

    def _record(self, result: dict) -> None:
        if "error" in result:
            raise ClusterError(result["error"]["message"], result["error"]["exit_code"])
        models = result[self.models_key]
        if self._models is None:
            self._models = (result["node"], models)
        elif models != self._models[1]:
            node, first = self._models
            key = next(k for k in sorted(set(models) | set(first)) if models.get(k) != first.get(k))
            raise ClusterError(f"the worker on {result['node']} has another {key} than the one on {node} "
                               f"({models.get(key)} vs {first.get(key)}); every node needs the same models")
        if self.first_batch_seconds is None:
            self.first_batch_seconds = time.perf_counter() - self.started
        key = (result["node"], result["pid"])
        seen = self.workers.setdefault(key, {"node": result["node"], "pid": result["pid"], "batches": 0})
        seen["batches"] += 1
        seen["peak_rss_mib"] = round(result["peak_rss_mib"], 1)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def describe(self) -> dict:
        return {"address": self.cluster.address, "workers": self.cluster.workers, "device": self.cluster.device,
                "torch_threads": self.spec.torch_threads, "ort_threads": self.spec.ort_threads,
                "worker_stats": list(self.workers.values())}


# ----------------------------------------------------------------------------------------------------- commands

def featurize_on_ray(data: str | Path, out: str | Path, cfg, cluster: ClusterConfig, allow_pickle: bool = False,
                     resume: bool = False, quiet: bool = False,
                     on_batch: Callable[[int], None] | None = None) -> dict:
    """``compute_store`` on a Ray cluster: the same store, bit for bit at the same thread counts."""
    from ..features.compute import batch_slices, open_store, read_rows, store_manifest, store_summary
    from ..features.store import FeatureStore, FeatureWriter, refuse_different, refuse_existing
    from ..progress import progress

    cfg.validate()
    cluster.validate()
    import_ray()  # before anything is read: without Ray the run fails at once, naming the extra
    out = Path(out)
    refuse_existing(out, resume)  # this driver creates its store only when the first batch comes back
    rows = read_rows(data, cfg)
    writer = None
    if resume and out.exists():
        # The models' identities come from the workers; settings and data are checked before any worker starts.
        stored = FeatureStore.open(out).manifest
        writer = FeatureWriter.resume(out, store_manifest(cfg, stored, rows, data))
    start = writer.n_committed if writer else 0
    slices = batch_slices(len(rows), cfg.batch_size, start)
    if writer is None and not slices:
        slices = [(0, 0)]  # an empty folder: one empty batch, so that a worker names the models of the empty store
    spec = worker_spec("features", cluster, cfg.target, cfg.embedder, cfg.captioner, allow_pickle, config=cfg)
    run = None
    if slices:
        with connected(cluster) as ray, progress(total=len(rows), desc="features", unit="row", quiet=quiet,
                                                 initial=start) as bar:
            run = ClusterRun(ray, cluster, spec, "identities")
            for k, ((a, b), result) in enumerate(run.results(rows, slices, cfg.batch_size)):
                if k == 0:  # the first result names the models (the run checks that every later one agrees)
                    manifest = store_manifest(cfg, result["identities"], rows, data)
                    if writer is None:
                        writer = open_store(out, manifest, cfg, result["dim"], resume)
                    else:
                        refuse_different(out, writer.manifest, manifest)
                writer.append(result["batch"])
                bar.update(b - a)
                if on_batch is not None:
                    on_batch(writer.n_committed)
    summary = store_summary(out, writer.manifest, run.seconds if run else 0.0,
                            run.first_batch_seconds if run else None)
    summary["ray"] = run.describe() if run else None
    return summary


def scan_on_ray(folder: str | Path, out: str | Path, cluster: ClusterConfig, *, target: str,
                heads: str | Path | None = None, embedder: str | None = None, captioner: str | None = None,
                attack: str | None = None, batch_size: int = 8, allow_pickle: bool = False, resume: bool = False,
                quiet: bool = False, **rule) -> dict:
    """``Auditor.scan`` on a Ray cluster: the same JSONL, line for line, at the same thread counts. ``rule``: the
    Auditor's verdict rule (``max_fpr``, ``decision``, ``max_miss``)."""
    from ..auditor import check_resumable, pending_slices, scan_counts, write_verdicts
    from ..imagefolder import read_imagefolder
    from ..progress import progress
    from ..report.jsonl import JsonlWriter, read_jsonl

    cluster.validate()
    import_ray()
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    rows = read_imagefolder(folder)
    out = Path(out)
    records = read_jsonl(out)[0] if resume else []
    spec = worker_spec("scan", cluster, target, embedder, captioner, allow_pickle,
                       heads=str(heads) if heads is not None else None, attack=attack, batch_size=batch_size,
                       rule=rule)
    counts: Counter = Counter()
    described = None
    with JsonlWriter(out, resume=resume, key="id") as writer:
        skipped = sum(r.id in writer for r in rows)
        counts["skipped (already in the results)"] = skipped
        # Nothing left to score: one empty batch still tells which models and heads the results are from.
        slices = pending_slices(rows, batch_size, writer) or [(0, 0)]
        with connected(cluster) as ray, progress(total=len(rows), desc="scan", unit="image", quiet=quiet,
                                                 initial=skipped) as bar:
            run = ClusterRun(ray, cluster, spec, "describe")
            for _, result in run.results(rows, slices, batch_size):
                if described is None:
                    described = result["describe"]
                    check_resumable(out, records, described)
                bar.update(write_verdicts(writer, result["verdicts"], counts))
    return {"out": str(out), "rows": len(rows), "counts": scan_counts(counts),
            "seconds": round(run.seconds, 2), **described, "ray": run.describe()}
