"""The black-box HTTP target against a local /sdapi/v1/txt2img server (127.0.0.1, stops by itself) serving the
tiny target: same images as the model it serves, the protocol, retries through errors and stalls, a caption that
keeps failing, the concurrency limit, features and scan that resume after an outage with nothing lost, the
`audit serve-target` command and its refusals of malformed requests; and against a hostile service (tests/hostile_http.py),
each misbehaviour giving a row status or a one-line error in bounded time and memory."""

import base64
import http.client
import io
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from typer.testing import CliRunner

from audit import api
from audit.cli import app
from audit.errors import UsageError
from audit.features import FeatureStore, KEYS
from audit.seeding import image_seeds
from audit.targets import load_target
from audit.targets.diffusion import DiffusersGenerator
from audit.targets.http import BadResponse, GenerationFailed, HTTPGenerator, ServiceError, loads_bounded
from audit.serve_target import Txt2ImgServer
from audit.toy import scenes

import hostile_http as hh
from badcorpus import png_of_zeros, png_with_header_only
from targets_fixtures import one_torch_thread  # noqa: F401  (fixture)

CAPTIONS = ["a small red circle at the top left on a grey background", "a large blue square at the center",
            "a small green triangle at the bottom"]
FAST = "timeout=2&retries=2&backoff=0.01"


