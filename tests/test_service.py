"""The auditing service in-process (create_app + httpx's ASGI transport) over one loaded toy Auditor: checks equal
the local API's verdicts, batched or not; every bad input is a one-line JSON error with no evidence record;
keys, rate limits, the bounded queue, metrics, scan jobs and their folder/archive guards."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from audit.errors import UsageError
from audit.evidence import EvidenceLog
from audit.service import ServiceConfig, create_app
from audit.service.auth import hash_key
from audit.service.models import Models
from audit.toy import scenes
from servicekit import InProcess, png_bytes


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy Auditor loaded once, a few toy images on disk, and a data root holding a scannable folder."""
    root = tmp_path_factory.mktemp("service")
    mp = pytest.MonkeyPatch()
    mp.setenv("AUDIT_HOME", str(root / "home"))  # the bundled heads, not heads registered on this machine
    images, captions = scenes.scene_images(3, "members", 6)
    data = root / "data"
    folder = scenes.write_imagefolder(data / "set", images[:5], captions[:5], [None] * 5)
    models = Models.load(ServiceConfig(targets=["toy"]))
    yield {"root": root, "images": images, "captions": captions, "models": models, "data": data,
           "folder": folder}
    mp.undo()


def _service(toy, tmp_path_factory, state=None, **options) -> InProcess:
    state = state or tmp_path_factory.mktemp("state")
    cfg = ServiceConfig(targets=["toy"], db=str(state / "evidence.db"), state_dir=str(state / "state"),
                        data_roots=[str(toy["data"])], **options)
    svc = InProcess(create_app(cfg, toy["models"]))
    svc.wait_ready()
    return svc


@pytest.fixture(scope="module")
def svc(toy, tmp_path_factory):
    s = _service(toy, tmp_path_factory, max_wait_ms=300)
    yield s
    s.close()


def _post_check(svc, image: bytes, caption: str | None = None, name: str = "q.png", **fields):
    data = {k: str(v) for k, v in fields.items()} | ({"caption": caption} if caption is not None else {})
    return svc.call("POST", "/v1/checks", files={"image": (name, image, "image/png")}, data=data)


def _records(svc) -> int:
    return svc.app.state.service.evidence.count()


