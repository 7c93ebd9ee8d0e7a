"""Progress bars for long commands: rate and ETA on stderr, off with ``--quiet`` or when stderr is not a terminal.

Pipelines (CI logs, ``2> file``) get no bar noise; people at a terminal see ``features: 40%|████  | 8/20
[00:12<00:18, 0.65 row/s]``. Use it around the outer loop of a long command::

    from audit.progress import progress

    with progress(total=len(rows), desc="features", unit="row", quiet=quiet) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

Set ``AUDIT_PROGRESS=1`` to force bars on (e.g. under ``script`` or in a notebook), ``AUDIT_PROGRESS=0`` to force
them off. ``AUDIT_PROGRESS_INTERVAL`` is the least number of seconds between redraws (default 0.5; 0 draws every
update, for logs that must show each committed batch).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled(quiet: bool = False, stream: TextIO | None = None) -> bool:
    """Whether a bar should be drawn: not quiet, and stderr is a terminal (or AUDIT_PROGRESS forces it)."""
    if quiet:
        return False
    forced = os.environ.get("AUDIT_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str | None = None,
             unit: str = "row", quiet: bool = False, initial: int = 0, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar with rate and ETA, or a silent stand-in with the same interface when bars are off.

    ``initial`` is the count already done (a resumed run), so the rate and ETA count only this run's work.
    """
    stream = stream if stream is not None else sys.stderr
    try:
        interval = max(0.0, float(os.environ.get("AUDIT_PROGRESS_INTERVAL", "0.5")))
    except ValueError:
        interval = 0.5
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                disable=not enabled(quiet, stream), dynamic_ncols=True, mininterval=interval, miniters=1,
                smoothing=0.1, leave=True)


def silence_libraries(verbose: bool = False) -> None:
    """Keep the libraries' own bars and advice (``Loading pipeline components``, ``Loading weights``, "install
    accelerate") off the command line's stderr, where they would bury the one-line results and errors. Call it
    before the libraries are imported (they read these variables on import); ``--verbose`` keeps their messages."""
    if verbose:
        return
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                        ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                        ("TF_CPP_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(name, value)
    for module in ("transformers", "diffusers"):
        lib = sys.modules.get(module)  # already imported (an API user imported it first): switch it off directly
        if lib is not None:
            try:
                lib.utils.logging.set_verbosity_error()
                lib.utils.logging.disable_progress_bar()
            except AttributeError:
                pass
