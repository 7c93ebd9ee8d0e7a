"""One cell of a results table: heads trained on one feature store with one seed, scored on a test split.

Modes:
- ``split``: ``audit train``'s own seeded split of every row (50% train, 25% validation, 25% test).
- ``fraction``: the same seed's test split is held fixed; the heads train on a stratified, nested fraction of the
  other 75% (split 64:32 into train:validation, the last 4% unused), so every fraction is scored on the same rows.
- ``transfer``: no training; the heads of another cell score this store's copy of that cell's test split (an
  attacker who trained before the target changed, e.g. before a defence was deployed).

A split cell with ``folds`` K cross-fits its heads instead (``audit train --folds K``) on the train and
validation rows of the same seeded split, so it is scored on the same test rows as the split cell of its seed.

Training and scoring go through the attack package (``train_heads``, ``Heads.predict``, ``metrics``): the cell
adds only the choice of rows. Its result keeps the test rows' probabilities, which set-level inference reuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import Config, atomic_write_text
from ..errors import UsageError
from ..seeding import derive_seed

log = logging.getLogger(__name__)

RESULT = "result.json"
MODES = ("split", "fraction", "transfer")
FRACTION_SPLIT = (0.64, 0.32)


@dataclasses.dataclass
class CellSpec(Config):
    name: str = ""
    store: str = ""
    n_gen: int = 0  # 0: every generated image of the store; k: the first k
    seed: int = 0
    mode: str = "split"
    fraction: float = 1.0
    heads_from: str = ""  # transfer: the cell folder whose heads are used
    attacks: tuple = ()
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig overrides
    n_boot: int = 200
    folds: int = 0  # 0: one 50/25/25 split; K >= 2: cross-fitted heads (`audit train --folds K`), same test rows

    def key(self) -> str:
        d = self.to_dict()
        d.pop("name")
        if not d["folds"]:
            d.pop("folds")  # split cells keep the keys they had before cross-fitting
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def folder(self, workdir: Path) -> Path:
        return Path(workdir) / "cells" / f"{self.name}-{self.key()}"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _ids(batch) -> list[str]:
    return [str(i) for i in batch["ids"]]


def _subset(batch: dict, rows: np.ndarray) -> dict:
    n = len(batch["ids"])
    return {k: np.asarray(v)[rows] for k, v in batch.items() if np.ndim(v) >= 1 and len(v) == n}


def fraction_rows(ids: list[str], y: np.ndarray, pool: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified ``fraction`` of ``pool`` (row indices), nested: a smaller fraction is a prefix of a larger."""
    chosen = []
    for cls in (1, 0):
        rows = pool[y[pool] == cls]
        rows = rows[np.argsort([ids[i] for i in rows], kind="stable")]
        rows = rows[np.random.default_rng(derive_seed("aux-fraction", seed, cls)).permutation(len(rows))]
        chosen.append(rows[: max(3, math.ceil(fraction * len(rows)))])
    return np.sort(np.concatenate(chosen))


def _metrics(y: np.ndarray, preds: dict, n_boot: int, seed: int) -> dict:
    from ..attacks import metrics

    return {a: metrics.attack_metrics(y, p["probability"], p["threshold"], n_boot, seed + 10 * k)
            for k, (a, p) in enumerate(preds.items())}


def _counts(split: dict) -> dict:
    """Train and validation counts of a heads.json split; cross-fitted heads fit and calibrate on the same
    out-of-fold rows, which both report."""
    c = split["counts"]
    return c if "train" in c else {"train": c["out_of_fold"], "validation": c["out_of_fold"]}


def run_cell(spec: dict, workdir: str) -> dict:
    """Train (unless transfer) and score one cell; cached in its folder's result.json. Runs in a worker."""
    import torch

    from ..attacks import TrainConfig, load_heads, train_heads
    from ..attacks.train import _jsonable, labelled_rows, stratified_split
    from .stores import read_store

    torch.set_num_threads(1)
    s = CellSpec.from_dict(spec)
    if s.mode not in MODES:
        raise UsageError(f"unknown cell mode {s.mode!r}; valid modes are {', '.join(MODES)}")
    if s.folds and s.mode != "split":
        raise UsageError(f"cell {s.name}: cross-fitting (folds {s.folds}) is a split-mode cell, not {s.mode}")
    folder = s.folder(Path(workdir))
    if (folder / RESULT).is_file():
        return {**json.loads((folder / RESULT).read_text(encoding="utf-8")), "cached": True}
    t0, c0 = time.perf_counter(), _cpu()
    batch, manifest = read_store(s.store, s.n_gen or None)
    rows, ids, y = labelled_rows(batch)
    base = TrainConfig()
    # With folds the train and validation quarters of the same seeded split are pooled and cross-fitted, so the
    # test rows are those of the split cell of the same seed.
    cfg = dataclasses.replace(base, attacks=tuple(s.attacks) + ("blind",), seed=s.seed, n_boot=s.n_boot,
                              folds=s.folds, **s.train)
    heads_dir = folder / "heads"
    if heads_dir.exists() and s.mode != "transfer":
        shutil.rmtree(heads_dir)  # left by a run killed before its result was written
    full = stratified_split(ids, y, s.seed, cfg.train_fraction, cfg.val_fraction)
    if s.mode == "transfer":
        heads = load_heads(Path(s.heads_from) / "heads")
        index = {i: k for k, i in enumerate(ids)}
        test = np.array([index[i] for i in heads.info["split"]["test"]], dtype=np.int64)
        n_train = heads.info["split"]["counts"]["train"]
    else:
        if s.mode == "split":
            train_rows = np.arange(len(ids))
        else:
            pool = np.sort(np.concatenate([full["train"], full["validation"]]))
            train_rows = fraction_rows(ids, y, pool, s.fraction, s.seed)
            cfg = dataclasses.replace(cfg, train_fraction=FRACTION_SPLIT[0], val_fraction=FRACTION_SPLIT[1])
        info = train_heads(_subset(rows, train_rows), heads_dir, cfg, manifest, None, s.store)
        heads = load_heads(heads_dir)
        index = {i: k for k, i in enumerate(ids)}
        # split mode: the heads' own test split (== full["test"]); fraction mode: the full split's test rows.
        test = (np.array([index[i] for i in info["split"]["test"]], dtype=np.int64) if s.mode == "split"
                else full["test"])
        n_train = _counts(info["split"])["train"]
    attacks = [a for a in heads.attacks if a in set(s.attacks) | {"blind"}]
    test_batch = _subset(rows, test)
    preds = heads.predict(test_batch, attacks)
    yt = y[test]
    result = {
        "spec": s.to_dict(),
        "key": s.key(),
        "metrics": _metrics(yt, preds, s.n_boot, derive_seed("cell-boot", s.seed) % (2 ** 31)),
        "blind_baseline": heads.info.get("blind_baseline"),
        "counts": {"train": n_train, "validation": _counts(heads.info["split"])["validation"],
                   "test": {"members": int((yt == 1).sum()), "nonmembers": int((yt == 0).sum())}},
        "test": {"ids": [ids[i] for i in test], "member": yt.tolist(),
                 "probability": {a: np.asarray(p["probability"], float).tolist() for a, p in preds.items()}},
        "epochs": {a: e["training"]["epochs_run"] for a, e in heads.info["attacks"].items()}
        if s.mode != "transfer" else {},
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(_cpu() - c0, 2),
    }
    result = _jsonable(result)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / RESULT, json.dumps(result) + "\n")
    return result
