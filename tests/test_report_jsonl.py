"""Resumable JSONL results and atomic JSON: no row lost or duplicated across kills, torn tails dropped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from audit.errors import ArtifactError, UsageError
from audit.report.jsonl import JsonlWriter, read_jsonl, to_jsonable, write_json


def _ids(path):
    return [json.loads(line)["image"] for line in path.read_text().splitlines()]


def test_resume_skips_finished_rows_and_appends_the_rest(tmp_path):
    out = tmp_path / "r.jsonl"
    with JsonlWriter(out, key="image") as w:
        w.write({"image": "a", "p": 0.1})
        w.write({"image": "b", "p": 0.2})
    with JsonlWriter(out, resume=True, key="image") as w:
        assert "a" in w and "b" in w and "c" not in w and w.n_existing == 2
        w.write({"image": "c", "p": 0.3})
        with pytest.raises(ValueError, match="already written"):
            w.write({"image": "a", "p": 0.9})
    assert _ids(out) == ["a", "b", "c"]


def test_torn_last_line_is_dropped_and_redone(tmp_path):
    out = tmp_path / "r.jsonl"
    with JsonlWriter(out, key="image") as w:
        w.write({"image": "a"})
        w.write({"image": "b"})
    good = out.stat().st_size
    with open(out, "ab") as fh:
        fh.write(b'{"image": "c", "probab')  # killed mid-line
    records, end = read_jsonl(out)
    assert [r["image"] for r in records] == ["a", "b"] and end == good
    with JsonlWriter(out, resume=True, key="image") as w:
        assert out.stat().st_size == good and "c" not in w
        w.write({"image": "c"})
    assert _ids(out) == ["a", "b", "c"]


def test_complete_record_without_newline_counts_as_torn(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"image": "a"}\n{"image": "b"}')
    with JsonlWriter(out, resume=True, key="image") as w:
        assert w.done == {"a"}


def test_damage_in_the_middle_is_refused_not_guessed(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"image": "a"}\n{garbage\n{"image": "c"}\n')
    with pytest.raises(ArtifactError, match=r"r.jsonl:2: malformed line in the middle"):
        JsonlWriter(out, resume=True, key="image")


def test_existing_file_needs_resume(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"image": "a"}\n')
    with pytest.raises(UsageError, match="pass --resume"):
        JsonlWriter(out, key="image")
    (tmp_path / "empty.jsonl").write_text("")
    JsonlWriter(tmp_path / "empty.jsonl", key="image").close()  # an empty file is not a previous run


def test_values_are_made_json_safe():
    rec = to_jsonable({"p": np.float32(0.5), "n": np.int64(3), "nan": float("nan"), "inf": np.float64(np.inf),
                       "arr": np.arange(3), "ok": np.bool_(True), "s": "a\ud800b"})
    assert rec == {"p": 0.5, "n": 3, "nan": None, "inf": None, "arr": [0, 1, 2], "ok": True, "s": "a\ufffdb"}
    json.dumps(rec, allow_nan=False).encode("utf-8")
    with pytest.raises(TypeError, match="cannot write object"):
        to_jsonable(object())


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "e.json"
    write_json(path, {"auc": np.float64(0.75)})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})  # fails before anything is written
    assert json.loads(path.read_text()) == {"auc": 0.75}
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]  # no temporary file left behind


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    """A real process appending rows is killed with SIGKILL; a resumed run completes the same rows exactly once."""
    out = tmp_path / "r.jsonl"
    code = textwrap.dedent(f"""
        import sys, time
        from audit.report.jsonl import JsonlWriter
        with JsonlWriter({str(out)!r}, resume=True, key="image") as w:
            for i in range(int(sys.argv[1])):
                if str(i) in w:
                    continue
                w.write({{"image": str(i), "payload": "x" * 5000}})
                time.sleep(float(sys.argv[2]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code, "200", "0.01"])
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or out.stat().st_size < 20 * 5000):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_rows = len(read_jsonl(out)[0])
    assert 0 < killed_rows < 200, "the kill must land mid-run"
    subprocess.run([sys.executable, "-c", code, "200", "0"], check=True, timeout=60)
    assert _ids(out) == [str(i) for i in range(200)]
