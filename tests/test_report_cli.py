"""Reports and JSON through the commands users run: evaluate --report, audit report, --json summaries, and a quiet
stderr (no library bars or advice) when stderr is not a terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from audit.cli import app
from test_report_html import _assert_self_contained, _inline_images


@pytest.fixture(scope="module")
def heads(tiny_world, tmp_path_factory):
    from tinyheads import tiny_heads

    return tiny_heads(tiny_world, tmp_path_factory.mktemp("heads"))


@pytest.fixture(scope="module")
def evaluated(heads, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    r = CliRunner().invoke(app, ["evaluate", str(heads["store"]), "--heads", str(heads["heads"]), "--bootstrap", "20",
                                 "--json", str(out / "e.json"), "--report", str(out / "e.html")])
    assert r.exit_code == 0, r.output
    return out


def test_evaluate_report_shows_test_rows_beside_their_generated_images(evaluated, heads):
    page = (evaluated / "e.html").read_text()
    _assert_self_contained(page)
    ev = json.loads((evaluated / "e.json").read_text())
    assert f"{ev['attacks']['IV']['auc']['value']:.3f}" in page
    thumbs = [im for im in _inline_images(page) if im.size == (32, 32)]
    n_test = ev["n_test"]
    # every test row is shown (3 of them at most per gallery) as query + n_gen=1 generated image
    assert len(thumbs) == 2 * 2 * min(6, n_test // 2 if n_test > 1 else n_test)
    assert "truth: member" in page or "truth: non-member" in page
    from audit.features import FeatureStore

    captions = FeatureStore.open(heads["store"]).read()["caption"]
    assert sum(f"<div class=cap>{c}</div>" in page for c in captions) >= 2  # captions read from the store


def test_report_command_renders_finished_evaluations_and_scans(evaluated, heads, tmp_path):
    r = CliRunner().invoke(app, ["report", str(evaluated / "e.json"), "--out", str(tmp_path / "again.html")])
    assert r.exit_code == 0, r.output
    assert "ROC curves" in (tmp_path / "again.html").read_text()
    rows = [{"id": "a.png", "image": "a.png", "status": "unreadable", "error": "a.png: empty file"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = CliRunner().invoke(app, ["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "s.html")])
    assert r.exit_code == 0 and "a.png: empty file" in (tmp_path / "s.html").read_text()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.html")])
    assert r.exit_code == 1 and "nope.json: no such file" in r.output


def test_scan_json_summary_and_a_quiet_stderr(heads, tmp_path):
    from audit.toy import scenes

    images, captions = scenes.scene_images(9, "members", 2)
    folder = scenes.write_imagefolder(tmp_path / "q", images, captions)
    env = {k: v for k, v in os.environ.items() if not k.endswith(("VERBOSITY", "PROGRESS", "PROGRESS_BARS"))}
    out = subprocess.run([sys.executable, "-m", "audit.cli", "scan", str(folder), "--out", str(tmp_path / "r.jsonl"),
                          *heads["opts"], "--json"], capture_output=True, text=True, timeout=300,
                         env={**env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["rows"] == 2 and sum(summary["counts"].values()) == 2
    # stderr is not a terminal: no progress bars, no library chatter; only the one line naming the heads
    assert [line.split(":")[0] for line in out.stderr.splitlines()] == ["heads"], out.stderr
