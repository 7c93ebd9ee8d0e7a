"""Progress bars: rate and ETA on a terminal; nothing when quiet or when stderr is a pipe or file."""

from __future__ import annotations

import io
import os

from audit.progress import enabled, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, quiet=False, n=5):
    with progress(total=n, desc="features", quiet=quiet, stream=stream) as bar:
        for _ in range(n):
            bar.update(1)
    return stream.getvalue()


def test_terminal_gets_a_bar_with_rate_and_eta(monkeypatch):
    monkeypatch.delenv("AUDIT_PROGRESS", raising=False)
    text = _run(_Tty())
    assert "features" in text and "5/5" in text and "row/s" in text and "<" in text  # elapsed<remaining


def test_pipe_or_file_gets_nothing(monkeypatch):
    monkeypatch.delenv("AUDIT_PROGRESS", raising=False)
    assert _run(io.StringIO()) == ""


def test_quiet_wins_even_when_forced(monkeypatch):
    monkeypatch.setenv("AUDIT_PROGRESS", "1")
    assert _run(_Tty(), quiet=True) == ""
    assert "5/5" in _run(io.StringIO())  # forced on for a non-terminal
    monkeypatch.setenv("AUDIT_PROGRESS", "0")
    assert _run(_Tty()) == ""


def test_real_pseudo_terminal_is_detected(monkeypatch):
    monkeypatch.delenv("AUDIT_PROGRESS", raising=False)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert enabled(stream=tty)
        r, w = os.pipe()
        with os.fdopen(w, "w") as pipe:
            assert not enabled(stream=pipe)
        os.close(r)
    finally:
        os.close(master)
        os.close(slave)


def test_resumed_runs_start_from_the_finished_count(monkeypatch):
    monkeypatch.delenv("AUDIT_PROGRESS", raising=False)
    stream = _Tty()
    with progress(total=10, initial=7, stream=stream) as bar:
        bar.update(3)
    assert "10/10" in stream.getvalue()