class Faults:
    """The server's fault hook: rules decide per request; records requests and peak concurrency."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self, rule=None, hold: float = 0.0):
        with self.lock:
            self.rule, self.hold, self.seen, self.active, self.peak = rule, hold, [], 0, 0

    def __call__(self, n, path, request):
        with self.lock:
            self.seen.append((path, (request or {}).get("prompt")))
            self.active += 1
            self.peak = max(self.peak, self.active)
            k = sum(1 for p, _ in self.seen if p == path)
        try:
            if self.hold:
                time.sleep(self.hold)
            return self.rule(k, path, request or {}) if self.rule else None
        finally:
            with self.lock:
                self.active -= 1

    def posts(self):
        return [prompt for path, prompt in self.seen if path == "/sdapi/v1/txt2img"]


@pytest.fixture(scope="module")
def local(tiny_world):
    return DiffusersGenerator.from_folder(tiny_world["target"], name="tiny-sd")


@pytest.fixture(scope="module")
def server(local):
    faults = Faults()
    srv = Txt2ImgServer(local, idle_timeout=300, fault=faults).start()
    srv.faults = faults
    yield srv
    srv.stop()


@pytest.fixture
def faults(server):
    server.faults.reset()
    yield server.faults
    server.faults.reset()


def _expected(local, captions, n_gen, seed, steps):
    """What the server makes: one image per request (batched matmuls may round a pixel differently)."""
    images = [local.generate_with_seeds([c], [s % 2**32], steps)[0]
              for c in captions for s in image_seeds(seed, c, n_gen)]
    return np.stack(images).reshape(len(captions), n_gen, *images[0].shape)


def test_http_target_returns_the_served_models_images(server, local, faults):
    h = load_target(server.url)
    assert isinstance(h, HTTPGenerator) and h.resolution == 32  # the server reports its native size
    assert h.identity()["name"] == server.url
    images = h.generate(CAPTIONS[:2], n_gen=2, seed=4, steps=2)
    np.testing.assert_array_equal(images, _expected(local, CAPTIONS[:2], 2, 4, 2))  # PNG: lossless
    assert len(faults.posts()) == 4  # one request per image


def test_identity_covers_url_and_served_model_not_client_options(server, tiny_world, faults):
    a = load_target(server.url).identity()
    assert load_target(f"{server.url}?{FAST}").identity() == a
    from audit.testing.tiny import build_tiny_ldm

    other_model = DiffusersGenerator.from_folder(build_tiny_ldm(tiny_world["target"].parent / "ldm_for_http"))
    with Txt2ImgServer(other_model, idle_timeout=60) as other:
        b = HTTPGenerator(other.url).identity()
    assert b["hash"] != a["hash"]
    # A service without the model endpoints is identified by its URL alone.
    faults.reset(rule=lambda k, path, req: ("status", 404) if path != "/sdapi/v1/txt2img" else None)
    bare = HTTPGenerator(server.url)
    assert bare.model_info == {} and bare.resolution == 512 and bare.identity()["hash"] != a["hash"]


def _post(server, body, raw=False):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/sdapi/v1/txt2img", body=body if raw else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_txt2img_protocol(server, local, faults):
    status, body = _post(server, {"prompt": CAPTIONS[0], "seed": 11, "steps": 2, "batch_size": 2, "cfg_scale": 1,
                                  "width": 32, "height": 32})
    assert status == 200 and json.loads(body["info"])["all_seeds"] == [11, 12]
    images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in body["images"]])
    np.testing.assert_array_equal(images, local.generate_with_seeds([CAPTIONS[0]] * 2, [11, 12], 2))  # one batch
    assert _post(server, {"prompt": "x", "width": 512, "height": 512}) == (
        422, {"error": "this server generates 32x32 images, not 512x512"})
    assert _post(server, {"seed": 1})[0] == 422
    assert _post(server, b"{not json", raw=True) == (400, {"error": "the body is not JSON"})


def test_retries_ride_through_server_errors_and_a_stall(server, local, faults):
    def rule(k, path, req):
        if path == "/sdapi/v1/txt2img":
            if k <= 2:
                return ("status", 503)
            if k == 3:
                return ("stall", 10)  # the client gives up after its 1 s deadline and retries
        return None

    faults.reset(rule)
    h = load_target(f"{server.url}?timeout=1&retries=3&backoff=0.01&concurrency=1")
    started = time.monotonic()
    images = h.generate(CAPTIONS[:1], n_gen=2, seed=1, steps=2)
    np.testing.assert_array_equal(images, _expected(local, CAPTIONS[:1], 2, 1, 2))
    assert len(faults.posts()) == 2 + 3 and time.monotonic() - started < 10


def test_a_caption_that_keeps_failing_is_reported_alone_and_can_be_redone(server, local, faults):
    faults.reset(lambda k, path, req: ("status", 500) if req.get("prompt") == CAPTIONS[1] else None)
    h = load_target(f"{server.url}?{FAST}")
    with pytest.raises(GenerationFailed) as err:
        h.generate(CAPTIONS, n_gen=2, seed=2, steps=2)
    exc = err.value
    assert sorted(exc.errors) == [1] and "HTTP 500" in exc.errors[1] and "gave up after 3 attempts" in exc.errors[1]
    expected = _expected(local, CAPTIONS, 2, 2, 2)
    np.testing.assert_array_equal(exc.images[[0, 2]], expected[[0, 2]])
    assert not exc.images[1].any()
    faults.reset()
    np.testing.assert_array_equal(h.generate(CAPTIONS[1:2], n_gen=2, seed=2, steps=2)[0], expected[1])
    # The images that had succeeded are not requested again when the whole batch is retried.
    before = len(faults.posts())
    np.testing.assert_array_equal(h.generate(CAPTIONS, n_gen=2, seed=2, steps=2), expected)
    assert len(faults.posts()) == before


def test_requests_in_flight_never_exceed_the_concurrency_limit(server, faults):
    faults.reset(hold=0.3)
    load_target(f"{server.url}?concurrency=2").generate(CAPTIONS, n_gen=2, seed=3, steps=1)
    assert faults.peak == 2
    faults.reset(hold=0.3)
    load_target(f"{server.url}?concurrency=1").generate(CAPTIONS[:1], n_gen=2, seed=3, steps=1)
    assert faults.peak == 1


def test_credentials_in_the_url_become_basic_auth_and_stay_out_of_the_identity(server, faults):
    host, port = server.httpd.server_address[:2]
    h = load_target(f"http://user:p%40ss@{host}:{port}?{FAST}")
    assert h.url == server.url and h.identity() == load_target(server.url).identity()
    assert h._headers["Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()


def test_bad_urls_and_options_are_usage_errors(server):
    with pytest.raises(UsageError, match="unknown http target option"):
        load_target(f"{server.url}?timeot=3")
    with pytest.raises(UsageError, match="option concurrency='x' is not an integer"):
        load_target(f"{server.url}?concurrency=x")
    with pytest.raises(ServiceError, match="cannot reach the http target: .*gave up after 1 attempts"):
        load_target("http://127.0.0.1:9?retries=0&timeout=1")


# ---------------------------------------------------------------------------------------------- through features


@pytest.fixture(scope="module")
def aux(tmp_path_factory):
    images, captions = scenes.scene_images(3, "members", 6)
    return scenes.write_imagefolder(tmp_path_factory.mktemp("http_aux") / "aux", images, captions,
                                    [True, False] * 3), captions


def _featurize(url, tiny_world, data, out, resume=False):
    return api.featurize(url, data, out, embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]),
                         n_gen=1, steps=2, seed=0, batch_size=2, resume=resume, quiet=True)


@pytest.fixture(scope="module")
def clean_store(server, tiny_world, aux, tmp_path_factory):
    out = tmp_path_factory.mktemp("http_clean") / "store.h5"
    server.faults.reset()
    _featurize(f"{server.url}?{FAST}", tiny_world, aux[0], out)
    return out


def _same_store(a, b):
    ra, rb = FeatureStore.open(a).read(ok_only=False), FeatureStore.open(b).read(ok_only=False)
    for k in KEYS:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


def test_features_over_http_finish_through_errors_and_resume_after_an_outage(server, tiny_world, aux, clean_store,
                                                                             faults, tmp_path):
    captions = aux[1]
    # Transient errors and a stall: the store is the clean one.
    faults.reset(lambda k, path, req: ("status", 502) if k in (2, 5) else ("stall", 5) if k == 7 else None)
    _featurize(f"{server.url}?timeout=1&retries=2&backoff=0.01", tiny_world, aux[0], tmp_path / "a.h5")
    _same_store(tmp_path / "a.h5", clean_store)
    # An outage for the rows of the second batch: the run stops with a one-line error after committing batch 1 ...
    faults.reset(lambda k, path, req: ("status", 503) if req.get("prompt") in captions[2:4] else None)
    args = ["features", "--target", f"{server.url}?{FAST}", "--data", str(aux[0]), "--out", str(tmp_path / "b.h5"),
            "--embedder", str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"]), "--n-gen", "1",
            "--steps", "2", "--batch-size", "2", "--quiet"]
    result = CliRunner().invoke(app, args)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]  # (libraries log progress too)
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("error: http://127.0.0.1:") and "HTTP 503" in errors[0]
    assert FeatureStore.open(tmp_path / "b.h5").n_committed == 2
    # ... and --resume, once the service is back, completes it: nothing lost, nothing twice.
    faults.reset()
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    _same_store(tmp_path / "b.h5", clean_store)
    assert sorted(faults.posts()) == sorted(captions[2:])  # only the rows that were not committed


def test_scan_over_http_resumes_after_an_outage_with_nothing_lost(server, tiny_world, aux, clean_store, faults,
                                                                  tmp_path, monkeypatch):
    from audit.report.jsonl import read_jsonl

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home" / "audit"))
    api.train(clean_store, tmp_path / "heads", attacks="II-S", epochs=1, register=False, folds=0)
    models = dict(embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]))
    auditor = api.Auditor(f"{server.url}?{FAST}", tmp_path / "heads", batch_size=2, **models)
    auditor.scan(aux[0], tmp_path / "clean.jsonl", quiet=True)
    # The service fails one row of the second batch for good: the scan stops there, in one line ...
    faults.reset(lambda k, path, req: ("status", 500) if req.get("prompt") == aux[1][3] else None)
    cut = CliRunner().invoke(app, ["scan", str(aux[0]), "--target", f"{server.url}?{FAST}", "--heads",
                                   str(tmp_path / "heads"), "--embedder", models["embedder"], "--captioner",
                                   models["captioner"], "--batch-size", "2", "--quiet", "--out",
                                   str(tmp_path / "cut.jsonl")])
    errors = [ln for ln in cut.stderr.splitlines() if ln.startswith("error:")]
    assert cut.exit_code == 1 and len(errors) == 1 and "HTTP 500" in errors[0]
    assert [r["id"] for r in read_jsonl(tmp_path / "cut.jsonl")[0]] == ["img_00000.png", "img_00001.png"]
    # ... and resuming once it is back completes the results: every row once, as in the clean scan.
    faults.reset()
    auditor.scan(aux[0], tmp_path / "cut.jsonl", resume=True, quiet=True)
    a, b = read_jsonl(tmp_path / "clean.jsonl")[0], read_jsonl(tmp_path / "cut.jsonl")[0]
    assert [r["id"] for r in b] == [r["id"] for r in a] and len(b) == 6
    for x, y in zip(a, b):
        assert (x["status"], x["verdict"]) == (y["status"], y["verdict"])
        assert x["probability"] == pytest.approx(y["probability"], abs=1e-5)


def test_a_refused_prompt_fails_its_row_and_the_run_goes_on(server, tiny_world, aux, clean_store, faults, tmp_path,
                                                            monkeypatch):
    """HTTP 422 (a content filter) for one caption: that row is `generation_refused` in the store and in a scan,
    every other row equals the clean run, and nothing is retried (a refusal is an answer, not an outage)."""
    from audit.report.jsonl import read_jsonl

    captions = aux[1]
    faults.reset(lambda k, path, req: ("status", 422) if req.get("prompt") == captions[3] else None)
    url = f"{server.url}?timeout=5&retries=3&backoff=0.01"
    summary = _featurize(url, tiny_world, aux[0], tmp_path / "s.h5")
    assert summary.status == {"ok": 5, "generation_refused": 1}
    assert faults.posts().count(captions[3]) == 1
    got = FeatureStore.open(tmp_path / "s.h5").read(ok_only=False)
    want = FeatureStore.open(clean_store).read(ok_only=False)
    assert got["status"][3] == "generation_refused" and "HTTP 422" in got["error"][3]
    assert got["error"][3].startswith(str(aux[0])) and not got["gen_pixels"][3].any()
    keep = [i for i in range(6) if i != 3]
    for k in ("gen_pixels", "query_pixels"):
        np.testing.assert_array_equal(got[k][keep], want[k][keep], err_msg=k)
    for k in ("gen_img_emb", "caption_emb"):  # a smaller embedding batch: float rounding only
        np.testing.assert_allclose(got[k][keep], want[k][keep], atol=1e-5, err_msg=k)

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    api.train(clean_store, tmp_path / "heads", attacks="II-S", epochs=1, register=False, folds=0)
    result = CliRunner().invoke(app, ["scan", str(aux[0]), "--target", url, "--heads", str(tmp_path / "heads"),
                                      "--embedder", str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"]),
                                      "--batch-size", "2", "--quiet", "--out", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "r.jsonl")[0]
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["generation_refused"] + ["ok"] * 2
    assert rows[3]["verdict"] is None and "HTTP 422" in rows[3]["error"]


def _raw_exchange(server, head: bytes, body: bytes = b"", timeout: float = 10):
    """Send raw request bytes to the emulator; (status, JSON body) of its answer."""
    import socket

    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize("length, status", [("-1", 400), ("abc", 400), ("1e3", 400), ("+5", 400),
                                            (str(2**21), 413), (None, 411)])
def test_the_emulator_answers_a_bad_content_length_in_json_not_500(server, faults, length, status):
    head = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += (b"" if length is None else f"Content-Length: {length}\r\n".encode()) + b"\r\n"
    got, body = _raw_exchange(server, head, b'{"prompt": "x"}')
    assert got == status and set(body) == {"error"} and "\n" not in body["error"]
    assert faults.posts() == []  # refused before the request went any further


@pytest.mark.parametrize("field, value", [("cfg_scale", "NaN"), ("cfg_scale", "Infinity"), ("cfg_scale", "-Infinity"),
                                          ("cfg_scale", "1e309"), ("cfg_scale", "-1"), ("cfg_scale", "1000"),
                                          ("steps", "0"), ("steps", "100000"), ("seed", "-5"), ("seed", "1e400"),
                                          ("seed", str(2**64)), ("width", str(10**6)), ("height", "-8"),
                                          ("batch_size", "0")])
def test_the_emulator_refuses_nan_inf_and_out_of_range_numbers_before_the_model(server, local, faults,
                                                                                 monkeypatch, field, value):
    calls = []
    real = local.generate_with_seeds
    monkeypatch.setattr(local, "generate_with_seeds", lambda *a, **k: calls.append(a) or real(*a, **k))
    body = f'{{"prompt": "x", "steps": 1, "{field}": {value}}}'
    status, answer = _post(server, body.encode(), raw=True)
    assert status == 400 and "\n" not in answer["error"], (status, answer)
    assert calls == []


def test_idle_connections_time_out_and_cannot_keep_the_server_alive(local):
    """A client that connects and says nothing (or stops mid-body) holds no thread: --idle-timeout still ends it."""
    import socket

    srv = Txt2ImgServer(local, idle_timeout=0.5, request_timeout=0.5).start()
    host, port = srv.httpd.server_address[:2]
    silent = socket.create_connection((host, port))
    half = socket.create_connection((host, port))
    half.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    try:
        assert srv.wait(5)
        srv.stop()  # joins the handler threads: bounded by the request timeout, not by the clients
        assert time.monotonic() - started < 3
        assert silent.recv(10) == b"" and half.recv(10) == b""  # both were closed
    finally:
        silent.close()
        half.close()


@pytest.mark.slow
def test_audit_serve_target_command_serves_until_its_request_budget(tiny_world):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "audit.cli", "serve-target", "--target", str(tiny_world["target"]), "--port", "0",
         "--max-requests", "3", "--idle-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {tiny_world['target']} at http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        h = load_target(url)  # GET options + GET sd-models
        assert h.generate(CAPTIONS[:1], 1, 0, 1).shape == (1, 1, 32, 32, 3)  # + 1 POST = 3 requests
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "stopped after 3 requests" in out


# ---------------------------------------------------------------------------------------------- a hostile service
# Each misbehaviour of tests/hostile_http.py gives a row status (a txt2img answer: that image is refused) or a
# one-line ServiceError (a probe, or a failure that outlasts the retries), in bounded time, never a traceback.


HOSTILE = "timeout=1&retries=1&backoff=0.01&resolution=16"


@pytest.fixture
def hostile():
    service = hh.HostileService().start()
    yield service
    service.stop()


def _one_line(exc):
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def _refused(service, query=HOSTILE):
    """The row the hostile txt2img answer costs: generate() fails that caption, as refused, in one line."""
    h = HTTPGenerator(f"{service.url}?{query}")
    started = time.monotonic()
    with pytest.raises(GenerationFailed) as err:
        h.generate(["a caption"], n_gen=1, seed=0, steps=1)
    assert time.monotonic() - started < 5
    assert err.value.refused == {0}, err.value.errors
    return _one_line(err.value.errors[0])


@pytest.mark.parametrize("resolution", [10**6, -8, 0.5, "512", True])
def test_a_reported_resolution_out_of_bounds_is_a_one_line_error(hostile, resolution):
    hostile.plays["/sdapi/v1/sd-models"] = hh.answer([{"title": "m", "audit": {"resolution": resolution}}])
    with pytest.raises(ServiceError) as err:
        HTTPGenerator(f"{hostile.url}?retries=0")
    assert "resolution" in _one_line(err.value) and "?resolution=N" in str(err.value)
    # The user's own resolution wins (no array is sized from the report) and must itself be in bounds.
    assert HTTPGenerator(f"{hostile.url}?resolution=16").resolution == 16
    with pytest.raises(UsageError, match="resolution 0 or in"):
        HTTPGenerator(f"{hostile.url}?resolution=1000000")


@pytest.mark.parametrize("models", [
    [{"title": "x" * 10_000}],
    [{"title": ["not", "text"]}],
    [{"title": "m", "audit": {"identity": "not an object"}}],
    [{}] * 1001,
])
def test_malformed_model_lists_are_one_line_errors(hostile, models):
    hostile.plays["/sdapi/v1/sd-models"] = hh.answer(models)
    with pytest.raises(ServiceError) as err:
        HTTPGenerator(f"{hostile.url}?retries=0")
    _one_line(err.value)


def test_a_png_header_declaring_20000_squared_is_refused_without_decoding(hostile):
    hostile.plays["/sdapi/v1/txt2img"] = hh.txt2img([base64.b64encode(png_with_header_only(20000, 20000)).decode()])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = _refused(hostile)
    assert "20000x20000" in message or "decompression bomb" in message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: nothing decoded


@pytest.fixture(scope="module")
def png_9000():
    return base64.b64encode(png_of_zeros(9000, 9000)).decode()


def test_a_real_9000_squared_png_is_refused_from_its_header(hostile, png_9000):
    hostile.plays["/sdapi/v1/txt2img"] = hh.txt2img([png_9000])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "9000x9000" in _refused(hostile)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # its 243 MB never decoded


@pytest.mark.parametrize("body, needle", [
    ({"images": [hh.png_b64()], "info": json.dumps({"seed": "forty-two"})}, "seed 'forty-two'"),
    ({"images": [hh.png_b64()], "info": json.dumps({"seed": 1.5})}, "seed 1.5"),
    ({"images": [hh.png_b64()], "info": json.dumps({"seed": 2**70})}, "not an integer"),
    ({"images": [hh.png_b64()], "info": "{not json"}, "`info` is not valid JSON"),
    ({"images": [hh.png_b64()], "info": "[" * 100_000 + "]" * 100_000}, "nested deeper"),
    ({"images": [hh.png_b64()], "info": ["a list"]}, "not an object"),
    ({"images": []}, "no images"),
    ({"images": [None]}, "not a base64 string"),
    ({"images": [hh.png_b64()] * 65}, "no images"),
    ({"images": ["%%%%"]}, "images[0]: empty file"),
    ({"images": [base64.b64encode(b"GIF89a" + b"\0" * 20).decode()]}, "images[0]"),
    ([1, 2, 3], "not an object"),
])
def test_malformed_txt2img_answers_refuse_their_row(hostile, body, needle):
    hostile.plays["/sdapi/v1/txt2img"] = hh.answer(body)
    assert needle in _refused(hostile)


def test_deeply_nested_json_is_refused_without_recursion(hostile):
    nested = b"[" * 200_000 + b"]" * 200_000
    hostile.plays["/sdapi/v1/txt2img"] = hh.answer(nested, raw=True)
    assert "nested deeper than" in _refused(hostile)
    hostile.plays["/sdapi/v1/sd-models"] = hh.answer(nested, raw=True)
    with pytest.raises(ServiceError, match="nested deeper than"):
        HTTPGenerator(f"{hostile.url}?retries=0")


@pytest.mark.parametrize("content_type", ["text/html", "image/png", "application/octet-stream"])
def test_a_wrong_content_type_is_refused(hostile, content_type):
    hostile.plays["/sdapi/v1/txt2img"] = hh.answer({"images": [hh.png_b64()]}, content_type=content_type)
    assert content_type in _refused(hostile)
    hostile.plays["/sdapi/v1/options"] = hh.answer(b"<html>login</html>", content_type=content_type, raw=True)
    with pytest.raises(ServiceError, match=f"the response is {content_type}, not JSON"):
        HTTPGenerator(f"{hostile.url}?retries=0")


def test_trickled_headers_cannot_outlast_the_deadline(hostile):
    """One byte every 50 ms forever: the 1 s deadline covers the headers too (it took 38 s for timeout=2)."""
    hostile.plays["/sdapi/v1/options"] = hh.trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000, 0.05,
                                                    hostile.stop_event)
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        HTTPGenerator(f"{hostile.url}?timeout=1&retries=1&backoff=0.01")
    elapsed = time.monotonic() - started
    assert elapsed < 3.5, elapsed  # two attempts of 1 s
    assert "within 1 s" in _one_line(err.value) and "gave up after 2 attempts" in str(err.value)


def test_a_trickled_body_cannot_outlast_the_deadline(hostile):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    hostile.plays["/sdapi/v1/txt2img"] = lambda sock, req: (sock.sendall(head),
                                                            hh.trickle(b"[", 0.05, hostile.stop_event)(sock, req))
    h = HTTPGenerator(f"{hostile.url}?timeout=1&retries=0&resolution=16")
    started = time.monotonic()
    with pytest.raises(GenerationFailed) as err:
        h.generate(["a caption"], 1, 0, 1)
    assert time.monotonic() - started < 2.5 and not err.value.refused  # an outage: the run stops, in one line
    assert "within 1 s" in _one_line(err.value.errors[0])


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"images\": [",
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"images\": [\"iVBOR",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200",
    b"garbage\r\n\r\n",
    b"",
])
def test_truncated_or_malformed_answers_are_retried_then_one_line(hostile, answer):
    hostile.plays["/sdapi/v1/txt2img"] = hh.raw(answer)
    h = HTTPGenerator(f"{hostile.url}?{HOSTILE}")
    with pytest.raises(GenerationFailed) as err:
        h.generate(["a caption"], 1, 0, 1)
    assert "gave up after 2 attempts" in _one_line(err.value.errors[0])
    assert hostile.requests.count("/sdapi/v1/txt2img") == 2


def test_huge_bodies_are_cut_at_the_limit(hostile):
    # Declared: refused from the header, before a byte of the body is read.
    hostile.plays["/sdapi/v1/txt2img"] = hh.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                                b"Content-Length: 10000000000\r\n\r\n")
    assert "10000000000 bytes, over the limit of 1000000" in _refused(hostile, f"{HOSTILE}&max_response_bytes=1000000")
    # Undeclared: read incrementally and cut at the limit, however much the service would send.
    hostile.plays["/sdapi/v1/txt2img"] = hh.endless(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                                    b"Connection: close\r\n\r\n", hostile.stop_event, 1 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "larger than the limit of 1000000" in _refused(hostile, f"{HOSTILE}&max_response_bytes=1000000")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_the_well_behaved_hostile_service_works(hostile):
    """The control: the same service without a misbehaviour gives its images (so each refusal above is real)."""
    h = HTTPGenerator(f"{hostile.url}?{HOSTILE}")
    images = h.generate(["a", "b"], n_gen=2, seed=3, steps=1)
    assert images.shape == (2, 2, 16, 16, 3) and (images == 128).all()


def test_a_hostile_answer_fails_its_row_through_the_cli_in_one_line(hostile, tiny_world, aux, tmp_path):
    """Through `audit features`: the bomb costs its row (generation_refused), the rest of the store is written."""
    bomb = base64.b64encode(png_with_header_only(20000, 20000)).decode()
    good = hh.txt2img()
    caption = aux[1][2]
    hostile.plays["/sdapi/v1/txt2img"] = (
        lambda sock, req: hh.txt2img([bomb])(sock, req) if req.get("prompt") == caption else good(sock, req))
    out = tmp_path / "s.h5"
    result = CliRunner().invoke(app, ["features", "--target", f"{hostile.url}?{HOSTILE}&resolution=32", "--data",
                                      str(aux[0]), "--out", str(out), "--embedder", str(tiny_world["clip"]),
                                      "--captioner", str(tiny_world["blip"]), "--n-gen", "1", "--steps", "1",
                                      "--batch-size", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    got = FeatureStore.open(out).read(ok_only=False)
    assert list(got["status"]).count("generation_refused") == 1
    error = got["error"][list(got["status"]).index("generation_refused")]
    assert "images[0]" in error and ("20000x20000" in error or "decompression bomb" in error)


def test_a_hostile_probe_is_one_line_through_the_cli(hostile, tiny_world, aux, tmp_path):
    hostile.plays["/sdapi/v1/sd-models"] = hh.answer(b"[" * 100_000, raw=True)
    result = CliRunner().invoke(app, ["features", "--target", f"{hostile.url}?retries=0", "--data", str(aux[0]),
                                      "--out", str(tmp_path / "s.h5"), "--embedder", str(tiny_world["clip"]),
                                      "--captioner", str(tiny_world["blip"]), "--quiet"])
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "nested deeper than" in errors[0]


# ---------------------------------------------------------------------------------------------- properties


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(alphabet='[]{}"\\,:0a ', max_size=300).map(str.encode))
def test_the_bounded_parser_raises_only_value_errors(data):
    try:
        loads_bounded(data, max_depth=8)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(_json, st.integers(0, 40))
def test_the_bounded_parser_agrees_with_json_within_its_depth(value, wrap):
    text = "[" * wrap + json.dumps(value) + "]" * wrap
    try:
        got = loads_bounded(text.encode(), max_depth=16)
    except ValueError as exc:
        assert "nested deeper than 16" in str(exc)
        return
    assert json.dumps(got) == json.dumps(json.loads(text))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(["images", "info", "parameters"]),
                       _json | st.lists(st.sampled_from([hh.png_b64(), "", "data:,", "@@"]), max_size=3)
                       | st.builds(lambda v: json.dumps({"seed": v}), _json), max_size=3))
def test_any_txt2img_answer_gives_an_image_or_a_bad_response(body):
    h = HTTPGenerator.__new__(HTTPGenerator)  # the answer's checks only: no service behind it
    h.url, h.resolution, h._warned = "http://x", 16, set()
    try:
        image = h._decode(body, 7)
    except BadResponse as exc:
        _one_line(exc)
        return
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
