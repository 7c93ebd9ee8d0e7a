"""Scan jobs: folders (under a data root, or extracted from an uploaded archive) scored in the background.

Jobs live in the evidence database (``scan_jobs``), their results in a resumable JSONL file each. A job is
scored in the fixed slices of ``batch_slices``, as ``audit scan --resume`` does; each row is logged in the
evidence log (once: keyed by job and row) before its result line is written, so a server killed at any point
and started again re-scores only unfinished slices and neither loses nor repeats a row.

With a Ray cluster (``audit serve --ray``), the slices are scored by the Ray driver's actor pool
(``audit.cluster.ray_driver.ClusterRun``, as ``audit scan --ray``) and come back in order; this process reads the
images, logs and writes every row as above, so states, counts, results, cancel and resume are the same.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import threading
import uuid
import zipfile
from collections import Counter
from pathlib import Path, PurePosixPath

import sqlalchemy as sa

from ..errors import InputError
from ..evidence.log import EvidenceLog, file_sha256, jobs_table, utc_now, verdict_record
from .models import model_spec

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = ("succeeded", "failed", "cancelled")


class Forbidden(InputError):
    """A server-side path outside every data root (the service answers 403)."""


def resolve_folder(folder: str, roots: list[str]) -> Path:
    """``folder`` (absolute, or relative to the first data root) if it lies inside a data root; else Forbidden."""
    if not roots:
        raise Forbidden("this service has no --data-root; folder scans are off (upload an archive instead)")
    path = Path(folder)
    if not path.is_absolute():
        path = Path(roots[0]) / path
    path = path.resolve()
    if not any(path.is_relative_to(Path(r).resolve()) for r in roots):
        raise Forbidden(f"{folder}: outside the service's data roots")
    if not path.is_dir():
        raise InputError(f"{folder}: not a folder")
    return path


def extract_archive(archive: Path, out: Path, max_bytes: int, max_members: int) -> Path:
    """Extract a zip or tar into ``out``, refusing links, absolute names, ``..`` and sizes or counts over the
    limits, before anything is written. Returns the folder holding ``metadata.jsonl``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            members = [(i.filename, i.file_size, i.is_dir(), _zip_is_link(i)) for i in z.infolist()]
            _check_members(members, max_bytes, max_members)
            for info in z.infolist():
                if not info.is_dir():
                    dest = out / _safe_name(info.filename)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(dest, "wb") as dst:
                        _copy_bounded(src, dst, info.file_size)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            infos = t.getmembers()
            members = [(i.name, i.size, i.isdir(), not (i.isfile() or i.isdir())) for i in infos]
            _check_members(members, max_bytes, max_members)
            for info in infos:
                if info.isfile():
                    dest = out / _safe_name(info.name)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with t.extractfile(info) as src, open(dest, "wb") as dst:
                        _copy_bounded(src, dst, info.size)
    else:
        raise InputError("archive: not a zip or tar file")
    found = sorted(out.rglob("metadata.jsonl"), key=lambda p: len(p.parts))
    return found[0].parent if found else out


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    return (info.external_attr >> 16) & 0o170000 == 0o120000


def _safe_name(name: str) -> Path:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts or ":" in p.parts[0]:
        raise InputError(f"archive: member {name!r} would land outside its folder")
    return Path(*p.parts)


def _check_members(members, max_bytes: int, max_members: int) -> None:
    if len(members) > max_members:
        raise InputError(f"archive: {len(members)} members, above the limit of {max_members}")
    total = 0
    for name, size, is_dir, is_link in members:
        _safe_name(name)
        if is_link:
            raise InputError(f"archive: member {name!r} is a link or special file; only files are accepted")
        total += size
    if total > max_bytes:
        raise InputError(f"archive: {total} bytes uncompressed, above the limit of {max_bytes}")


def _copy_bounded(src, dst, size: int) -> None:
    # The declared size was checked; a member that inflates beyond it is refused too.
    n = 0
    while block := src.read(1 << 20):
        n += len(block)
        if n > size:
            raise InputError("archive: a member is larger than its header says")
        dst.write(block)


