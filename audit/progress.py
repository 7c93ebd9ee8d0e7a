"""Progress bars for long commands: rate and ETA on stderr, off with ``--quiet`` or when stderr is not a terminal.

Pipelines (CI logs, ``2> file``) get no bar noise; people at a terminal see ``features: 40%|████  | 8/20
[00:12<00:18, 0.65 row/s]``. Use it around the outer loop of a long command::

    from audit.progress import progress

    with progress(total=len(rows), desc="features", unit="row", quiet=quiet) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))

Set ``AUDIT_PROGRESS=1`` to force bars on (e.g. under ``script`` or in a notebook), ``AUDIT_PROGRESS=0`` to force
them off.
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
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                disable=not enabled(quiet, stream), dynamic_ncols=True, mininterval=0.5, smoothing=0.1,
                leave=True)
