"""The variation tier over HTTP: the emulator's /sdapi/v1/img2img and the other endpoints common A1111 clients call
(samplers, progress, options, sd-models), checked against the web UI's request and response fields with raw HTTP;
the client's vary_with_seeds equal to the local variation, through retries, and a refused variation failing its row
while the run goes on."""

import base64
import http.client
import io
import json

import numpy as np
import pytest
from PIL import Image

from audit import api
from audit.features import FeatureStore
from audit.targets import load_target
from audit.targets.diffusion import DiffusersGenerator
from audit.targets.http import GenerationFailed, HTTPGenerator
from audit.serve_target import Txt2ImgServer
from audit.toy import scenes

from targets_fixtures import one_torch_thread  # noqa: F401  (fixture)


class Rule:
    """The server's fault hook: ``rule(k, path, request)`` decides each request (k: the how-many-th on its path)."""

    def __init__(self):
        self.rule, self.seen = None, []

    def __call__(self, n, path, request):
        self.seen.append(path)
        return self.rule(self.seen.count(path), path, request or {}) if self.rule else None


@pytest.fixture(scope="module")
def local(tiny_world):
    return DiffusersGenerator.from_folder(tiny_world["target"], name="tiny-sd")


@pytest.fixture(scope="module")
def server(local):
    rule = Rule()
    srv = Txt2ImgServer(local, idle_timeout=300, fault=rule).start()
    srv.rule = rule
    yield srv
    srv.stop()


@pytest.fixture
def rule(server):
    server.rule.rule, server.rule.seen = None, []
    yield server.rule
    server.rule.rule = None


def _call(server, method, path, body=None, timeout=60):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def _b64png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _images(body):
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in body["images"]])


def test_img2img_protocol_is_deterministic_by_seed_and_equals_the_local_variation(server, local, rule):
    images, captions = scenes.scene_images(2, "members", 1)
    req = {"init_images": ["data:image/png;base64," + _b64png(images[0])], "denoising_strength": 0.5,
           "prompt": captions[0], "seed": 21, "steps": 4, "cfg_scale": 1.0, "width": 32, "height": 32,
           "sampler_name": "DDIM", "batch_size": 2, "n_iter": 1}
    status, body = _call(server, "POST", "/sdapi/v1/img2img", req)
    assert status == 200 and set(body) == {"images", "parameters", "info"}
    info = json.loads(body["info"])
    assert info["all_seeds"] == [21, 22] and info["denoising_strength"] == 0.5
    assert body["parameters"]["init_images"] is None and body["parameters"]["seed"] == 21
    got = _images(body)
    want = local.vary_with_seeds(np.stack([images[0]] * 2), [captions[0]] * 2, [21, 22], 0.5, 4, 1.0)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(_images(_call(server, "POST", "/sdapi/v1/img2img", req)[1]), got)  # same seed, same images
    bad = {**req, "sampler_name": "Euler a"}
    assert _call(server, "POST", "/sdapi/v1/img2img", bad)[0] == 404  # the web UI: "Sampler not found"
    for field, value in (("denoising_strength", 1.5), ("init_images", []), ("init_images", ["not an image"]),
                         ("width", 512), ("steps", "4")):
        status, body = _call(server, "POST", "/sdapi/v1/img2img", {**req, field: value})
        assert status == 422 and body["error"], (field, value)


