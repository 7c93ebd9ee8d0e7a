"""What runs on the cluster: the read step (on the driver's node) and the actors that hold the models.

Ray Data hands both one dataset row at a time, and each dataset row is one batch of the run (a fixed slice of the
row order, ``batch_slices``): an actor computes exactly the batch the single-machine command computes, with the
same per-batch function (``featurize_rows`` for ``features``, ``Auditor.score_rows`` for ``scan``) and the same
thread counts, so its outputs are the same bits.

Nothing here raises into Ray: a worker that cannot load its models, or fails on a batch, returns the failure as
data (node, rows, its one-line error), and the driver turns it into one ``ClusterError``. Ray's own retries are
left for what they are for: a worker process or node that dies is restarted and its batch computed again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import resource
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditError, ClusterError
from ..imagefolder import ImageError, Row, load_image, read_image_bytes
from ..tiers import BLACK_BOX

# Environment a worker takes from the driver, so its models resolve and run as the single-machine command's do.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "AUDIT_MEMORY_ARENA")


@dataclasses.dataclass
class WorkerSpec:
    """How every actor of a run loads its models and threads; made once by the driver."""

    kind: str  # "features" or "scan"
    target: str
    embedder: str | None = None
    captioner: str | None = None
    device: str = "cpu"
    allow_pickle: bool = False
    torch_threads: int = 1
    ort_threads: int = 1  # $AUDIT_THREADS of the onnxruntime sessions
    replicas: int = 0  # $AUDIT_REPLICAS (0: unset, the runtime's automatic choice)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    folders: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> folder every node must have
    config: Any = None  # features: the run's FeaturesConfig, handed to featurize_rows as it is
    heads: str | None = None  # scan: the Auditor's arguments
    attack: str | None = None
    batch_size: int = 8
    rule: dict = dataclasses.field(default_factory=dict)  # the verdict rule: max_fpr, decision, max_miss


def node_name() -> str:
    import ray

    return f"{socket.gethostname()} (node {ray.get_runtime_context().get_node_id()[:8]})"


def failure(where: str, exc: BaseException) -> dict:
    """A worker's error as data: one line naming where it happened, and the exit code the command should end with
    (the domain error's, 1 for anything else: a bug)."""
    if isinstance(exc, AuditError):
        return {"message": f"{where}: {exc}", "exit_code": exc.exit_code}
    text = " ".join(str(exc).split()) or "(no message)"
    return {"message": f"{where}: {type(exc).__name__}: {text}", "exit_code": 1}


def check_folders(folders: dict[str, str]) -> None:
    """The one-line error for a node that lacks a folder the run names (the driver sends the paths it resolved)."""
    for role, folder in folders.items():
        if not Path(folder).exists():
            raise ClusterError(f"{role} folder {folder} is missing on that node; every node needs the models at "
                               "the same path (copy the folder, or an `audit export` folder, to each node)")


class ShippedImages(Mapping):
    """A batch's images as the driver's node read them, decoded when ``featurize_rows`` asks for one: bytes decode
    with ``load_image(path, data=...)``, and a file that could not be read marks its row then, as
    ``load_row_image`` does on one machine (so each row's checks run in the single-machine order)."""

    def __init__(self, rows: list[Row], shipped: dict[int, bytes | tuple[str, str]]):
        self.rows, self.shipped = rows, shipped

    def __getitem__(self, i: int) -> np.ndarray | None:
        row, item = self.rows[i], self.shipped[i]
        if not row.ok:
            return None
        if isinstance(item, tuple):
            row.fail(*item)
            return None
        try:
            return load_image(row.path, data=item)
        except ImageError as exc:
            row.fail(exc.status, str(exc))
            return None

    def __contains__(self, i: object) -> bool:
        return i in self.shipped  # not Mapping's: it would decode the image (and mark the row) to answer

    def __iter__(self):
        return iter(self.shipped)

    def __len__(self) -> int:
        return len(self.shipped)


def rows_item(index: int, rows: list[Row]) -> dict:
    """One dataset row: a batch's index and its rows (ids, paths, captions, statuses), without image bytes."""
    return {"index": index, "rows": json.dumps([dataclasses.asdict(r) for r in rows])}


def read_payload(rows_json: str) -> bytes:
    """A batch's rows and the bytes of their images (or, per unreadable file, its status and error)."""
    rows = json.loads(rows_json)
    shipped: dict[int, bytes | tuple[str, str]] = {}
    for i, row in enumerate(rows):
        if row["status"] == "ok":
            try:
                shipped[i] = read_image_bytes(row["path"], root=row.get("root"))
            except ImageError as exc:
                shipped[i] = (exc.status, str(exc))
    # Ray moves Python objects by pickle anyway; these bytes only travel between this run's driver and workers.
    return pickle.dumps((rows, shipped), protocol=5)


def read_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data's read step, scheduled on the driver's node (where the folder is): rows -> rows + image bytes."""
    return {"index": batch["index"], "payload": np.array([read_payload(r) for r in batch["rows"]], dtype=object)}


class BatchWorker:
    """An actor of the pool: sets the run's threads, checks the folders, loads the models once, then computes the
    batches it is given. Failures come back as data (see the module docstring)."""

    def __init__(self, spec: WorkerSpec):
        self.node = node_name()
        self.error: dict | None = None
        try:
            check_folders(spec.folders)
            self._environment(spec)
            self.load(spec)
        except Exception as exc:  # noqa: BLE001 (every failure to start is reported, none raised into Ray)
            self.error = failure(f"worker on {self.node} could not load its models", exc)

    @staticmethod
    def _environment(spec: WorkerSpec) -> None:
        from ..progress import silence_libraries

        os.environ.update(spec.env)
        os.environ["AUDIT_THREADS"] = str(spec.ort_threads)
        if spec.replicas:
            os.environ["AUDIT_REPLICAS"] = str(spec.replicas)
        else:
            os.environ.pop("AUDIT_REPLICAS", None)
        silence_libraries()
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPUs; the run's threads are the single-machine command's.
        torch.set_num_threads(spec.torch_threads)

    def load(self, spec: WorkerSpec) -> None:
        raise NotImplementedError

    def compute(self, rows: list[Row], images: ShippedImages) -> dict:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = int(batch["index"][0])
        result = {"error": self.error} if self.error else self._compute(index, batch["payload"][0])
        result.update(node=self.node, pid=os.getpid(),
                      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"index": batch["index"], "result": np.array([pickle.dumps(result, protocol=5)], dtype=object)}

    def _compute(self, index: int, payload: bytes) -> dict:
        row_dicts, shipped = pickle.loads(payload)
        rows = [Row(**r) for r in row_dicts]
        try:
            return self.compute(rows, ShippedImages(rows, shipped))
        except Exception as exc:  # noqa: BLE001 (a bug: the job fails with the rows and the error, not a traceback)
            ids = ", ".join(r.id for r in rows[:4]) + (f" and {len(rows) - 4} more" if len(rows) > 4 else "")
            return {"error": failure(f"worker on {self.node} failed on batch {index} (rows {ids})", exc)}


class FeaturesWorker(BatchWorker):
    """``audit features``: ``featurize_rows`` on the run's FeaturesConfig."""

    def load(self, spec: WorkerSpec) -> None:
        from ..features.compute import Models

        self.config = spec.config
        self.models = Models.load(spec.target, spec.embedder, spec.captioner, spec.device, spec.allow_pickle,
                                  reference=self.config.reference or None)
        if BLACK_BOX in self.config.tiers:  # this node's memory, before its first batch
            from ..runtime.memory import check_batch_fits

            cfg = self.config
            check_batch_fits(self.models, cfg.batch_size, cfg.n_gen, cfg.guidance, what=f"features on {self.node}")

    def compute(self, rows: list[Row], images: ShippedImages) -> dict:
        from ..features.compute import featurize_rows

        return {"batch": featurize_rows(rows, self.models, self.config, images),
                "identities": self.models.identities(), "dim": int(self.models.embedder.dim)}


class ScanWorker(BatchWorker):
    """``audit scan``: an ``Auditor`` (models and heads) scoring each batch with ``score_rows``."""

    def load(self, spec: WorkerSpec) -> None:
        from ..auditor import Auditor

        self.auditor = Auditor(spec.target, spec.heads, spec.embedder, spec.captioner, spec.attack,
                               device=spec.device, allow_pickle=spec.allow_pickle, batch_size=spec.batch_size,
                               **spec.rule)

    def compute(self, rows: list[Row], images: ShippedImages) -> dict:
        return {"verdicts": [v.to_dict() for v in self.auditor.score_rows(rows, images)],
                "describe": self.auditor.describe()}


WORKERS = {"features": FeaturesWorker, "scan": ScanWorker}