def test_health_info_and_a_check_equal_to_the_local_verdict_with_its_evidence(svc, toy, tmp_path):
    assert svc.call("GET", "/v2/health/live").json() == {"live": True}
    assert svc.call("GET", "/v2/health/ready").json() == {"ready": True}
    info = svc.call("GET", "/v1/info").json()
    (target,) = info["targets"]
    assert target["name"] == "toy" and target["target"]["hash"] and len(target["heads"]["sha256"]) == 64
    assert info["auth"] is False and "black-box" in target["tiers"]

    path = tmp_path / "query.png"
    path.write_bytes(png_bytes(toy["images"][0]))
    local = toy["models"].auditor().check(path, toy["captions"][0]).to_dict()
    r = _post_check(svc, path.read_bytes(), toy["captions"][0], name=str(path))
    assert r.status_code == 200, r.text
    answer = r.json()
    evidence_id = answer.pop("evidence_id")
    assert answer == json.loads(json.dumps(local))
    record = svc.call("GET", f"/v1/evidence/{evidence_id}").json()
    import hashlib

    assert record["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["verdict"] == local["verdict"] and record["probability"] == local["probability"]
    assert record["caption_sha256"] == hashlib.sha256(toy["captions"][0].encode()).hexdigest()
    assert record["settings"]["seeds"] and record["settings"]["n_gen"] == 2 and record["api_key_id"] is None
    assert record["target"]["hash"] == target["target"]["hash"]
    assert svc.call("GET", "/v1/evidence/nope").status_code == 404
    assert svc.app.state.service.evidence.verify()["ok"]


def test_concurrent_checks_are_batched_and_their_verdicts_equal_single_checks(svc, toy):
    n = 4
    before = _batches(svc)
    answers = svc.gather(*(("POST", "/v1/checks", {"files": {"image": (f"c{i}.png", png_bytes(toy["images"][i]))},
                                                   "data": {"caption": toy["captions"][i]}}) for i in range(n)))
    assert [a.status_code for a in answers] == [200] * n
    after = _batches(svc)
    assert after["count"] - before["count"] < n  # fewer model calls than requests: they were batched
    assert after["sum"] - before["sum"] == n
    auditor = toy["models"].auditor()
    from audit.imagefolder import Row

    for i, a in enumerate(answers):
        row = Row(id=f"c{i}.png", path=f"c{i}.png", caption=toy["captions"][i], caption_source="argument")
        alone = auditor.score_rows([row], {0: toy["images"][i]})[0]
        got = a.json()
        assert got["verdict"] == alone.verdict
        # Same seeds and images; only batched matmuls may round the last float bits differently.
        assert got["probability"] == pytest.approx(alone.probability, abs=1e-4)


def _batches(svc) -> dict:
    text = svc.call("GET", "/metrics").text
    values = {}
    for line in text.splitlines():
        for key in ("count", "sum"):
            if line.startswith(f"audit_batch_size_{key} "):
                values[key] = float(line.split()[1])
    return values


def test_bad_inputs_are_one_line_json_errors_with_no_record(svc, toy, tmp_path):
    good = png_bytes(toy["images"][0])
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    before = _records(svc)
    cases = {
        "corrupt": (_post_check(svc, b"\x89PNG\r\n\x1a\nbroken", "a caption"), 422, "not a readable image"),
        "bomb": (_post_check(svc, bomb.getvalue(), "a caption"), 422, "refused without decoding"),
        "wrong type": (svc.call("POST", "/v1/checks", content=b"{}", headers={"content-type": "application/json"}),
                       415, "multipart/form-data"),
        "missing image": (svc.call("POST", "/v1/checks", data={"caption": "x"}, files={"other": ("a", b"b")}), 400,
                          "unknown field"),
        "no image": (svc.call("POST", "/v1/checks", files={"caption": (None, "x")}), 422, "missing image"),
        "unknown target": (_post_check(svc, good, "c", target="nope"), 404, "unknown target 'nope'"),
        "unknown heads": (_post_check(svc, good, "c", heads="elsewhere"), 404, "unknown heads"),
        "long caption": (_post_check(svc, good, "x" * 5000), 422, "above the limit"),
        "bad budget": (_post_check(svc, good, "c", max_fpr="lots"), 400, "max_fpr must be a number"),
        "wrong tier": (_post_check(svc, good, "c", tier="gray-box"), 400, "tier 'gray-box'"),
        "no route": (svc.call("GET", "/v1/nothing"), 404, "Not Found"),
    }
    for name, (r, status, text) in cases.items():
        assert r.status_code == status, (name, r.text)
        body = r.json()
        assert list(body) == ["error"] and "\n" not in body["error"] and text in body["error"], (name, body)
    assert "q.png" in cases["corrupt"][0].json()["error"]  # names the upload, not the temporary file
    assert _records(svc) == before


def test_body_limit_queue_limit_keys_and_rate_limit(toy, tmp_path_factory, tmp_path, monkeypatch):
    small = _service(toy, tmp_path_factory, max_body_bytes=2000, max_batch_size=1, queue_size=1, max_wait_ms=0)
    try:
        noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        r = _post_check(small, png_bytes(noise), "c")
        assert r.status_code == 413 and "above the limit of 2000" in r.json()["error"]
        tiny = png_bytes(np.zeros((8, 8, 3), np.uint8))
        answers = small.gather(*(("POST", "/v1/checks", {"files": {"image": ("t.png", tiny)},
                                                         "data": {"caption": "a red square"}}) for _ in range(5)))
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 503 in codes, codes
        full = next(a for a in answers if a.status_code == 503)
        assert full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]
    finally:
        small.close()

    keys = tmp_path / "keys"
    keys.write_text(f"sha256:{hash_key('s3cret')} pipeline-a\n")
    with pytest.raises(UsageError, match="--api-keys"):
        create_app(ServiceConfig(host="0.0.0.0", db=str(tmp_path / "e.db")), toy["models"])
    monkeypatch.delenv("AUDIT_API_KEYS", raising=False)
    auth = _service(toy, tmp_path_factory, api_keys=str(keys), rate_limit_per_minute=3)
    try:
        assert auth.call("GET", "/v1/info").status_code == 401
        assert auth.call("GET", "/v1/info", headers={"Authorization": "Bearer wrong"}).json() == {
            "error": "unknown API key"}
        ok = {"Authorization": "Bearer s3cret"}
        assert auth.call("GET", "/v1/info", headers=ok).status_code == 200
        r = auth.call("POST", "/v1/checks", headers=ok, files={"image": ("t.png", png_bytes(toy["images"][1]))},
                      data={"caption": toy["captions"][1]})
        assert r.status_code == 200
        record = auth.call("GET", f"/v1/evidence/{r.json()['evidence_id']}", headers=ok).json()
        assert record["api_key_id"] == "pipeline-a" and "s3cret" not in json.dumps(record)
        limited = auth.call("GET", "/v1/info", headers=ok)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    finally:
        auth.close()