def test_samplers_progress_options_and_models_answer_the_web_uis_fields(server, rule):
    status, samplers = _call(server, "GET", "/sdapi/v1/samplers")
    assert status == 200 and [set(s) for s in samplers] == [{"name", "aliases", "options"}]
    assert samplers[0]["name"] == "DDIM"
    status, progress = _call(server, "GET", "/sdapi/v1/progress?skip_current_image=true")
    assert status == 200 and set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no", "sampling_step",
            "sampling_steps"} <= set(progress["state"]) and progress["state"]["job_count"] == 0
    status, models = _call(server, "GET", "/sdapi/v1/sd-models")
    assert status == 200 and {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    status, options = _call(server, "GET", "/sdapi/v1/options")
    assert status == 200 and options["sd_model_checkpoint"] == models[0]["title"]
    assert _call(server, "POST", "/sdapi/v1/options", {"samples_format": "jpg",
                                                       "sd_model_checkpoint": models[0]["title"]}) == (200, None)
    assert _call(server, "GET", "/sdapi/v1/options")[1]["samples_format"] == "jpg"
    status, body = _call(server, "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "another.safetensors"})
    assert status == 422 and "not found" in body["error"]
    _call(server, "POST", "/sdapi/v1/options", {"samples_format": "png"})


def test_progress_reports_the_steps_done_of_the_generation_in_flight_as_the_web_ui_counts_them(server, rule):
    """A1111's progressapi: progress = 0.01 + job_no / job_count + sampling_step / sampling_steps / job_count,
    eta_relative the seconds left at the rate so far; idle, 0 and job_count 0."""
    import threading
    import time

    image = _b64png(scenes.scene_images(3, "members", 1)[0][0])
    for path, body, steps in (
            ("/sdapi/v1/img2img", {"init_images": [image], "denoising_strength": 0.75, "steps": 40, "seed": 1,
                                   "n_iter": 2, "batch_size": 1, "cfg_scale": 1}, 30),
            ("/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 30, "seed": 1, "n_iter": 2, "batch_size": 1,
                                   "cfg_scale": 1}, 30)):
        answer = {}

        def post(p=path, b=body, a=answer):
            a["status"] = _call(server, "POST", p, b, timeout=600)[0]

        call = threading.Thread(target=post)
        call.start()
        seen = []
        while call.is_alive():
            status, p = _call(server, "GET", "/sdapi/v1/progress")
            if status == 200 and p["state"]["job_count"]:
                seen.append(p)
            time.sleep(0.002)  # leave the generation the interpreter
        call.join()
        assert answer["status"] == 200, path
        assert seen, f"no progress seen during {path}"
        middle = [p for p in seen if 0.01 < p["progress"] < 1]
        assert middle, [p["progress"] for p in seen]
        for p in seen:
            s = p["state"]
            assert (s["job"], s["job_count"], s["sampling_steps"]) == (path.rsplit("/", 1)[1], 2, steps)
            assert 0 <= s["job_no"] < 2 and 0 <= s["sampling_step"] <= steps
            assert p["progress"] == pytest.approx(min(1, 0.01 + s["job_no"] / 2 + s["sampling_step"] / steps / 2))
            assert p["eta_relative"] >= 0
        assert [p["progress"] for p in seen] == sorted(p["progress"] for p in seen)
        idle = _call(server, "GET", "/sdapi/v1/progress")[1]
        assert (idle["progress"], idle["eta_relative"], idle["state"]["job_count"]) == (0.0, 0.0, 0)


def test_the_http_client_varies_through_retries_and_equals_the_local_variation(server, local, rule):
    images, captions = scenes.scene_images(2, "members", 3)
    h = load_target(f"{server.url}?timeout=20&retries=2&backoff=0.01")
    assert isinstance(h, HTTPGenerator)
    rule.rule = lambda k, path, req: ("status", 503) if path == "/sdapi/v1/img2img" and k == 1 else None
    got = h.vary_with_seeds(images, captions, [5, 6, 2**40 + 7], 0.5, 4)
    want = np.stack([local.vary_with_seeds(images[i:i + 1], captions[i:i + 1], [s], 0.5, 4)[0]
                     for i, s in enumerate([5, 6, 7])])  # seeds travel modulo 2**32
    np.testing.assert_array_equal(got, want)
    assert rule.seen.count("/sdapi/v1/img2img") == 4  # three variations, one retried
    rule.rule = lambda k, path, req: ("status", 422) if req.get("prompt") == captions[1] else None
    with pytest.raises(GenerationFailed) as info:
        h.vary_with_seeds(images, captions, [8, 9, 10], 0.5, 4)
    assert info.value.refused == {1} and set(info.value.errors) == {1}


def test_features_over_http_mark_a_refused_variation_and_go_on(server, tiny_world, rule, tmp_path):
    folder = tmp_path / "aux"
    images, captions = scenes.scene_images(3, "members", 4)
    scenes.write_imagefolder(folder, images, captions, [True, False, True, False])
    rule.rule = lambda k, path, req: ("status", 422) if req.get("prompt") == captions[2] else None
    s = api.featurize(f"{server.url}?timeout=20&retries=1&backoff=0.01", folder, tmp_path / "v.h5",
                      embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]), tier="variation",
                      var_strengths=(0.5,), n_var=2, steps=2, quiet=True)
    assert s.status == {"ok": 3, "generation_refused": 1}
    b = FeatureStore.open(tmp_path / "v.h5").read(ok_only=False)
    assert b["status"][2] == "generation_refused" and "HTTP 422" in b["error"][2]
    assert (b["var_pixel_dist"][[0, 1, 3]] > 0).all() and not b["var_pixel_dist"][2].any()
