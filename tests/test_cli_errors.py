"""Exit codes and one-line errors at the CLI boundary: 0 ok, 1 input/artifact error, 2 usage error (ours and
typer's), 3 only for --fail-on-member (tested in test_check_scan.py). A single bad image never shows a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from audit.cli import app
from badcorpus import noise, png_with_header_only

TARGET = ["--target", "toy"]  # never loaded: bad images and bad options fail before any model


def _err_lines(result):
    return [ln for ln in result.output.splitlines() if ln.startswith("error: ")]


@pytest.fixture
def bad_images(tmp_path):
    made = {
        "empty.png": b"",
        "text.png": b"hello, not an image\n",
        "truncated.png": _png(noise(np.random.default_rng(0), 64))[:900],
        "huge.png": png_with_header_only(100_000, 100_000),
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(200),
    }
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "caption_bad.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    (tmp_path / "caption_bad.txt").write_bytes(b"caf\xe9")
    return tmp_path


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, reason", [
    ("empty.png", "empty file"), ("text.png", "not a readable image"), ("truncated.png", "corrupt or truncated"),
    ("huge.png", "refused without decoding"), ("corrupt.jpg", "image"), ("folder.png", "is a directory"),
    ("missing.png", "file not found"), ("caption_bad.png", "caption_bad.txt: caption is not UTF-8"),
])
def test_check_of_a_bad_image_is_one_line_and_exit_1(bad_images, name, reason):
    result = CliRunner().invoke(app, ["check", str(bad_images / name), *TARGET])
    assert result.exit_code == 1, result.output
    (line,) = _err_lines(result)
    assert name.split(".")[0] in line and reason in line
    assert "Traceback" not in result.output


def test_real_process_prints_exactly_one_stderr_line(bad_images):
    out = subprocess.run([sys.executable, "-m", "audit.cli", "check", str(bad_images / "text.png"), *TARGET],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [f"error: {bad_images / 'text.png'}: not a readable image (unknown format or "
                                       "not an image)"]


@pytest.mark.parametrize("args", [
    ["check"],  # missing argument and --target
    ["scan", "somewhere", "--target", "toy", "--out", "r.jsonl", "--no-such-flag"],
    ["no-such-command"],
    ["features", "--target", "toy", "--data", ".", "--out", "s.h5", "--n-gen", "two"],
])
def test_typer_usage_errors_exit_2(args):
    assert CliRunner().invoke(app, args).exit_code == 2


def test_our_usage_errors_exit_2_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["features", "--target", "toy", "--data", str(tmp_path), "--out",
                                      str(tmp_path / "s.h5"), "--n-gen", "0"])
    assert result.exit_code == 2
    (line,) = _err_lines(result)
    assert "--n-gen must be >= 1" in line


def test_unknown_target_lists_valid_names_and_exits_2(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(np.zeros((4, 4, 3), np.uint8)))
    result = CliRunner().invoke(app, ["check", str(tmp_path / "a.png"), "--caption", "x", "--target", "nope"])
    assert result.exit_code == 2
    (line,) = _err_lines(result)
    assert "unknown target 'nope'" in line and "toy" in line


def test_scan_of_a_missing_folder_exits_1(tmp_path):
    result = CliRunner().invoke(app, ["scan", str(tmp_path / "nope"), *TARGET, "--out", str(tmp_path / "r.jsonl")])
    assert result.exit_code == 1
    (line,) = _err_lines(result)
    assert "nope: not a folder" in line


# ------------------------------------------------------------------------- the one boundary: errors.ERRORS

def test_an_injected_bug_exits_70_with_one_line_and_a_traceback_file(monkeypatch, tmp_path):
    from audit import api

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))

    def broken():
        return {}["kind"]  # a KeyError: a bug, not the user's input

    monkeypatch.setattr(api, "list_models", broken)
    result = CliRunner().invoke(app, ["targets"])
    assert result.exit_code == 70, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: internal error in `audit targets`: KeyError: 'kind'")
    assert "Traceback" not in result.output
    (log,) = (tmp_path / "home" / "logs").iterdir()
    assert str(log) in line
    text = log.read_text()
    assert text.startswith("Traceback") and "in broken" in text and "KeyError: 'kind'" in text


def test_a_bug_in_the_formatting_also_exits_70(monkeypatch, tmp_path):
    from audit import api

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path))
    monkeypatch.setattr(api, "list_models", lambda: [{"kind": "target"}])  # no "name": the CLI's own code fails
    result = CliRunner().invoke(app, ["targets"])
    assert result.exit_code == 70 and "KeyError: 'name'" in result.output
    assert len(result.output.strip().splitlines()) == 2  # the "targets:" header, then the one error line


def _raiser(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


@pytest.mark.parametrize("exc_name", ["InputError", "UsageError", "UnknownNameError", "ArtifactError",
                                      "ModelNotFoundError", "UnsafeWeightsError", "AuditError"])
def test_each_domain_error_exits_with_its_code_from_the_table(monkeypatch, exc_name):
    from audit import api, errors

    cls = getattr(errors, exc_name)
    monkeypatch.setattr(api, "list_models", _raiser(cls("bad thing")))
    result = CliRunner().invoke(app, ["targets"])
    assert result.exit_code == errors.ERRORS[cls][0] == cls.exit_code
    assert result.output.strip() == "error: bad thing"
    assert errors.error_codes(cls("x")) == errors.ERRORS[cls]


def test_error_table_codes_and_statuses():
    from audit import errors

    assert errors.error_codes(errors.UsageError("x")) == (2, 400)
    assert errors.error_codes(errors.UnknownNameError("x")) == (2, 404)
    assert errors.error_codes(errors.InputError("x")) == (1, 422)
    assert errors.error_codes(errors.ClusterError("x", exit_code=2)) == (2, 503)
    assert errors.error_codes(KeyError("x")) == (errors.EXIT_UNEXPECTED, 500) == (70, 500)


def test_interrupt_exits_130(monkeypatch):
    from audit import api

    monkeypatch.setattr(api, "list_models", _raiser(KeyboardInterrupt()))
    result = CliRunner().invoke(app, ["targets"])
    assert result.exit_code == 130 and result.output.strip() == "interrupted"
