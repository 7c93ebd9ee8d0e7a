"""``audit serve``: any target behind the ``/sdapi/v1/txt2img`` protocol, on a local port.

Lets a local model be audited exactly as a deployed service would be (``--target http://127.0.0.1:PORT``), and
is the server the HTTP tests run against. It implements the part of the AUTOMATIC1111 API that black-box
auditing needs:

- ``POST /sdapi/v1/txt2img`` ``{prompt, seed, steps, cfg_scale, width, height, batch_size, n_iter}`` ->
  ``{"images": [base64 PNG, ...], "parameters": {...}, "info": "<json with seed, all_seeds>"}``; image ``k``
  uses seed ``seed + k`` (A1111's convention), ``seed`` -1 draws one;
- ``GET /sdapi/v1/sd-models`` (one entry: the target, with an extra ``audit`` field giving its identity and
  native resolution) and ``GET /sdapi/v1/options`` (``sd_model_checkpoint``);
- ``POST /sdapi/v1/img2img`` ``{init_images: [base64 image], denoising_strength, prompt, seed, steps, cfg_scale,
  width, height, sampler_name, batch_size, n_iter}`` -> the txt2img response: the target's ``vary_with_seeds``
  (DDIM over ``steps`` of which the last ``int(denoising_strength x steps)`` run, as the web UI counts them), image
  ``k`` from ``init_images[k % len]`` with seed ``seed + k``;
- ``GET /sdapi/v1/samplers`` (``[{name, aliases, options}]``: DDIM, the one sampler served), ``GET
  /sdapi/v1/progress`` (``{progress, eta_relative, state, current_image, textinfo}``: the denoising steps done of
  the generation in flight, as the web UI counts them) and ``POST
  /sdapi/v1/options`` (sets options; answers ``null`` as the web UI does; another checkpoint is refused, 422).

Requests are checked before anything reaches the model: a missing, negative or non-integer ``Content-Length``
(411/400), a body over ``MAX_BODY`` (413), ``NaN``/``Infinity`` or a number out of range (400). A connection that
sends nothing for ``request_timeout`` seconds is closed, so idle clients hold no thread and cannot keep the server
from stopping. Generation is serialised (one model, one lock). The server stops by itself after ``max_requests``
requests or ``idle_timeout`` seconds without one, if given. ``fault`` is a hook for tests: called with the request number,
the path and the parsed JSON body (None for a GET or a body that is not JSON), it may return ``("status", code)``
to answer an error or ``("stall", seconds)`` to hang and then drop the connection without an answer.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import secrets
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
from PIL import Image

from .imagefolder import ImageError, load_image
from .targets.base import on_denoising_step
from .targets.http import IMG2IMG, OPTIONS, SD_MODELS, TXT2IMG
from .targets.variation import init_pixels

PROGRESS = "/sdapi/v1/progress"
SAMPLERS = "/sdapi/v1/samplers"
SAMPLER = {"name": "DDIM", "aliases": ["ddim"], "options": {}}
# An img2img body carries its init images (base64): room for a few full-size PNGs.
MAX_IMG2IMG_BODY = 64 << 20

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_IMAGES = 16  # per request: batch_size x n_iter
MAX_STEPS = 1000
MAX_CFG_SCALE = 100.0
MAX_SIDE = 8192
REQUEST_TIMEOUT = 30.0  # seconds a connection may stay silent (before and within a request)

Fault = Callable[[int, str, Any], "tuple[str, float] | None"]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Txt2ImgServer:
    """A ThreadingHTTPServer serving one generator; ``start()`` runs it on a daemon thread."""

    def __init__(self, generator, host: str = "127.0.0.1", port: int = 0, max_requests: int | None = None,
                 idle_timeout: float | None = None, fault: Fault | None = None, default_steps: int = 20,
                 request_timeout: float = REQUEST_TIMEOUT):
        if not hasattr(generator, "generate_with_seeds"):
            raise TypeError(f"{type(generator).__name__} cannot be served: it has no generate_with_seeds()")
        self.generator = generator
        self.max_requests = max_requests
        self.idle_timeout = idle_timeout
        self.fault = fault
        self.default_steps = default_steps
        self.request_timeout = request_timeout
        self.requests = 0
        self._lock = threading.Lock()  # one generation at a time
        self._count_lock = threading.Lock()
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        # Non-daemon handler threads, joined on close: a request in flight when a stop condition hits (the last
        # of --max-requests, for one) is answered before the process exits. Stalls (tests) end on stop.
        self.httpd.daemon_threads = False
        self.httpd.block_on_close = True
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self.options = {"sd_model_checkpoint": generator.identity()["name"], "samples_format": "png",
                        "eta_ddim": 0.0, "img2img_fix_steps": False}
        self._job: dict | None = None  # the generation in progress, for /progress

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> "Txt2ImgServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, daemon=True)
        self._watchdog.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while not self._stopped.wait(0.2):
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
        if self._thread is not None and self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> "Txt2ImgServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _watch(self) -> None:
        while not self._stopped.wait(0.05):
            idle = time.monotonic() - self._last
            if self.idle_timeout is not None and idle > self.idle_timeout:
                log.info("no request for %.0f s: stopping", idle)
                self._stopped.set()
            if self.max_requests is not None and self.requests >= self.max_requests:
                log.info("served %d requests: stopping", self.requests)
                self._stopped.set()
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()

    def _next_request(self) -> int:
        with self._count_lock:
            self.requests += 1
            self._last = time.monotonic()
            return self.requests

    # -- API -------------------------------------------------------------------------------------------------

    def model_entry(self) -> dict:
        ident = self.generator.identity()
        return {
            "title": ident["name"], "model_name": ident["name"], "hash": ident["hash"][:10], "sha256": ident["hash"],
            "filename": "", "config": None,
            "audit": {"identity": ident, "resolution": int(self.generator.resolution)},
        }

    def txt2img(self, req: Any) -> dict:
        if not isinstance(req, dict):
            raise _BadRequest(422, "the body must be a JSON object")
        prompt = req.get("prompt")
        if not isinstance(prompt, str):
            raise _BadRequest(422, "prompt must be a string")
        ints = {}
        for key, default in (("steps", self.default_steps), ("seed", -1), ("batch_size", 1), ("n_iter", 1),
                             ("width", self.generator.resolution), ("height", self.generator.resolution)):
            value = req.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _BadRequest(422, f"{key} must be an integer")
            ints[key] = value
        cfg_scale = req.get("cfg_scale", 7.0)
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
            raise _BadRequest(422, "cfg_scale must be a number")
        # Out of range is a bad request (400), caught here before a value reaches the model or sizes an array.
        if not (math.isfinite(cfg_scale) and 0 <= cfg_scale <= MAX_CFG_SCALE):
            raise _BadRequest(400, f"cfg_scale must be a finite number in [0, {MAX_CFG_SCALE:g}]")
        if not 1 <= ints["steps"] <= MAX_STEPS:
            raise _BadRequest(400, f"steps must be in [1, {MAX_STEPS}]")
        if not -1 <= ints["seed"] < 2**63 - MAX_IMAGES:
            raise _BadRequest(400, "seed must be -1 (random) or in [0, 2**63)")
        for key in ("width", "height", "batch_size", "n_iter"):
            if not 1 <= ints[key] <= (MAX_SIDE if key in ("width", "height") else MAX_IMAGES):
                raise _BadRequest(400, f"{key} {ints[key]} is out of range")
        res = int(self.generator.resolution)
        if (ints["width"], ints["height"]) != (res, res):
            raise _BadRequest(422, f"this server generates {res}x{res} images, not {ints['width']}x{ints['height']}")
        count = ints["batch_size"] * ints["n_iter"]
        if count > MAX_IMAGES:
            raise _BadRequest(422, f"need 1 <= batch_size x n_iter <= {MAX_IMAGES}")
        seed = ints["seed"] if ints["seed"] >= 0 else secrets.randbelow(2**32)
        seeds = [seed + k for k in range(count)]
        with self._lock, self._reporting("txt2img", ints["n_iter"], count, ints["steps"]):
            images = self.generator.generate_with_seeds([prompt] * count, seeds, ints["steps"], float(cfg_scale))
        info = {"prompt": prompt, "seed": seed, "all_seeds": seeds, "steps": ints["steps"], "cfg_scale": cfg_scale,
                "width": res, "height": res, "sd_model_name": self.generator.identity()["name"]}
        return {"images": [_png_b64(im) for im in images], "parameters": req, "info": json.dumps(info)}

    # -- the endpoints common A1111 clients call besides txt2img ------------------------------------------------

    def img2img(self, req: Any) -> dict:
        vary = getattr(self.generator, "vary_with_seeds", None)
        if vary is None:
            raise _BadRequest(404, f"{self.generator.identity()['name']} has no image-variation (img2img) access")
        if not isinstance(req, dict):
            raise _BadRequest(422, "the body must be a JSON object")
        prompt = req.get("prompt", "")
        if not isinstance(prompt, str):
            raise _BadRequest(422, "prompt must be a string")
        inits = req.get("init_images")
        if not isinstance(inits, list) or not inits or not all(isinstance(i, str) for i in inits):
            raise _BadRequest(422, "init_images must be a non-empty list of base64 images")
        strength = req.get("denoising_strength", 0.75)  # the web UI's default
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise _BadRequest(422, "denoising_strength must be a number in (0, 1]")
        sampler = req.get("sampler_name") or req.get("sampler_index") or "DDIM"
        if str(sampler).lower() not in ("ddim",):
            raise _BadRequest(404, f"Sampler not found: {sampler!r}; this server samples with DDIM")
        images = [init_pixels(_decode_init(i)[None], int(self.generator.resolution))[0] for i in inits]
        fields = self._generation_fields(req)
        count, seed = fields["count"], fields["seed"]
        seeds = [seed + k for k in range(count)]
        if int(float(strength) * fields["steps"]) < 1:
            raise _BadRequest(422, f"denoising_strength {strength} x steps {fields['steps']} runs no step")
        with self._lock, self._reporting("img2img", fields["n_iter"], count, int(float(strength) * fields["steps"])):
            out = vary(np.stack([images[k % len(images)] for k in range(count)]), [prompt] * count, seeds,
                       float(strength), fields["steps"], fields["cfg_scale"])
        res = int(self.generator.resolution)
        info = {"prompt": prompt, "seed": seed, "all_seeds": seeds, "steps": fields["steps"],
                "cfg_scale": fields["cfg_scale"], "denoising_strength": strength, "sampler_name": "DDIM",
                "width": res, "height": res, "sd_model_name": self.generator.identity()["name"]}
        parameters = dict(req)
        if not req.get("include_init_images"):
            parameters["init_images"] = None  # as the web UI answers: the images are not echoed back
        return {"images": [_png_b64(im) for im in out], "parameters": parameters, "info": json.dumps(info)}

    def _generation_fields(self, req: dict) -> dict:
        """The integer and guidance fields txt2img and img2img share, checked as txt2img checks them."""
        ints = {}
        res = int(self.generator.resolution)
        for key, default in (("steps", self.default_steps), ("seed", -1), ("batch_size", 1), ("n_iter", 1),
                             ("width", res), ("height", res)):
            value = req.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _BadRequest(422, f"{key} must be an integer")
            ints[key] = value
        cfg_scale = req.get("cfg_scale", 7.0)
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
            raise _BadRequest(422, "cfg_scale must be a number")
        if (ints["width"], ints["height"]) != (res, res):
            raise _BadRequest(422, f"this server makes {res}x{res} images, not {ints['width']}x{ints['height']}")
        count = ints["batch_size"] * ints["n_iter"]
        if not 1 <= count <= MAX_IMAGES or ints["steps"] < 1 or ints["steps"] > 1000:
            raise _BadRequest(422, f"need 1 <= batch_size x n_iter <= {MAX_IMAGES} and 1 <= steps <= 1000")
        if ints["seed"] >= 2**63 - MAX_IMAGES:
            raise _BadRequest(422, "seed must be below 2**63")
        seed = ints["seed"] if ints["seed"] >= 0 else secrets.randbelow(2**32)
        return {"steps": ints["steps"], "seed": seed, "count": count, "cfg_scale": float(cfg_scale),
                "n_iter": ints["n_iter"]}

    @contextmanager
    def _reporting(self, job: str, n_iter: int, images: int, steps: int):
        """Count the denoising steps of the generation run inside the block (``images`` images of ``steps`` steps
        each, the web UI's ``n_iter`` jobs), for ``progress``."""
        state = {"job": job, "job_count": n_iter, "sampling_steps": steps, "total": images * steps, "done": 0,
                 "started": time.time()}

        def advance(n: int) -> None:
            state["done"] = min(state["total"], state["done"] + n)

        self._job = state
        try:
            with on_denoising_step(advance):
                yield
        finally:
            self._job = None

    def progress(self) -> dict:
        """The web UI's ProgressResponse (its ``progressapi``): idle, progress and eta 0 and no job; during a
        generation the fraction of its denoising steps done, reported as the web UI counts it: ``job_no`` of
        ``job_count`` (the request's ``n_iter``) jobs done, ``sampling_step`` of ``sampling_steps`` in the current
        one, progress ``0.01 + job_no / job_count + sampling_step / sampling_steps / job_count`` (the web UI's 0.01
        keeps the eta finite) and ``eta_relative`` the seconds left at the rate so far."""
        job = self._job
        if job is None:
            state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
                     "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        done = job["done"] / job["total"] if job["total"] else 0.0
        jobs = job["job_count"] * done
        job_no = min(int(jobs), job["job_count"] - 1)
        step = min(int((jobs - job_no) * job["sampling_steps"]), job["sampling_steps"])
        progress = 0.01 + job_no / job["job_count"] + step / job["sampling_steps"] / job["job_count"]
        elapsed = time.time() - job["started"]
        state = {"skipped": False, "interrupted": False, "job": job["job"], "job_count": job["job_count"],
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job["started"])),
                 "job_no": job_no, "sampling_step": step, "sampling_steps": job["sampling_steps"]}
        # Past the last step (the decode) the web UI's eta turns negative; none is left.
        return {"progress": min(progress, 1.0), "eta_relative": max(0.0, elapsed / progress - elapsed), "state": state,
                "current_image": None, "textinfo": None}

    def set_options(self, req: Any) -> None:
        if not isinstance(req, dict):
            raise _BadRequest(422, "the body must be a JSON object of options")
        checkpoint = req.get("sd_model_checkpoint")
        names = {self.model_entry()["title"], self.model_entry()["model_name"]}
        if checkpoint is not None and checkpoint not in names:
            raise _BadRequest(422, f"model {checkpoint!r} not found; this server runs {sorted(names)[0]!r}")
        self.options.update(req)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = server.request_timeout  # StreamRequestHandler sets it on the socket: silent clients are cut

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
                self.close_connection = True

            def _faulted(self, n: int, request: Any = None) -> bool:
                action = server.fault(n, self.path, request) if server.fault else None
                if not action:
                    return False
                kind, value = action
                if kind == "status":
                    self._send(int(value), {"error": "injected fault", "detail": f"request {n}"})
                elif kind == "stall":
                    server._stopped.wait(float(value))
                    self.close_connection = True  # drop the connection without an answer
                return True

            def _content_length(self) -> int:
                raw = self.headers.get("Content-Length")
                if raw is None:
                    if self.headers.get("Transfer-Encoding"):
                        self.close_connection = True  # the body was not read: the connection cannot be reused
                    raise _BadRequest(411, "a Content-Length header is required")
                if not raw.strip().isdigit():  # "-1", "+5", "1e3", "abc" are all refused, not parsed
                    self.close_connection = True
                    raise _BadRequest(400, f"Content-Length {raw[:40]!r} is not a non-negative integer")
                length, limit = int(raw), MAX_IMG2IMG_BODY if self.path == IMG2IMG else MAX_BODY
                if length > limit:
                    self.close_connection = True
                    raise _BadRequest(413, f"request body over {limit} bytes")
                return length

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                n = server._next_request()
                if self._faulted(n):
                    return
                if self.path == SD_MODELS:
                    self._send(200, [server.model_entry()])
                elif self.path == OPTIONS:
                    self._send(200, dict(server.options))
                elif self.path == SAMPLERS:
                    self._send(200, [SAMPLER])
                elif self.path.split("?", 1)[0] == PROGRESS:
                    self._send(200, server.progress())
                else:
                    self._send(404, {"error": "Not Found", "detail": self.path})

            def do_POST(self) -> None:  # noqa: N802
                n = server._next_request()
                try:
                    length = self._content_length()
                    try:
                        raw = self.rfile.read(length)
                    except OSError:  # the client went silent (request_timeout) or away mid-body: nothing to answer
                        self.close_connection = True
                        return
                    try:
                        req, bad = json.loads(raw or b"null", parse_constant=_no_constant,
                                               parse_float=_finite), ""
                    except _NotANumber as exc:
                        req, bad = None, f"the body is not JSON ({exc})"
                    except (ValueError, RecursionError):
                        req, bad = None, "the body is not JSON"
                    if self._faulted(n, req):
                        return
                    routes = {TXT2IMG: server.txt2img, IMG2IMG: server.img2img, OPTIONS: server.set_options}
                    if self.path not in routes:
                        raise _BadRequest(404, f"no endpoint {self.path}")
                    if bad:
                        raise _BadRequest(400, bad)
                    self._send(200, routes[self.path](req))
                except _BadRequest as exc:
                    self._send(exc.status, {"error": str(exc)})
                except Exception as exc:  # the model failed: answer 500, keep serving
                    log.exception("txt2img failed")
                    self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        return Handler


class _NotANumber(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotANumber(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotANumber(f"{text[:40]} is out of the range of a number")
    return value


def _decode_init(data: str) -> np.ndarray:
    """A base64 image (optionally a ``data:`` URL, as web clients send) -> uint8 RGB [H, W, 3]."""
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        raw = base64.b64decode(data, validate=False)
    except ValueError as exc:
        raise _BadRequest(422, f"an init image is not base64 ({exc})") from None
    try:  # the one decode path, with the image limits every image that enters gets
        return load_image("init_images", data=raw)
    except ImageError as exc:
        raise _BadRequest(422, f"an init image is refused ({exc})") from None


def serve(target: str, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu", allow_pickle: bool = False,
          max_requests: int | None = None, idle_timeout: float | None = None,
          on_ready: Callable[[str], None] | None = None) -> int:
    """Load ``target`` and serve it until interrupted or a stop condition; returns the number of requests served."""
    from .targets.builtin import load_target

    generator = load_target(target, device=device, allow_pickle=allow_pickle)
    server = Txt2ImgServer(generator, host, port, max_requests=max_requests, idle_timeout=idle_timeout)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can use the model", host)
    if on_ready:
        on_ready(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
        raise
    return server.requests
