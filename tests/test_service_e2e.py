"""`audit serve` as a real uvicorn process on loopback: `audit check --server` and `api.Client` give exactly the
local verdict; the page works in a real headless Chromium; a server killed with SIGKILL mid-scan and started
again finishes the job with every row once, equal to a local scan, and an evidence log that verifies."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from audit import api
from audit.cli import app
from audit.evidence import EvidenceLog
from audit.toy import scenes
from servicekit import ServeProcess, free_port, png_bytes

CHROMIUM = Path("/usr/bin/chromium")
N, SCAN_BATCH = 8, 4  # a scan of two slices: the kill lands during the second


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    images, captions = scenes.scene_images(4, "members", N)
    data = root / "data"
    folder = scenes.write_imagefolder(data / "big", images, captions, [None] * N)
    scenes.write_imagefolder(data / "small", images[:2], captions[:2], [None] * 2)
    query = root / "query.png"
    query.write_bytes(png_bytes(images[0]))
    home = root / "home"
    settings = root / "service.json"
    settings.write_text(json.dumps({"scan_batch_size": SCAN_BATCH}))
    args = ["--target", "toy", "--db", str(root / "evidence.db"), "--data-root", str(data), "--config", str(settings)]
    env = {"AUDIT_HOME": str(home), "OMP_NUM_THREADS": "2"}  # this process's torch threads (conftest)
    server = ServeProcess(args, env)
    mp = pytest.MonkeyPatch()
    mp.setenv("AUDIT_HOME", str(home))  # the bundled heads, not heads registered on this machine
    auditor = api.Auditor("toy")  # the local side of every comparison, loaded while the server loads
    server.wait_ready()
    state = {"server": server, "args": args, "env": env}
    yield {"root": root, "folder": folder, "query": query, "caption": captions[0], "auditor": auditor,
           "db": root / "evidence.db", "state": state}
    state["server"].stop()
    mp.undo()


def test_check_over_the_server_prints_and_returns_what_the_local_command_does(world):
    url = world["state"]["server"].url
    local = world["auditor"].check(world["query"], world["caption"])
    result = CliRunner().invoke(app, ["check", str(world["query"]), "--caption", world["caption"], "--target", "toy",
                                      "--json", "--server", url])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(local.to_json())
    plain = CliRunner().invoke(app, ["check", str(world["query"]), "--caption", world["caption"], "--target", "toy",
                                     "--server", url])
    assert plain.stdout.splitlines()[0] == f"{world['query']}: {local.verdict} (P(member) {local.probability:.3f}, " \
                                           f"attack {local.attack}, {local.tier})"
    with api.Client(url) as client:
        remote = client.check(world["query"], world["caption"])
        assert remote.to_dict() == local.to_dict()
        assert client.evidence(remote.evidence_id)["verdict"] == local.verdict
    bad = CliRunner().invoke(app, ["check", str(world["query"]), "--caption", "c", "--target", "toy", "--server",
                                   url, "--max-fpr", "2"])
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "max" in bad.stderr


def test_every_endpoint_and_each_bad_input_over_uvicorn_with_one_line_errors_and_no_record(world):
    from PIL import Image

    url = world["state"]["server"].url
    log = EvidenceLog(world["db"])
    with httpx.Client(base_url=url, timeout=300) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        info = c.get("/v1/info").json()
        assert info["targets"][0]["target"]["hash"] and info["targets"][0]["heads"]["sha256"]
        assert info["scan_jobs"]["runner"] == "in-process"
        assert c.get("/openapi.json").json()["paths"]["/v1/checks"]
        assert "audit_build_info{" in c.get("/metrics").text
        assert c.get("/").headers["content-type"].startswith("text/html")
        assert isinstance(c.get("/v1/scans").json()["jobs"], list)
        before = log.count()
        bomb = __import__("io").BytesIO()
        Image.new("1", (20000, 20000)).save(bomb, format="PNG")
        query = world["query"].read_bytes()

        def check(image: bytes, **data):
            return c.post("/v1/checks", files={"image": ("q.png", image, "image/png")}, data={"caption": "c"} | data)

        cases = {
            "corrupt": (check(b"\x89PNG\r\n\x1a\nbroken"), 422),
            "bomb": (check(bomb.getvalue()), 422),
            "wrong type": (c.post("/v1/checks", json={"image": "x"}), 415),
            "no image": (c.post("/v1/checks", files={"caption": (None, "x")}), 422),
            "oversized": (c.post("/v1/checks", content=b"x" * (32 * 2**20 + 1),
                                 headers={"content-type": "multipart/form-data; boundary=b"}), 413),
            "unknown target": (check(query, target="nope"), 404),
            "unknown heads": (check(query, heads="elsewhere"), 404),
            "outside the data roots": (c.post("/v1/scans", json={"folder": "/etc"}), 403),
            "unknown record": (c.get("/v1/evidence/nope"), 404),
            "unknown job": (c.get("/v1/scans/nope"), 404),
        }
        for name, (r, status) in cases.items():
            assert r.status_code == status, (name, r.text)
            body = r.json()
            assert list(body) == ["error"] and body["error"] and "\n" not in body["error"], (name, body)
        assert log.count() == before


def test_serve_points_emulator_users_to_serve_target_and_refuses_open_hosts_without_keys(tmp_path):
    old = CliRunner().invoke(app, ["serve", "--target", "toy", "--port", "7860", "--max-requests", "3"])
    assert old.exit_code == 2 and old.stderr.strip() == (
        "error: `audit serve` is now the auditing service; the txt2img/img2img target emulator is "
        "`audit serve-target` (same options)")
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_API_KEYS"} | {"AUDIT_HOME": str(tmp_path)}
    open_host = CliRunner().invoke(app, ["serve", "--target", "toy", "--host", "0.0.0.0"], env=env)
    assert open_host.exit_code == 2 and "give --api-keys FILE" in open_host.stderr
    ignored = CliRunner().invoke(app, ["check", str(tmp_path / "q.png"), "--target", "toy", "--server",
                                       "http://127.0.0.1:9", "--decision", "balanced", "--reference", "toy-base"])
    assert ignored.exit_code == 2 and ignored.stderr.strip() == (
        "error: --reference, --decision: with --server the service's models and verdict rule apply (its /v1/info "
        "lists them); a request may set --heads, --attack, --max-fpr and --tier only")
    unknown = CliRunner().invoke(app, ["serve", "--target", "nosuch", "--port", str(free_port())], env=env)
    assert unknown.exit_code == 2 and unknown.stderr.splitlines()[-1].startswith("error: unknown target 'nosuch'")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make test installs it)")
def test_the_page_checks_an_upload_and_lists_scan_jobs_in_chromium(world):
    from playwright.sync_api import sync_playwright

    url = world["state"]["server"].url
    job = httpx.post(url + "/v1/scans", json={"folder": "small"}).json()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#image", str(world["query"]))
            page.fill("#caption", world["caption"])
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            local = world["auditor"].check(world["query"], world["caption"])
            assert page.text_content("#verdict") == local.verdict
            assert f"P(member) {local.probability:.3f} by attack {local.attack}" in page.text_content("#explanation")
            assert page.locator("#warnings li").count() == len(local.warnings)
            evidence = page.get_attribute("#evidence", "href")
            assert httpx.get(url + evidence).json()["verdict"] == local.verdict
            page.wait_for_selector(f"tr.job:has-text('{job['id']}')", timeout=10_000)
            row = page.locator(f"tr.job:has-text('{job['id']}')")
            assert row.locator("a", has_text="results").get_attribute("href") == f"/v1/scans/{job['id']}/results"
            # An error is shown, not a crash: a file that is not an image.
            page.set_input_files("#image", str(world["folder"] / "metadata.jsonl"))
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60_000)
            assert "not a readable image" in page.text_content("#error")
        finally:
            browser.close()
    httpx.delete(url + f"/v1/scans/{job['id']}")


def test_a_server_killed_mid_scan_finishes_the_job_after_a_restart_with_every_row_once(world, tmp_path):
    state = world["state"]
    url = state["server"].url
    job = httpx.post(url + "/v1/scans", json={"folder": "big"}).json()
    deadline = time.time() + 600
    while time.time() < deadline:
        now = httpx.get(url + f"/v1/scans/{job['id']}").json()
        if now["counts"]["done"] > 0 or now["state"] != "queued" and now["state"] != "running":
            break
        time.sleep(0.1)
    assert now["state"] == "running" and 0 < now["counts"]["done"] < N, now
    state["server"].kill()
    state["server"] = ServeProcess(state["args"], state["env"])
    state["server"].wait_ready()
    url = state["server"].url
    deadline = time.time() + 600
    while time.time() < deadline:
        now = httpx.get(url + f"/v1/scans/{job['id']}").json()
        if now["state"] not in ("queued", "running"):
            break
        time.sleep(0.3)
    assert now["state"] == "succeeded" and now["counts"] == {"total": N, "done": N, "failed": 0}, now
    served = [json.loads(x) for x in httpx.get(url + f"/v1/scans/{job['id']}/results").text.splitlines()]
    auditor = world["auditor"]
    auditor.config = dataclasses.replace(auditor.config, batch_size=SCAN_BATCH)  # `audit scan --batch-size 4`
    auditor.scan(world["folder"], tmp_path / "local.jsonl", quiet=True)
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    _assert_same_rows(served, local)
    rows = [r["row_id"] for r in EvidenceLog(world["db"]).records(job=job["id"])]
    assert sorted(rows) == sorted(x["id"] for x in local)  # each row once
    verified = CliRunner().invoke(app, ["evidence", "verify", str(world["db"])])
    assert verified.exit_code == 0, verified.output


def _assert_same_rows(got: list, want: list) -> None:
    """Equal rows, in order; floats equal up to the last bits two processes' thread pools may round differently."""
    assert len(got) == len(want)

    def same(a, b, where):
        if isinstance(a, float) or isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4), where
        elif isinstance(a, dict) and isinstance(b, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b, where

    for i, (a, b) in enumerate(zip(got, want)):
        same(a, b, f"row {i} ({b.get('id')})")