class Jobs:
    """Scan jobs in the database and the thread that runs them, one at a time, oldest first (a job that was
    running when the server stopped resumes first)."""

    def __init__(self, evidence: EvidenceLog, models, state_dir: Path, on_change=None, cluster=None):
        self.evidence, self.models, self.state_dir = evidence, models, Path(state_dir)
        self.engine = evidence.engine
        self.on_change = on_change
        self.cluster = cluster  # a ClusterConfig: scan jobs run on Ray
        self._ray = None
        self._ray_context = None
        self._connected = threading.Event()
        self._connect_error: BaseException | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self) -> None:
        """Connect to the Ray cluster (once, for the service's life; a process already connected keeps its
        connection). A cluster that cannot be reached fails here, in one line, before the service is ready."""
        if self.cluster is None or self._ray is not None:
            return
        from ..cluster.ray_driver import connected

        self._ray_context = connected(self.cluster)
        self._ray = self._ray_context.__enter__()

    def disconnect(self) -> None:
        if self._ray_context is not None:
            context, self._ray_context, self._ray = self._ray_context, None, None
            context.__exit__(None, None, None)

    # ---------------------------------------------------------------------------------------------- records

    def folder_of(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def create(self, folder: Path, spec: dict, job_id: str | None = None) -> dict:
        job_id = job_id or uuid.uuid4().hex
        spec = dict(spec, folder=str(folder))
        with self.engine.begin() as conn:
            conn.execute(jobs_table.insert().values(id=job_id, state="queued", created_at=utc_now(),
                                                    spec=json.dumps(spec), total=0, done=0, failed=0))
        self._changed()
        self._wake.set()
        return self.get(job_id)

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def get(self, job_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return None if row is None else _job(row)

    def list(self, limit: int = 50) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_table).order_by(jobs_table.c.created_at.desc()).limit(limit)).all()
        return [_job(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)).all()
        return {s: 0 for s in STATES} | {s: int(n) for s, n in rows}

    def cancel(self, job_id: str) -> dict | None:
        with self.engine.begin() as conn:
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id, jobs_table.c.state.in_(
                ("queued", "running"))).values(state="cancelled", finished_at=utc_now()))
        self._changed()
        return self.get(job_id)

    def _update(self, job_id: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(**values))
        self._changed()

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self.counts_by_state())

    def results_path(self, job_id: str) -> Path:
        return self.folder_of(job_id) / "results.jsonl"

    def report_path(self, job_id: str) -> Path:
        return self.folder_of(job_id) / "report.html"

    # ----------------------------------------------------------------------------------------------- runner

    def start(self) -> None:
        """Start the job thread; with a Ray cluster, return once it is connected (or raise why it could not)."""
        self._thread = threading.Thread(target=self._serve, name="audit-scan-jobs", daemon=True)
        self._thread.start()
        self._connected.wait()
        if self._connect_error is not None:
            raise self._connect_error

    def _serve(self) -> None:
        # The job thread connects, for the service's life: a `local` cluster's processes die with the thread that
        # started them (Ray sets their parent-death signal), so not the loader's thread, which ends.
        try:
            self.connect()
        except BaseException as exc:  # noqa: BLE001 (handed to start(), which raises it)
            self._connect_error = exc
            return
        finally:
            self._connected.set()
        try:
            self._loop()
        finally:
            self.disconnect()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a slice still scoring is redone on the next start

    def _next(self) -> str | None:
        with self.engine.connect() as conn:
            for state in ("running", "queued"):
                found = conn.execute(sa.select(jobs_table.c.id).where(jobs_table.c.state == state)
                                     .order_by(jobs_table.c.created_at).limit(1)).scalar()
                if found:
                    return found
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            job_id = self._next()
            if job_id is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.run(job_id)
            except Exception as exc:  # noqa: BLE001 (a job fails with its one-line reason; the server goes on)
                log.exception("scan job %s failed", job_id)
                self._update(job_id, state="failed", finished_at=utc_now(),
                             error=(str(exc).splitlines() or [type(exc).__name__])[0])

    def _state(self, job_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(jobs_table.c.state).where(jobs_table.c.id == job_id)).scalar()

    def run(self, job_id: str) -> None:
        from ..auditor import pending_slices, write_scan_html
        from ..imagefolder import read_imagefolder
        from ..report.jsonl import JsonlWriter, read_jsonl

        job = self.get(job_id)
        spec = job["spec"]
        auditor = self.models.auditor(spec.get("target"), spec.get("heads"), spec.get("attack"),
                                      spec.get("max_fpr"))
        rows = read_imagefolder(spec["folder"])
        results = self.results_path(job_id)
        results.parent.mkdir(parents=True, exist_ok=True)
        counts = Counter("failed" if r.get("status") != "ok" else "ok" for r in read_jsonl(results)[0]) \
            if results.exists() else Counter()
        self._update(job_id, state="running", total=len(rows), started_at=job["started_at"] or utc_now(),
                     done=sum(counts.values()), failed=counts["failed"])
        with JsonlWriter(results, resume=True, key="id") as writer:
            slices = pending_slices(rows, auditor.config.batch_size, writer)
            scored = self._on_ray(job_id, spec, auditor, rows, slices) if self.cluster else \
                self._here(job_id, auditor, rows, slices)
            for verdicts in scored:
                for v in verdicts:
                    if v["id"] in writer:
                        continue
                    try:
                        digest = file_sha256(v["image"])
                    except OSError:
                        digest = None
                    self.evidence.append(verdict_record(v, auditor, digest, job_id=job_id, row_id=v["id"],
                                                        source="scan", api_key_id=spec.get("api_key_id")),
                                         skip_existing=True)
                    writer.write(v)
                    counts["failed" if v["status"] != "ok" else "ok"] += 1
                self._update(job_id, done=sum(counts.values()), failed=counts["failed"])
        if self._stopped(job_id):
            return
        # The queries embedded from the scanned folder (a data root's, or the job's extracted upload), as `audit
        # scan --report` does; without their generated images, which would hold the models for another pass.
        write_scan_html(results, self.report_path(job_id), images_root=spec["folder"])
        if self._state(job_id) == "running":
            self._update(job_id, state="succeeded", finished_at=utc_now())

    def _stopped(self, job_id: str) -> bool:
        return self._stop.is_set() or self._state(job_id) == "cancelled"

    def _here(self, job_id: str, auditor, rows, slices):
        """Each slice's verdicts, scored in this process (under the models' lock), until cancelled or stopped."""
        for start, stop in slices:
            if self._stopped(job_id):
                return
            with self.models.lock:
                yield [v.to_dict() for v in auditor.score_rows(rows[start:stop])]

    def _on_ray(self, job_id: str, spec: dict, auditor, rows, slices):
        """Each slice's verdicts, scored by the Ray driver's actor pool, in order, until cancelled or stopped
        (leaving the loop closes the dataset: Ray stops its actors). The workers must hold the models and heads
        this process holds, or the job fails: its evidence records name this process's models."""
        from ..cluster.ray_driver import ClusterRun, worker_spec
        from ..errors import ClusterError

        if not slices or self._stopped(job_id):
            return
        config = auditor.config
        rule = {"max_fpr": spec.get("max_fpr") if spec.get("max_fpr") is not None else self.models.max_fpr}
        if config.reference:
            rule["reference"] = model_spec(config.reference)
        ray_spec = worker_spec("scan", self.cluster, config.target, self.models.source(config.target, "embedder"),
                               self.models.source(config.target, "captioner"), False, heads=auditor.heads_path,
                               attack=auditor.attack, batch_size=config.batch_size, rule=rule)
        run = ClusterRun(self._ray, self.cluster, ray_spec, "describe")
        want = _comparable(auditor.describe())
        checked = False
        for _, result in run.results(rows, slices, config.batch_size):
            if not checked:
                got = _comparable(result["describe"])
                if got != want:
                    key = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
                    raise ClusterError(f"the Ray workers hold another {key} than this service ({got.get(key)} vs "
                                       f"{want.get(key)}); every node needs the service's models")
                checked = True
            for v in result["verdicts"]:  # the same folder (checked above); where it came from is this service's
                v["heads_source"] = auditor.heads_source
            yield result["verdicts"]
            if self._stopped(job_id):
                return

    def remove_files(self, job_id: str) -> None:
        shutil.rmtree(self.folder_of(job_id), ignore_errors=True)


def _comparable(described: dict) -> dict:
    return {k: v for k, v in described.items() if k != "heads_source"}


def _job(row) -> dict:
    spec = json.loads(row.spec)
    return {"id": row.id, "state": row.state, "counts": {"total": row.total, "done": row.done, "failed": row.failed},
            "created_at": row.created_at, "started_at": row.started_at, "finished_at": row.finished_at,
            "error": row.error, "spec": spec}
