"""Result files and reports: resumable JSONL and atomic JSON writers, self-contained HTML reports.

Public names: ``JsonlWriter``, ``read_jsonl``, ``write_json``, ``to_jsonable``, ``write_scan_report``,
``write_evaluate_report``.
"""

from .jsonl import JsonlWriter, read_jsonl, to_jsonable, write_json


def write_scan_report(*args, **kwargs):
    """See ``audit.report.html.write_scan_report`` (imported lazily: it pulls in matplotlib)."""
    from .html import write_scan_report as fn

    return fn(*args, **kwargs)


def write_evaluate_report(*args, **kwargs):
    """See ``audit.report.html.write_evaluate_report`` (imported lazily: it pulls in matplotlib)."""
    from .html import write_evaluate_report as fn

    return fn(*args, **kwargs)


__all__ = ["JsonlWriter", "read_jsonl", "to_jsonable", "write_json", "write_scan_report", "write_evaluate_report"]
