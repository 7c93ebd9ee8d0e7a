"""Running the CLI as a real process and killing it with SIGKILL at a chosen point (the kill/resume tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

# Every committed batch redrawn at once (AUDIT_PROGRESS_INTERVAL=0): the kill lands right after the count it waits for.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "AUDIT_PROGRESS": "1", "AUDIT_PROGRESS_INTERVAL": "0",
       "PYTHONUNBUFFERED": "1"}


def run_until(cmd, ready, timeout=240.0, extra_delay=0.0):
    """Start ``cmd``; SIGKILL it once ``ready(stderr_so_far)`` holds (plus ``extra_delay`` s). Returns stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    buf = bytearray()

    def pump():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            buf.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready(buf.decode("utf-8", "replace")):
        time.sleep(0.05)
    time.sleep(extra_delay)
    finished_early = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(5)
    text = buf.decode("utf-8", "replace")
    assert not finished_early, f"the run ended before it could be killed:\n{text[-2000:]}"
    return text


def committed(desc, total):
    """A stderr predicate: the ``desc`` progress bar shows at least ``k`` of ``total`` rows done."""

    def ready_after(k):
        def ready(text):
            done = [int(m) for m in re.findall(rf"{desc}: *\d+%\|[^|]*\| *(\d+)/{total} \[", text)]
            return bool(done) and max(done) >= k

        return ready

    return ready_after