def test_metrics_name_checks_batches_queue_jobs_and_build(svc):
    text = svc.call("GET", "/metrics").text
    for name in ("audit_check_duration_seconds_bucket", "audit_checks_total{", "audit_batch_size_bucket",
                 "audit_queue_depth ", 'audit_scan_jobs{state="queued"}', "audit_build_info{"):
        assert name in text, name


def test_scan_job_on_a_data_root_folder_equals_a_local_scan(svc, toy, tmp_path):
    r = svc.call("POST", "/v1/scans", json={"folder": "set"})
    assert r.status_code == 201, r.text
    job = _wait(svc, r.json()["id"])
    assert job["state"] == "succeeded" and job["counts"] == {"total": 5, "done": 5, "failed": 0}
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    lines = [json.loads(x) for x in svc.call("GET", f"/v1/scans/{job['id']}/results").text.splitlines()]
    toy["models"].auditor().scan(toy["folder"], tmp_path / "local.jsonl", quiet=True)
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert lines == local
    report = svc.call("GET", f"/v1/scans/{job['id']}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    log = svc.app.state.service.evidence
    assert [r["row_id"] for r in log.records(job=job["id"])] == [x["id"] for x in local]
    assert svc.call("GET", "/v1/scans").json()["jobs"][0]["id"] == job["id"]


def _wait(svc, job_id, timeout=120):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        job = svc.call("GET", f"/v1/scans/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job)


def test_scan_paths_stay_inside_data_roots_and_archives_inside_their_folder(svc, toy, tmp_path):
    r = svc.call("POST", "/v1/scans", json={"folder": str(tmp_path)})
    assert r.status_code == 403 and "outside the service's data roots" in r.json()["error"]
    assert svc.call("POST", "/v1/scans", json={"folder": "../"}).status_code == 403
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../escape.png", b"x")
    r = svc.call("POST", "/v1/scans", files={"archive": ("a.zip", evil.getvalue())})
    assert r.status_code == 422 and "outside its folder" in r.json()["error"]
    linked = io.BytesIO()
    with tarfile.open(fileobj=linked, mode="w") as t:
        info = tarfile.TarInfo("link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    r = svc.call("POST", "/v1/scans", files={"archive": ("a.tar", linked.getvalue())})
    assert r.status_code == 422 and "link" in r.json()["error"]

    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as z:
        for p in sorted(toy["folder"].iterdir()):
            z.write(p, f"set/{p.name}")
    r = svc.call("POST", "/v1/scans", files={"archive": ("set.zip", good.getvalue())})
    assert r.status_code == 201, r.text
    job = _wait(svc, r.json()["id"])
    assert job["state"] == "succeeded" and job["counts"]["done"] == 5
    assert svc.call("DELETE", f"/v1/scans/{job['id']}").json()["state"] == "succeeded"  # finished stays so
    assert svc.call("GET", "/v1/scans/nope").status_code == 404


def _ten(toy) -> str:
    """A data-root folder of ten toy images: two slices of the toy Auditor's batch of eight."""
    folder = toy["data"] / "ten"
    if not folder.exists():
        images, captions = scenes.scene_images(8, "members", 10)
        scenes.write_imagefolder(folder, images, captions, [None] * 10)
    return "ten"


def _after_first_slice(s, act) -> None:
    """Call ``act(jobs, job)`` once, from the job thread, when a running job has written its first slice."""
    jobs = s.app.state.service.jobs
    original, fired = jobs.on_change, []

    def hook(counts):
        original(counts)
        running = [j for j in jobs.list() if j["state"] == "running" and j["counts"]["done"] >= 8]
        if running and not fired:
            fired.append(running[0]["id"])
            act(jobs, running[0])

    jobs.on_change = hook


def test_scan_jobs_on_ray_equal_local_ones_resume_after_a_restart_and_cancel(toy, tmp_path_factory, ray_cluster,
                                                                               tmp_path):
    state = tmp_path_factory.mktemp("ray_state")
    cfg = dict(ray=ray_cluster.address, ray_workers=1)
    folder = _ten(toy)
    local = tmp_path / "local.jsonl"
    toy["models"].auditor().scan(toy["data"] / folder, local, quiet=True)
    want = [json.loads(x) for x in local.read_text().splitlines()]

    # The first server stops after the first slice (as a killed one would, between slices): the job stays running.
    first = _service(toy, tmp_path_factory, state=state, **cfg)
    try:
        assert first.call("GET", "/v1/info").json()["scan_jobs"] == {"runner": "ray", "ray": ray_cluster.address,
                                                                     "ray_workers": 1, "batch_size": 8}
        _after_first_slice(first, lambda jobs, job: jobs._stop.set())
        job_id = first.call("POST", "/v1/scans", json={"folder": folder}).json()["id"]
        first.app.state.service.jobs._thread.join(300)
        job = first.call("GET", f"/v1/scans/{job_id}").json()
        assert job["state"] == "running" and job["counts"] == {"total": 10, "done": 8, "failed": 0}
    finally:
        first.close()
    second = _service(toy, tmp_path_factory, state=state, **cfg)
    try:
        job = _wait(second, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        assert job["counts"] == {"total": 10, "done": 10, "failed": 0}
        got = [json.loads(x) for x in second.call("GET", f"/v1/scans/{job_id}/results").text.splitlines()]
        assert got == want  # the Ray workers' verdicts are the in-process scan's, line for line
        log = second.app.state.service.evidence
        assert [r["row_id"] for r in log.records(job=job_id)] == [x["id"] for x in want]  # each row once
        assert log.verify()["ok"]
        assert second.call("GET", f"/v1/scans/{job_id}/report").status_code == 200

        _after_first_slice(second, lambda jobs, job: jobs.cancel(job["id"]))
        cancelled = second.call("POST", "/v1/scans", json={"folder": folder}).json()["id"]
        job = _wait(second, cancelled, timeout=300)
        assert job["state"] == "cancelled" and job["counts"]["done"] == 8
        assert len(second.call("GET", f"/v1/scans/{cancelled}/results").text.splitlines()) == 8
        assert len(list(log.records(job=cancelled))) == 8
        assert second.call("GET", f"/v1/scans/{cancelled}/report").status_code == 409
    finally:
        second.close()


def test_heads_trained_with_a_reference_serve_with_it_from_a_config_file(toy, tmp_path_factory, tmp_path):
    from audit import api

    data = tmp_path / "labelled"
    images, captions = scenes.scene_images(9, "members", 8)
    scenes.write_imagefolder(data, images, captions, [i % 2 == 0 for i in range(8)])
    store, heads = tmp_path / "ref.h5", tmp_path / "heads"
    api.featurize("toy", data, store, tier="gray-box", graybox_timesteps=(200,), reference="toy-base", quiet=True)
    api.train(store, heads, attacks="PIA-ref,PIA-ref-score", epochs=1, register=False, quiet=True, folds=0)
    # As a config file names them: one reference (a string) for the one target.
    (tmp_path / "service.json").write_text(json.dumps({"targets": ["toy"], "heads": str(heads),
                                                       "reference": "toy-base"}))
    cfg = ServiceConfig.load(tmp_path / "service.json").validate()
    assert cfg.reference == ["toy-base"] and cfg.for_target("reference", 0) == "toy-base"
    state = tmp_path_factory.mktemp("ref_state")
    s = InProcess(create_app(ServiceConfig(targets=["toy"], db=str(state / "e.db"), state_dir=str(state / "s")),
                             Models.load(cfg)))
    try:
        s.wait_ready()
        target = s.call("GET", "/v1/info").json()["targets"][0]
        assert target["reference"]["name"] == "toy-base" and target["reference"]["hash"]
        assert target["heads"]["attacks"] == ["PIA-ref", "PIA-ref-score", "blind"]
        q = tmp_path / "q.png"
        Image.fromarray(images[1]).save(q)
        r = _post_check(s, q.read_bytes(), captions[1])
        assert r.status_code == 200, r.text
        local = api.check(q, captions[1], target="toy", heads=heads, reference="toy-base").to_dict()
        got = r.json()
        assert got["verdict"] == local["verdict"] and got["tier"] == "gray-box" and set(got["scores"]) == \
            set(local["scores"])
        assert abs(got["probability"] - local["probability"]) < 1e-4
        record = s.app.state.service.evidence.get(got["evidence_id"])
        assert record["target"]["name"] == "toy" and record["reference"] == target["reference"]
    finally:
        s.close()
    with pytest.raises(UsageError, match="pass it with --reference"):
        Models.load(ServiceConfig(targets=["toy"], heads=[str(heads)]))
