"""The ASGI app: ``create_app(config)`` builds it (tests call it in-process; ``audit serve`` runs it on uvicorn).

A thin layer over the Python API: checks are ``Auditor.score_rows`` calls gathered by the batcher, scan jobs the
resumable scan's slices, every verdict an evidence record (``audit.evidence``). Errors answer
``{"error": "one line"}`` with the status of ``audit.errors.error_codes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import AuditError, InputError, UsageError, error_codes
from ..evidence.log import EvidenceLog, verdict_record
from .auth import AuthError, KeyRing, RateLimited, RateLimiter, load_keys
from .batcher import Batcher, QueueFull
from .config import ServiceConfig
from .jobs import Forbidden, Jobs, extract_archive, resolve_folder
from .metrics import Metrics
from .models import Models

log = logging.getLogger(__name__)

CHECK_FIELDS = {"image", "caption", "caption_source", "target", "heads", "max_fpr", "attack", "tier"}


class NotReady(Exception):
    """Models still loading (or failed to load): 503."""


class Service:
    """What the app holds: config, models (None until loaded), evidence log, jobs, batcher, keys, metrics."""

    def __init__(self, config: ServiceConfig, models: Models | None = None):
        self.config = config
        self.keys = KeyRing(load_keys(config.api_keys))
        if not config.loopback and not self.keys.enabled:
            raise UsageError(f"--host {config.host} accepts connections from other machines: give --api-keys FILE "
                             "(or AUDIT_API_KEYS) of hashed keys, or bind 127.0.0.1")
        self.evidence = EvidenceLog(config.db)
        self.state_dir = config.state_path()
        self.tmp_dir = self.state_dir / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.tmp_dir, 0o700)
        self.metrics = Metrics()
        self.limiter = RateLimiter(config.rate_limit_per_minute)
        self.models: Models | None = None
        self.jobs: Jobs | None = None
        self.load_error: str | None = None
        self.on_load_error = None  # called with the error when loading fails (``serve`` stops the server)
        self.batcher: Batcher | None = None
        self.started = time.time()
        self._given_models = models

    # ------------------------------------------------------------------------------------------ life cycle

    def load(self) -> None:
        try:
            models = self._given_models or Models.load(self.config)
            jobs = Jobs(self.evidence, models, self.state_dir, on_change=self._jobs_changed,
                        cluster=self.config.cluster())
            jobs.start()  # with --ray, once connected
        except Exception as exc:  # noqa: BLE001 (reported by readiness and by `audit serve`)
            self.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self.on_load_error:
                self.on_load_error(exc)
            else:
                log.error("error: %s", self.load_error)
            return
        self.jobs = jobs
        self._jobs_changed(self.jobs.counts_by_state())
        self.models = models

    def _jobs_changed(self, counts: dict) -> None:
        for state, n in counts.items():
            self.metrics.scan_jobs.labels(state=state).set(n)

    @property
    def ready(self) -> bool:
        return self.models is not None

    def require_models(self) -> Models:
        if self.models is None:
            raise NotReady(self.load_error and f"models failed to load: {self.load_error}" or "models are loading")
        return self.models

    def identify(self, request: Request) -> str | None:
        key_id = self.keys.identify(request.headers.get("authorization"))
        self.limiter.take(key_id or (request.client.host if request.client else "-"))
        return key_id


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    line = " ".join(str(message).split()) or "error"
    return JSONResponse({"error": line}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length or by counting what arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, f"request body of {int(length)} bytes is above the limit of {self.limit}")(
                scope, receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await _error(413, f"request body is above the limit of {self.limit} bytes")(scope, receive, send)


def create_app(config: ServiceConfig, models: Models | None = None) -> FastAPI:
    """The service's ASGI app. ``models``: already loaded models (tests share one); else they load in a
    background thread at start-up, and ``/v2/health/ready`` says when they are in."""
    config.validate()
    svc = Service(config, models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.batcher = Batcher(config.max_batch_size, config.max_wait_ms, config.queue_size,
                              svc.models.lock if svc.models else _LazyLock(svc),
                              on_batch=svc.metrics.batch_size.observe)
        svc.batcher.start()
        loader = threading.Thread(target=svc.load, name="audit-load-models", daemon=True)
        loader.start()
        try:
            yield
        finally:
            if svc.jobs is not None:
                await asyncio.to_thread(svc.jobs.stop)
            await svc.batcher.stop()

    app = FastAPI(title="audit", version=__version__, lifespan=lifespan,
                  description="Membership inference against text-to-image generators, as a service.")
    app.state.service = svc
    _handlers(app, svc)
    _routes(app, svc)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    return app


class _LazyLock:
    """The models' lock, once the models are loaded (the batcher starts before they are)."""

    def __init__(self, svc: Service):
        self.svc = svc

    def __enter__(self):
        self.lock = self.svc.require_models().lock
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def _handlers(app: FastAPI, svc: Service) -> None:
    @app.exception_handler(AuditError)
    async def _domain(request, exc: AuditError):
        return _error(403 if isinstance(exc, Forbidden) else error_codes(exc)[1], str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request, exc):
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(NotReady)
    async def _not_ready(request, exc):
        return _error(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(AuthError)
    async def _auth(request, exc):
        return _error(401, str(exc), {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RateLimited)
    async def _rate(request, exc: RateLimited):
        return _error(429, str(exc), {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); the server log has the details")


def _routes(app: FastAPI, svc: Service) -> None:
    config = svc.config

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if not svc.ready:
            return JSONResponse({"ready": False, "error": svc.load_error}, status_code=503)
        return {"ready": True}

    @app.get("/v1/info")
    async def info(request: Request):
        svc.identify(request)
        models = svc.require_models()
        return {"tool_version": __version__, "targets": await asyncio.to_thread(models.info),
                "default_target": models.default_target, "auth": svc.keys.enabled,
                "batching": {"max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
                             "queue_size": config.queue_size},
                "scan_jobs": {"runner": "ray" if config.ray else "in-process", "ray": config.ray,
                              "ray_workers": config.ray_workers if config.ray else None,
                              "batch_size": config.scan_batch_size},
                "limits": {"max_body_bytes": config.max_body_bytes, "max_caption_chars": config.max_caption_chars,
                           "rate_limit_per_minute": config.rate_limit_per_minute},
                "evidence_db": _safe_db(svc.evidence.url)}

    @app.post("/v1/checks")
    async def checks(request: Request):
        started = time.perf_counter()
        key_id = svc.identify(request)
        models = svc.require_models()
        form = await _form(request)
        fields = await _check_fields(form, config)
        auditor = await asyncio.to_thread(models.auditor, fields["target"], fields["heads"], fields["attack"],
                                          fields["max_fpr"], fields["tier"])
        pixels, digest = await asyncio.to_thread(_decode_upload, svc.tmp_dir, fields["name"], fields["data"])
        svc.metrics.queue_depth.set(svc.batcher.depth + 1)
        try:
            verdict = await svc.batcher.submit(auditor, fields["row"], pixels)
        finally:
            svc.metrics.queue_depth.set(svc.batcher.depth)
        if verdict.status != "ok":
            raise InputError(verdict.error or verdict.status)
        body = verdict.to_dict()
        record = await asyncio.to_thread(svc.evidence.append, verdict_record(body, auditor, digest,
                                                                             api_key_id=key_id))
        svc.metrics.check_duration.observe(time.perf_counter() - started)
        svc.metrics.checks.labels(verdict=str(verdict.verdict), tier=str(verdict.tier)).inc()
        return JSONResponse(_jsonable(body | {"evidence_id": record["id"]}))

    @app.get("/v1/evidence/{record_id}")
    async def evidence(record_id: str, request: Request):
        svc.identify(request)
        record = await asyncio.to_thread(svc.evidence.get, record_id)
        if record is None:
            return _error(404, f"no evidence record {record_id!r}")
        return record

    @app.post("/v1/scans", status_code=201)
    async def create_scan(request: Request):
        key_id = svc.identify(request)
        models = svc.require_models()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                spec = await request.json()
            except ValueError:
                raise InputError("request body is not valid JSON") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("folder"), str):
                raise InputError("give {\"folder\": PATH} (a folder under one of the data roots)")
            archive = None
        else:
            form = await _form(request)
            archive = form.get("archive")
            if not isinstance(archive, UploadFile):
                raise InputError("missing archive: send a zip or tar (images + metadata.jsonl) as the 'archive' "
                                 "field, or JSON {\"folder\": PATH}")
            spec = {k: v for k, v in form.items() if isinstance(v, str)}
        unknown = sorted(set(spec) - {"folder", "target", "heads", "attack", "max_fpr"})
        if unknown:
            raise UsageError(f"unknown field(s) {', '.join(unknown)}; valid: folder, target, heads, attack, max_fpr")
        max_fpr = _float(spec.get("max_fpr"), "max_fpr")
        await asyncio.to_thread(models.auditor, spec.get("target"), spec.get("heads"), spec.get("attack"), max_fpr)
        job_spec = {"target": spec.get("target"), "heads": spec.get("heads"), "attack": spec.get("attack"),
                    "max_fpr": max_fpr, "api_key_id": key_id}
        if archive is None:
            folder = resolve_folder(spec["folder"], config.data_roots)
            job = await asyncio.to_thread(svc.jobs.create, folder, job_spec)
        else:
            job_id = svc.jobs.new_id()
            folder = await asyncio.to_thread(_save_and_extract, svc, job_id, archive)
            job = await asyncio.to_thread(svc.jobs.create, folder, job_spec, job_id)
        return JSONResponse(_public(job), status_code=201)

    @app.get("/v1/scans")
    async def list_scans(request: Request):
        svc.identify(request)
        svc.require_models()
        return {"jobs": [_public(j) for j in await asyncio.to_thread(svc.jobs.list)]}

    @app.get("/v1/scans/{job_id}")
    async def get_scan(job_id: str, request: Request):
        svc.identify(request)
        return _public(await _job(svc, job_id))

    @app.delete("/v1/scans/{job_id}")
    async def cancel_scan(job_id: str, request: Request):
        svc.identify(request)
        await _job(svc, job_id)
        return _public(await asyncio.to_thread(svc.jobs.cancel, job_id))

    @app.get("/v1/scans/{job_id}/results")
    async def scan_results(job_id: str, request: Request):
        svc.identify(request)
        await _job(svc, job_id)
        path = svc.jobs.results_path(job_id)
        return StreamingResponse(_complete_lines(path), media_type="application/x-ndjson")

    @app.get("/v1/scans/{job_id}/report")
    async def scan_report(job_id: str, request: Request):
        svc.identify(request)
        job = await _job(svc, job_id)
        path = svc.jobs.report_path(job_id)
        if not path.is_file():
            return _error(409, f"no report yet: job {job_id} is {job['state']}")
        return FileResponse(path, media_type="text/html")

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        svc.metrics.queue_depth.set(svc.batcher.depth if svc.batcher else 0)
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from .page import render_index

        return HTMLResponse(render_index(svc))


def _safe_db(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _public(job: dict) -> dict:
    spec = {k: v for k, v in job["spec"].items() if k != "api_key_id"}
    return {k: v for k, v in job.items() if k != "spec"} | {"spec": spec}


async def _job(svc: Service, job_id: str) -> dict:
    svc.require_models()
    job = await asyncio.to_thread(svc.jobs.get, job_id)
    if job is None:
        raise StarletteHTTPException(404, f"no scan job {job_id!r}")
    return job


async def _complete_lines(path: Path):
    """The results file's complete lines as they are now (a line being written is left for the next read)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        pending = b""
        while block := await asyncio.to_thread(fh.read, 1 << 16):
            pending += block
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield pending[:cut]
                pending = pending[cut:]


async def _form(request: Request):
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise StarletteHTTPException(415, f"expected multipart/form-data, got {ctype or 'no content type'}")
    try:
        return await request.form(max_files=1, max_fields=20)
    except (AssertionError, ValueError, KeyError) as exc:
        raise InputError(f"malformed multipart body ({exc})") from None
    except StarletteHTTPException as exc:
        raise InputError(f"malformed multipart body ({exc.detail})") from None


def _float(value, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None


async def _check_fields(form, config: ServiceConfig) -> dict:
    from ..imagefolder import Row, clean_caption

    unknown = sorted(set(form.keys()) - CHECK_FIELDS)
    if unknown:
        raise UsageError(f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(CHECK_FIELDS))}")
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise InputError("missing image: send the image file as the multipart field 'image'")
    name = " ".join((image.filename or "upload").split())[:255] or "upload"
    data = await image.read()
    caption = form.get("caption")
    row = Row(id=Path(name).name, path=name)
    if caption is not None and caption != "":
        if not isinstance(caption, str):
            raise UsageError("caption must be text")
        if len(caption) > config.max_caption_chars:
            raise InputError(f"caption of {len(caption)} characters is above the limit of {config.max_caption_chars}")
        row.caption, row.warnings = clean_caption(caption, "--caption")
        if row.caption is None:
            raise UsageError("--caption is empty; give a caption, or leave it out to have the captioner write one")
        source = form.get("caption_source") or "argument"
        if source not in ("argument", "txt"):
            raise UsageError(f"caption_source must be argument or txt, got {source!r}")
        row.caption_source = source
    return {"name": name, "data": data, "row": row, "target": form.get("target") or None,
            "heads": form.get("heads") or None, "attack": form.get("attack") or None,
            "max_fpr": _float(form.get("max_fpr"), "max_fpr"), "tier": form.get("tier") or None}


def _decode_upload(tmp_dir: Path, name: str, data: bytes):
    """Decode an uploaded image through the same guards as ``audit check`` (from a private temporary file);
    errors name the upload, not the temporary file."""
    import hashlib

    from ..imagefolder import ImageError, load_image

    fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=Path(name).suffix[:10])
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            pixels = load_image(tmp)
        except ImageError as exc:
            raise ImageError(str(exc).replace(tmp, name), exc.status) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return pixels, hashlib.sha256(data).hexdigest()


def _save_and_extract(svc: Service, job_id: str, archive: UploadFile) -> Path:
    import shutil

    base = svc.jobs.folder_of(job_id)
    (base / "data").mkdir(parents=True, exist_ok=True)
    saved = base / "upload"
    try:
        with open(saved, "wb") as dst:
            archive.file.seek(0)
            shutil.copyfileobj(archive.file, dst)
        return extract_archive(saved, base / "data", svc.config.max_archive_bytes, svc.config.max_archive_members)
    except Exception:
        svc.jobs.remove_files(job_id)
        raise
    finally:
        with contextlib.suppress(OSError):
            saved.unlink()


def _jsonable(obj):
    from ..report.jsonl import to_jsonable

    return to_jsonable(obj)
