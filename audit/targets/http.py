"""Black-box targets behind an HTTP API: the ``/sdapi/v1/txt2img`` JSON protocol (AUTOMATIC1111 and compatibles).

Every generated image is one request (``batch_size`` 1) with its own seed, so an image depends only on its
caption and seed, never on how a scan batched its rows, and a failed request costs one image, not a batch.
Requests run on a thread pool (``concurrency``), each with a total deadline (``timeout``) and retries with
exponential backoff on connection errors, timeouts, HTTP 429 and 5xx. Only the standard library is used.

Options come as keyword arguments or in the URL's query string, so a command line can set them:
``--target "http://host:7860?timeout=600&concurrency=8"`` (see ``HTTPTargetConfig``). Credentials in the URL
(``http://user:password@host:7860``, as A1111's ``--api-auth``) are sent as HTTP basic auth. Neither options
nor credentials are part of the target's identity: the URL without them is.

Nothing a service answers is trusted: every JSON body is parsed with a bound on its size and nesting depth, every
field used (the reported resolution, model entries, images, ``info`` and its seed) is checked against its type
and bounds, and images are decoded only through ``audit.imagefolder.load_image`` with its limits. An invalid answer
to a probe is a one-line ``ServiceError``; an invalid answer to a txt2img request fails that row
(``BadResponse``, a refusal: the row gets ``generation_refused``) and the run goes on.

Seeds: image ``j`` of caption ``c`` is sent with ``image_seeds(seed, c, n_gen)[j] % 2**32``; services commonly
take 32-bit seeds. A service that ignores the seed makes every result irreproducible; the client warns when
the seed it reports back differs from the one sent.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import http.client
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.parse
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..config import Config
from ..errors import AuditError, UsageError
from ..imagefolder import MAX_PIXELS, ImageError, load_image
from .base import PerImageSeeds

log = logging.getLogger(__name__)

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
SD_MODELS = "/sdapi/v1/sd-models"
OPTIONS = "/sdapi/v1/options"
SEED_MODULUS = 2**32
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A txt2img answer with one of these refuses this request (a filtered prompt, an invalid one): that row fails and
# the scan goes on. Any other failure that outlasts the retries is the service's and stops the run (--resume).
REFUSED_STATUSES = frozenset({400, 413, 422})
# Bounds on what a service may answer. The resolution sizes every array the client allocates; a txt2img answer is
# one image (a few MiB of base64) with a short info text; the model list is a handful of entries.
MIN_RESOLUTION, MAX_RESOLUTION = 8, 2048
MAX_JSON_DEPTH = 32
MAX_INFO_CHARS = 1 << 20
MAX_IMAGES_PER_ANSWER = 64
MAX_MODELS = 1000
MAX_FIELD_CHARS = 4096
JSON_TYPES = ("application/json", "text/json")


class ServiceError(AuditError):
    """The HTTP target failed (unreachable, timed out, answered an error) after its retries."""


class PromptRefused(ServiceError):
    """The service answered this request with a refusal (HTTP 400/413/422): retrying will not help."""


class BadResponse(PromptRefused):
    """The service answered this request with something invalid (an image over the limits, a malformed field, a
    body too large or too deeply nested): that row fails like a refused prompt, and is not retried."""


class GenerationFailed(ServiceError):
    """Some captions of a ``generate`` call got no images; the others did.

    ``images`` holds every image that was generated (zeros where none was), ``errors`` maps the index of each
    failed caption to a one-line reason, ``refused`` the indices whose every failure was a refusal: a scan
    marks those rows failed and keeps the rest, and stops on any other failure (the service is down).
    """

    def __init__(self, message: str, images: np.ndarray, errors: dict[int, str], refused: set[int] | None = None):
        super().__init__(message)
        self.images = images
        self.errors = errors
        self.refused = set(refused or ())


@dataclasses.dataclass
class HTTPTargetConfig(Config):
    timeout: float = 300.0  # seconds for one request, connect to last byte (real services take a while)
    retries: int = 4  # further attempts after the first
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_backoff: float = 60.0
    concurrency: int = 4  # requests in flight at once
    resolution: int = 0  # 0: what the service reports (audit serve does), else 512
    sampler: str = ""  # sampler_name to request; empty: the service's default
    max_response_bytes: int = 256 * 2**20


class HTTPGenerator(PerImageSeeds):
    """A ``Generator`` over a remote ``/sdapi/v1/txt2img`` service."""

    family = "http"

    def __init__(self, url: str, name: str | None = None, config: HTTPTargetConfig | None = None,
                 headers: dict[str, str] | None = None, **options: Any):
        options.pop("device", None)  # the service runs where it runs
        options.pop("allow_pickle", None)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{url}: not an http(s)://host[:port] URL")
        try:
            parts.port  # noqa: B018 (raises on a malformed port)
        except ValueError:
            raise UsageError(f"{url}: not an http(s)://host[:port] URL (bad port)") from None
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc += f":{parts.port}" if parts.port else ""
        self.url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
        self.config = _config(config or HTTPTargetConfig(), {**query, **options}, self.url)
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._base = parts.path.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        if parts.username is not None:
            userpass = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(userpass.encode()).decode("ascii")
        self.name = name or self.url
        self.model_info = self._probe()
        self.resolution = self.config.resolution or (self.model_info.get("audit") or {}).get("resolution") or 512
        blob = json.dumps({"url": self.url, "model": self.model_info}, sort_keys=True)
        self._hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self._cache: collections.OrderedDict[tuple, np.ndarray] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._warned: set[str] = set()

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    # -- protocol --------------------------------------------------------------------------------------------

    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        try:
            return super().generate(captions, n_gen, seed, steps, guidance)
        except GenerationFailed as exc:
            by_caption = {i // n_gen: msg for i, msg in sorted(exc.errors.items())}
            refused = {c for c in by_caption
                       if all(i in exc.refused for i in exc.errors if i // n_gen == c)}
            first = next(iter(by_caption.values()))
            raise GenerationFailed(
                f"{self.url}: {len(by_caption)} of {len(captions)} captions got no images ({first})",
                exc.images.reshape(len(captions), n_gen, *exc.images.shape[1:]), by_caption, refused) from None

    def generate_with_seeds(self, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                            guidance: float = 1.0) -> np.ndarray:
        """uint8 [len(prompts), R, R, 3], one request per image; raises GenerationFailed if any image is missing."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return self._gather([functools.partial(self._image, p, int(s) % SEED_MODULUS, steps, guidance)
                             for p, s in zip(prompts, seeds)], "images")

    def _gather(self, requests: list[Callable[[], np.ndarray]], what: str) -> np.ndarray:
        """uint8 [len(requests), R, R, 3]: each request's image, ``config.concurrency`` at a time; raises
        GenerationFailed (``refused`` for the refusals) with what it got if any request failed."""
        r = self.resolution
        out = np.zeros((len(requests), r, r, 3), np.uint8)
        errors: dict[int, str] = {}
        refused: set[int] = set()
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            futures = {pool.submit(request): i for i, request in enumerate(requests)}
            for fut in concurrent.futures.as_completed(futures):
                i = futures[fut]
                try:
                    out[i] = fut.result()
                except ServiceError as exc:
                    errors[i] = str(exc)
                    if isinstance(exc, PromptRefused):
                        refused.add(i)
        if errors:
            first = errors[min(errors)]
            raise GenerationFailed(f"{self.url}: {len(errors)} of {len(requests)} {what} failed ({first})", out,
                                   errors, refused)
        return out

    # -- one image -------------------------------------------------------------------------------------------

    def _image(self, prompt: str, seed: int, steps: int, guidance: float) -> np.ndarray:
        key = (prompt, seed, int(steps), float(guidance), self.resolution)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        payload = {
            "prompt": prompt, "negative_prompt": "", "seed": seed, "steps": int(steps), "cfg_scale": float(guidance),
            "width": self.resolution, "height": self.resolution, "batch_size": 1, "n_iter": 1,
            "send_images": True, "save_images": False,
        }
        if self.config.sampler:
            payload["sampler_name"] = self.config.sampler
        body = self._request("POST", TXT2IMG, payload)
        image = self._decode(body, seed)
        with self._cache_lock:
            # Kept so that a caller retrying the rows of a partly failed batch does not pay twice.
            self._cache[key] = image
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return image

    def _decode(self, body: Any, seed: int, path: str = TXT2IMG) -> np.ndarray:
        where = f"{self.url}{path}"
        if not isinstance(body, dict):
            raise BadResponse(f"{where}: the response is a JSON {type(body).__name__}, not an object")
        images = body.get("images")
        if not isinstance(images, list) or not 1 <= len(images) <= MAX_IMAGES_PER_ANSWER:
            raise BadResponse(f"{where}: the response has no images (`images` must be a list of 1 to "
                              f"{MAX_IMAGES_PER_ANSWER} base64 strings)")
        data = images[0]
        if not isinstance(data, str):
            raise BadResponse(f"{where}: images[0] is a {type(data).__name__}, not a base64 string")
        if data.startswith("data:"):
            data = data.split(",", 1)[-1]
        reported = self._reported_seed(body, where)
        try:
            raw = base64.b64decode(data, validate=False)
        except ValueError as exc:
            raise BadResponse(f"{where}: images[0] is not base64 ({exc})") from None
        r = self.resolution
        try:
            # Sized from what was asked: a service may answer a larger image (it is scaled down below), not a bomb.
            image = load_image("images[0]", max_pixels=min(MAX_PIXELS, max(16 * r * r, 1 << 20)), data=raw)
        except ImageError as exc:
            raise BadResponse(f"{where}: {exc}") from None
        if image.shape[:2] != (r, r):
            self._warn_once("size", "%s returned %dx%d images for %dx%d requests; resizing them", self.url,
                            image.shape[1], image.shape[0], r, r)
            image = np.asarray(Image.fromarray(image).resize((r, r), Image.BICUBIC), dtype=np.uint8)
        if reported is not None and reported != seed:
            self._warn_once("seed", "%s used seed %s for a request with seed %s: its images are not reproducible",
                            self.url, reported, seed)
        return image

    @staticmethod
    def _reported_seed(body: dict, where: str) -> int | None:
        """The seed ``info`` reports (A1111: a JSON text holding an object), checked; None where it reports none."""
        info = body.get("info")
        if info is None or info == "":
            return None
        if isinstance(info, str):
            if len(info) > MAX_INFO_CHARS:
                raise BadResponse(f"{where}: `info` is {len(info)} characters, over {MAX_INFO_CHARS}")
            try:
                info = loads_bounded(info.encode("utf-8", "surrogatepass"))
            except ValueError as exc:
                raise BadResponse(f"{where}: `info` is not valid JSON ({exc})") from None
        if not isinstance(info, dict):
            raise BadResponse(f"{where}: `info` is a JSON {type(info).__name__}, not an object")
        seed = info.get("seed")
        if seed is None:
            return None
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed < 2**64:
            raise BadResponse(f"{where}: `info` reports seed {_short(seed)}, not an integer in [-1, 2**64)")
        return seed

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- image variations (img2img) --------------------------------------------------------------------------

    def vary_with_seeds(self, images: np.ndarray, prompts: Sequence[str], seeds: Sequence[int], strength: float,
                        steps: int, guidance: float = 1.0) -> np.ndarray:
        """``Varier`` over ``POST /sdapi/v1/img2img``: one request per variation (its init image as a PNG, its seed
        modulo 2**32), with txt2img's pool, retries and deadlines; raises GenerationFailed (``refused`` for the
        refusals) if any variation is missing."""
        from .variation import check_inputs, init_pixels, variation_steps

        check_inputs(images, prompts, seeds)
        variation_steps(strength, steps)
        r = self.resolution
        if len(images) == 0:
            return np.zeros((0, r, r, 3), np.uint8)
        pngs = [_png_b64(im) for im in init_pixels(images, r)]
        return self._gather([functools.partial(self._variation, png, p, int(s) % SEED_MODULUS, float(strength), steps,
                                               guidance) for png, p, s in zip(pngs, prompts, seeds)], "variations")

    def _variation(self, png: str, prompt: str, seed: int, strength: float, steps: int, guidance: float) -> np.ndarray:
        key = ("img2img", hashlib.sha256(png.encode("ascii")).hexdigest(), prompt, seed, strength, int(steps),
               float(guidance), self.resolution)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        payload = {
            "init_images": [png], "denoising_strength": strength, "prompt": prompt, "negative_prompt": "",
            "seed": seed, "steps": int(steps), "cfg_scale": float(guidance), "width": self.resolution,
            "height": self.resolution, "batch_size": 1, "n_iter": 1, "resize_mode": 1, "send_images": True,
            "save_images": False, "include_init_images": False, "sampler_name": self.config.sampler or "DDIM",
        }
        image = self._decode(self._request("POST", IMG2IMG, payload), seed, IMG2IMG)
        with self._cache_lock:
            self._cache[key] = image
            while len(self._cache) > 256:
                self._cache.popitem(last=False)
        return image

    # -- transport -------------------------------------------------------------------------------------------

    def _probe(self) -> dict:
        """What the service says it runs (GET sd-models / options), checked; {} where it does not say."""
        info: dict[str, Any] = {}
        try:
            options = self._request("GET", OPTIONS, None, missing_ok=True)
            models = self._request("GET", SD_MODELS, None, missing_ok=True)
        except ServiceError as exc:
            raise ServiceError(f"cannot reach the http target: {exc}") from None
        checkpoint = _text(options.get("sd_model_checkpoint"), f"{self.url}{OPTIONS}: sd_model_checkpoint") \
            if isinstance(options, dict) else None
        if isinstance(models, list):
            if len(models) > MAX_MODELS:
                raise ServiceError(f"{self.url}{SD_MODELS}: lists {len(models)} models, over {MAX_MODELS}")
            entries = [m for m in models if isinstance(m, dict)]
            current = [m for m in entries if checkpoint and checkpoint in (m.get("title"), m.get("model_name"))]
            chosen = current or entries
            info["models"] = [{k: _text(m.get(k), f"{self.url}{SD_MODELS}: {k}")
                               for k in ("title", "model_name", "hash", "sha256")} for m in chosen]
            audit = [m["audit"] for m in chosen if isinstance(m.get("audit"), dict)]
            if len(audit) == 1:
                info["audit"] = _audit_entry(audit[0], f"{self.url}{SD_MODELS}", self.config.resolution)
        if checkpoint:
            info["checkpoint"] = checkpoint
        return info

    def _request(self, method: str, path: str, payload: Any, missing_ok: bool = False) -> Any:
        cfg = self.config
        attempt = 0
        while True:
            try:
                status, data, kind = self._once(method, path, payload)
                if status == 404 and missing_ok:
                    return None
                if status == 200:
                    if kind and kind not in JSON_TYPES and not kind.endswith("+json"):
                        raise _Invalid(f"{self.url}{path}: the response is {kind}, not JSON")
                    try:
                        return loads_bounded(data)
                    except _TooDeep as exc:
                        raise _Invalid(f"{self.url}{path}: {exc}") from None
                    except ValueError:
                        raise _Retryable(f"{self.url}{path}: the response is not JSON") from None
                snippet = data[:200].decode("utf-8", "replace").strip().replace("\n", " ")
                message = f"{self.url}{path}: HTTP {status}{(': ' + snippet) if snippet else ''}"
                if status in REFUSED_STATUSES and path in (TXT2IMG, IMG2IMG):
                    raise PromptRefused(message)
                if status not in RETRY_STATUSES:
                    raise ServiceError(message)
                raise _Retryable(message)
            except _Invalid as exc:
                # Not retried: a hostile or broken answer is not an outage. On txt2img it costs one row.
                raise (BadResponse if path == TXT2IMG else ServiceError)(str(exc)) from None
            except (_Retryable, OSError, http.client.HTTPException) as exc:
                # One line whatever the service sent (a status line of garbage lands in http.client's messages).
                detail = " ".join(str(exc).split())[:300]
                reason = detail if isinstance(exc, _Retryable) else f"{self.url}{path}: {type(exc).__name__}: {detail}"
                if attempt >= cfg.retries:
                    raise ServiceError(f"{reason} (gave up after {attempt + 1} attempts)") from None
                wait = min(cfg.backoff * 2**attempt, cfg.max_backoff)
                log.info("%s; retrying in %.1f s", reason, wait)
                time.sleep(wait)
                attempt += 1

    def _once(self, method: str, path: str, payload: Any) -> tuple[int, bytes, str]:
        """(status, body, media type) of one exchange, all of it (connect, headers, body) within ``timeout``.

        A per-read socket timeout alone lets a service trickle a byte at a time forever; so a timer also shuts the
        socket down at the deadline, which ends whatever read is blocked (headers included) at once.
        """
        cfg = self.config
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=cfg.timeout)
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the raw socket, under any TLS layer
                except OSError:
                    pass

        deadline = time.monotonic() + cfg.timeout
        timer = threading.Timer(cfg.timeout, cut)
        timer.daemon = True
        timer.start()
        try:
            conn.connect()
            sock = conn.sock  # kept: the connection drops its reference once the response says "close"
            if expired.is_set():
                cut()
            body = None if payload is None else json.dumps(payload).encode("utf-8")
            conn.request(method, self._base + path, body=body, headers=self._headers)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            resp = conn.getresponse()
            kind = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            declared = resp.getheader("Content-Length")
            if declared and declared.strip().isdigit() and int(declared) > cfg.max_response_bytes:
                raise _Invalid(f"{self.url}{path}: response of {int(declared)} bytes, over the limit of "
                               f"{cfg.max_response_bytes}")
            chunks, size = [], 0
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = resp.read1(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > cfg.max_response_bytes:
                    raise _Invalid(f"{self.url}{path}: response larger than the limit of {cfg.max_response_bytes} "
                                   "bytes")
                chunks.append(chunk)
            if expired.is_set():  # the cut can look like the end of a body without a length
                raise TimeoutError(f"no complete response within {cfg.timeout:g} s")
            return resp.status, b"".join(chunks), kind
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # Every socket timeout is set to what is left of the deadline: any of them, or the cut, means it passed.
            if expired.is_set() or isinstance(exc, TimeoutError):
                raise TimeoutError(f"no complete response within {cfg.timeout:g} s") from None
            if isinstance(exc, ValueError):  # a malformed exchange that http.client did not classify
                raise http.client.HTTPException(str(exc)) from None
            raise
        finally:
            timer.cancel()
            conn.close()


def _png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Retryable(Exception):
    pass


class _Invalid(Exception):
    """An answer that breaks the protocol's schema or bounds (not retried)."""


class _TooDeep(ValueError):
    pass


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_depth(data: bytes, limit: int) -> int:
    """The nesting depth of a JSON text (strings skipped), counted without recursion and stopping past ``limit``."""
    structure = _JSON_STRING.sub(b"", data)
    depth = deepest = 0
    step = 1 << 20
    for start in range(0, len(structure), step):
        arr = np.frombuffer(structure, np.uint8, count=min(step, len(structure) - start), offset=start)
        delta = ((arr == 0x5B) | (arr == 0x7B)).astype(np.int32) - ((arr == 0x5D) | (arr == 0x7D))
        if delta.any():
            running = depth + np.cumsum(delta)
            deepest = max(deepest, int(running.max()))
            depth = int(running[-1])
            if deepest > limit:
                break
    return deepest


def loads_bounded(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` of an answer, refusing (``ValueError``) one nested deeper than ``max_depth`` before parsing
    it: the recursive parser would otherwise raise RecursionError, or exhaust the stack, on a hostile body."""
    depth = json_depth(data, max_depth)
    if depth > max_depth:
        raise _TooDeep(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except RecursionError:  # the scan above should make this unreachable
        raise _TooDeep(f"JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason})") from None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: Any, where: str) -> str | None:
    """A short text field of an answer (None stays None); anything else is a one-line ServiceError."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        raise ServiceError(f"{where}: {_short(value)} is not a text of at most {MAX_FIELD_CHARS} characters")
    return value


def _audit_entry(entry: dict, where: str, override: int = 0) -> dict:
    """The ``audit`` field of an ``audit serve`` model entry: its identity and native resolution, checked (an
    invalid resolution is an error unless the user's ``override`` replaces it, then it is dropped)."""
    out: dict[str, Any] = {}
    resolution = entry.get("resolution")
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) \
                or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            if not override:
                raise ServiceError(f"{where}: the service reports resolution {_short(resolution)}, not an integer "
                                   f"in [{MIN_RESOLUTION}, {MAX_RESOLUTION}]; pass ?resolution=N to override it")
        else:
            out["resolution"] = resolution
    identity = entry.get("identity")
    if identity is not None:
        if not isinstance(identity, dict):
            raise ServiceError(f"{where}: audit.identity is not an object")
        out["identity"] = {k: _text(identity.get(k), f"{where}: audit.identity.{k}") for k in ("name", "hash")}
    return out


def _config(base: HTTPTargetConfig, options: dict[str, Any], url: str) -> HTTPTargetConfig:
    """``base`` with ``options`` (from keywords or the URL's query string, so values may be strings) applied."""
    fields = {f.name: f for f in dataclasses.fields(HTTPTargetConfig)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UsageError(f"{url}: unknown http target option(s) {unknown}; valid options are {sorted(fields)}")
    values = {}
    for name, value in options.items():
        kind = type(getattr(base, name))
        try:
            values[name] = kind(value)
        except (TypeError, ValueError):
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise UsageError(f"{url}: http target option {name}={value!r} is not {what}") from None
    cfg = dataclasses.replace(base, **values)
    if (cfg.concurrency < 1 or cfg.retries < 0 or not 0 < cfg.timeout < float("inf") or not cfg.backoff >= 0
            or not (cfg.resolution == 0 or MIN_RESOLUTION <= cfg.resolution <= MAX_RESOLUTION)
            or cfg.max_response_bytes < 1):
        raise UsageError(f"{url}: http target options need concurrency >= 1, retries >= 0, 0 < timeout < inf, "
                         f"backoff >= 0, resolution 0 or in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
                         "max_response_bytes >= 1")
    return cfg
