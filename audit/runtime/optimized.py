"""onnxruntime's optimised form of a graph, saved under ``$AUDIT_HOME/ort-optimized`` and loaded with optimisation
off next time (``RuntimeOptions.saved_graphs``, for graphs of ``save_above_mib`` and more).

An entry is keyed by the source graph's content (its file and external data), the onnxruntime version, the
providers and the optimisation level, and this CPU (``ORT_ENABLE_ALL`` picks kernels and memory layouts for the
vector width it finds). Nothing outside the entry is ever loaded from it: before a session opens an entry, its files
must hash to what was recorded when it was written, and every external initializer must name the entry's own
``graph.onnx.data``. An entry failing either check, or one onnxruntime cannot open, is removed and rebuilt from the
source graph.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path

from ..manifest import cached_hash, file_sha256

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
GRAPH = "graph.onnx"
DATA = GRAPH + ".data"
META = "saved.json"
# Initializers this large or larger go to graph.onnx.data: a protobuf cannot pass 2 GB, and SD's UNet is 3.4 GB.
EXTERNAL_MIN_BYTES = 1024


def cache_root() -> Path:
    return Path(os.environ.get("AUDIT_HOME") or Path.home() / ".cache" / "audit").expanduser() / "ort-optimized"


def graph_files(path: Path) -> list[Path]:
    """The graph and every file its initializers are stored in (export writes one ``.data``; others write many)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (onnxruntime names the problem when it opens the graph)
        return [path]
    names = {e.value for t in model.graph.initializer if uses_external_data(t)
             for e in t.external_data if e.key == "location"}
    return [path, *(path.parent / n for n in sorted(names) if (path.parent / n).is_file())]


def _content(folder: Path, files: list[Path]) -> str:
    def compute() -> str:
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(f).encode())
        return h.hexdigest()

    return cached_hash("graph-files", folder, files, compute)


def _cpu() -> str:
    """The CPU's model and feature flags, as far as the OS says (Linux: /proc/cpuinfo's first processor)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n")[0]
    except OSError:
        text = ""
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(keep)


def entry_for(path: Path, providers: list, level: str) -> Path:
    import onnxruntime as ort

    key = json.dumps([CACHE_FORMAT, _content(path.parent, graph_files(path)), ort.__version__, providers, level,
                      hashlib.sha256(_cpu().encode()).hexdigest()], default=str)
    return cache_root() / hashlib.sha256(key.encode()).hexdigest()[:32]


def valid(entry: Path) -> bool:
    """Whether ``entry`` holds exactly what was saved there: its recorded hashes, and no reference outside it."""
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
        recorded = meta["files"]
        if not isinstance(recorded, dict) or set(recorded) - {GRAPH, DATA} or GRAPH not in recorded:
            return False
        present = {p.name for p in entry.iterdir() if p.name != META}
        if present != set(recorded):
            return False
        for name, digest in recorded.items():
            f = entry / name
            if f.is_symlink() or not f.is_file() or cached_hash("saved-graph", entry, [f],
                                                                lambda f=f: file_sha256(f)) != digest:
                return False
        return _external_data_inside(entry / GRAPH)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _external_data_inside(graph: Path) -> bool:
    """Every initializer stored outside the graph names graph.onnx.data (onnxruntime would open any path)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # noqa: BLE001 (any parse failure: not an entry we wrote)
        return False
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # constants of subgraphs would be here too; ours have none, so refuse them
        if any(a.g.node or a.graphs for a in node.attribute):
            return False
    for t in tensors:
        if uses_external_data(t):
            where = {e.key: e.value for e in t.external_data}.get("location")
            if where != DATA:
                return False
    return True


def save_here(so, entry: Path) -> Path:
    """Make ``so`` write the optimised graph into a fresh scratch folder beside ``entry``; returns that folder."""
    scratch = entry.with_name(f".{entry.name}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    so.optimized_model_filepath = str(scratch / GRAPH)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                str(EXTERNAL_MIN_BYTES))
    return scratch


def commit(scratch: Path, entry: Path) -> None:
    """Record the hashes of what onnxruntime wrote and move it into place; a failure only costs the next load."""
    try:
        files = {p.name: cached_hash("saved-graph", scratch, [p], lambda p=p: file_sha256(p))
                 for p in scratch.iterdir()}
        (scratch / META).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}) + "\n", encoding="utf-8")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(scratch, entry)
        # The hash cache is keyed by path and inode: record the moved files' hashes under their new names.
        valid(entry)
    except OSError as exc:
        log.debug("cannot save an optimised graph in %s (%s)", entry, exc)
        shutil.rmtree(scratch, ignore_errors=True)


def discard(entry: Path) -> None:
    log.info("%s: saved optimised graph is not what was saved there; rebuilding it", entry)
    shutil.rmtree(entry, ignore_errors=True)
