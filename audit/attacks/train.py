"""Training the attack heads: seeded stratified split, early stopping, calibration, ONNX export, heads.json.

Fitting uses the training split (weights, standardisation statistics) and the validation split (early stopping,
Platt calibration, thresholds). The test split is only ever scored, for the blind-baseline report here and for
``evaluate``; tests/test_attacks_train.py proves that changing test rows changes nothing that was fitted.
With ``folds`` (``audit train --folds K``) the training and validation splits are pooled and cross-fitted instead
(``attacks/crossfit.py``); the test split is the same rows either way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..config import Config, atomic_write_text, read_json
from ..errors import InputError, UsageError
from ..manifest import make_manifest
from ..seeding import derive_seed
from . import calibration, metrics
from .decision import VALIDATION_KEY, validation_record
from .export import export_head, ort_session, run_session
from .inputs import ATTACKS, PAPER_ATTACKS, build_inputs, get_attack, input_signature
from .nets import ScoringHead, build_net, standardisation

log = logging.getLogger(__name__)

HEADS_FILE = "heads.json"
CONFIG_FILE = "train_config.json"
SPLITS = ("train", "validation", "test")
# The blind baseline "separates" the auxiliary data when its test AUC CI lies above 0.5 or the AUC exceeds this.
BLIND_AUC_LIMIT = 0.6


@dataclasses.dataclass
class TrainConfig(Config):
    attacks: tuple = PAPER_ATTACKS + ("blind",)
    seed: int = 0
    train_fraction: float = 0.5
    val_fraction: float = 0.25  # the rest is the test split
    # 0: one train/validation split. K >= 2: K cross-fitted heads per attack on the train + validation rows, every
    # one of them scored out of fold and all of them serving calibration (attacks/crossfit.py). With folds the
    # fractions sum to 1 when no test split is wanted.
    folds: int = 0
    # Share of the training split held out for early stopping. Early stopping never looks at the validation split:
    # the conformal thresholds (attacks/decision.py) bound the FPR on unseen rows only if nothing that chose the
    # network saw the validation rows they are fitted on.
    early_stop_fraction: float = 0.2
    epochs: int = 200
    patience: int = 20  # epochs without a better validation loss before stopping
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    mlp_hidden: tuple = (128, 64)
    cnn_channels: tuple = (16, 32, 32)
    cnn_hidden: int = 32
    dropout: float = 0.2
    n_boot: int = 1000  # bootstrap resamples for the blind baseline's AUC CI
    # CPU threads for fitting and scoring. The heads are tiny: one thread is fastest, and a second thread
    # makes a step ~10x slower as soon as another process wants the core (measured on 2 cores).
    threads: int = 1

    def validate(self) -> "TrainConfig":
        for n in self.attacks:
            get_attack(n)
        if not self.attacks:
            raise UsageError(f"no attacks to train; valid attacks are: {', '.join(ATTACKS)}")
        if int(self.folds) != self.folds or self.folds == 1 or self.folds < 0:
            raise UsageError(f"folds must be 0 (one validation split) or at least 2, got {self.folds}")
        total = self.train_fraction + self.val_fraction
        if not (0 < self.train_fraction < 1 and 0 < self.val_fraction < 1
                and (total < 1 or (self.folds and total <= 1 + 1e-9))):
            raise UsageError(
                f"split fractions train={self.train_fraction}, validation={self.val_fraction} must be in (0, 1) "
                "and leave a test split (sum < 1; with folds the test split may be empty)"
            )
        for name in ("epochs", "patience", "batch_size", "cnn_hidden"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.early_stop_fraction < 1:
            raise UsageError(f"early_stop_fraction must be in (0, 1), got {self.early_stop_fraction}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


def _str_ids(ids: np.ndarray) -> list[str]:
    return [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in np.asarray(ids).tolist()]


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]


def stratified_split(ids: list[str], labels: np.ndarray, seed: int, train_fraction: float,
                     val_fraction: float) -> dict[str, np.ndarray]:
    """Row indices per split. Depends on the ids, labels and seed only, never on the row order of the store.
    Fractions summing to 1 leave the test split empty (cross-fitting with ``--test-fraction 0``)."""
    labels = np.asarray(labels)
    test = 0 if train_fraction + val_fraction >= 1 - 1e-9 else 1  # fewest test rows per class
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for cls in (1, 0):
        rows = np.flatnonzero(labels == cls)
        name = "members" if cls == 1 else "non-members"
        if len(rows) < 2 + test:
            raise InputError(
                f"training needs at least {2 + test} labelled {name} (one per train/validation"
                f"{'/test' if test else ''} split); the store has {len(rows)}"
            )
        rows = rows[np.argsort([ids[i] for i in rows], kind="stable")]
        rows = rows[np.random.default_rng(derive_seed("split", seed, cls)).permutation(len(rows))]
        n = len(rows)
        n_train = min(max(1, int(round(train_fraction * n))), n - 1 - test)
        n_val = n - n_train if not test else min(max(1, int(round(val_fraction * n))), n - n_train - 1)
        out["train"] += rows[:n_train].tolist()
        out["validation"] += rows[n_train : n_train + n_val].tolist()
        out["test"] += rows[n_train + n_val :].tolist()
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def early_stop_split(train: np.ndarray, labels: np.ndarray, ids: list[str], seed: int,
                     fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, early-stopping rows) of the training split, stratified; like the split itself it depends on the
    ids, labels and seed only. A class with a single training row keeps it for fitting."""
    fit, stop = [], []
    for cls in (1, 0):
        rows = np.asarray([i for i in train if labels[i] == cls], dtype=np.int64)
        rows = rows[np.argsort([ids[i] for i in rows], kind="stable")]
        rows = rows[np.random.default_rng(derive_seed("early-stop", seed, cls)).permutation(len(rows))]
        n_stop = min(max(1, int(round(fraction * len(rows)))), len(rows) - 1) if len(rows) > 1 else 0
        stop += rows[:n_stop].tolist()
        fit += rows[n_stop:].tolist()
    return np.array(sorted(fit), dtype=np.int64), np.array(sorted(stop), dtype=np.int64)


def _fit_network(kind: str, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray,
                 cfg: TrainConfig, seed: int) -> tuple[ScoringHead, dict]:
    """AdamW on cross-entropy, early stopping on the loss of (x_va, y_va) — the early-stopping rows held out of the
    training split, never the validation split; returns the head of the best early-stopping loss."""
    torch.manual_seed(seed)
    mean, std = standardisation(kind, x_tr, y_tr)
    net = build_net(kind, x_tr.shape[1:], cfg.mlp_hidden, cfg.cnn_channels, cfg.cnn_hidden, cfg.dropout)
    head = ScoringHead(net, mean, std)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr.astype(np.float32))
    xv, yv = torch.from_numpy(x_va), torch.from_numpy(y_va.astype(np.float32))
    # Weight classes equally so an unbalanced auxiliary set does not push every score towards the majority.
    pos_weight = torch.tensor(float((y_tr == 0).sum()) / max(1.0, float((y_tr == 1).sum())))
    if not any(p.requires_grad for p in head.parameters()):
        # An untrained score (kind "score"): nothing to fit; calibration and thresholds still come from validation.
        head.eval()
        with torch.no_grad():
            stop_loss = float(F.binary_cross_entropy_with_logits(head.score(xv), yv, pos_weight=pos_weight))
        return head, {"epochs_run": 0, "best_epoch": 0, "best_early_stop_loss": stop_loss, "train_loss_at_best": None}
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(seed)
    best_loss, best_state, best_epoch, since = float("inf"), copy.deepcopy(head.state_dict()), 0, 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = rng.permutation(len(xt))
        # BatchNorm needs 2+ rows per batch: fold a trailing single row into the previous batch.
        starts = list(range(0, len(order), cfg.batch_size))
        if len(starts) > 1 and len(order) - starts[-1] < 2:
            starts.pop()
        tr_loss = 0.0
        for k, s in enumerate(starts):
            e = starts[k + 1] if k + 1 < len(starts) else len(order)
            idx = torch.from_numpy(order[s:e])
            loss = F.binary_cross_entropy_with_logits(head.score(xt[idx]), yt[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tr_loss += loss.item() * len(idx)
        head.eval()
        with torch.no_grad():
            va_loss = float(F.binary_cross_entropy_with_logits(head.score(xv), yv, pos_weight=pos_weight))
        history.append((tr_loss / len(xt), va_loss))
        if va_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, since = va_loss, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head, {"epochs_run": len(history), "best_epoch": best_epoch, "best_early_stop_loss": best_loss,
                  "train_loss_at_best": history[best_epoch - 1][0] if best_epoch else None}


def fit_attack(attack: str, x: np.ndarray, y: np.ndarray, split: Mapping[str, np.ndarray], cfg: TrainConfig,
               out_dir: Path) -> dict:
    """Train, calibrate, export and validate one head; returns its heads.json entry.

    ``split`` holds ``train`` (``fit`` + ``early_stop``), ``validation`` and ``test`` row indices."""
    spec = get_attack(attack)
    tr, va = split["train"], split["validation"]
    fit, stop = split["fit"], split["early_stop"]
    if not len(stop):  # a training split of one row per class: stop on the training loss itself
        stop = fit
    t0 = time.perf_counter()
    head, training = _fit_network(spec.kind, x[fit], y[fit], x[stop], y[stop], cfg,
                                  derive_seed("head", cfg.seed, attack))
    with torch.no_grad():
        val_scores = head.score(torch.from_numpy(x[va])).numpy()
    a, b = calibration.fit_platt(val_scores, y[va])
    head.platt.copy_(torch.tensor([a, b], dtype=torch.float32))
    file = f"{attack}.onnx"
    parity = export_head(head, x[tr], out_dir / file, check=x[va], threads=cfg.threads or None)
    # Thresholds from the exported graph's own probabilities: exactly what Heads.predict will compare.
    _, val_probs = run_session(ort_session(out_dir / file, cfg.threads or None), x[va])
    entry = head_entry(attack, x.shape, out_dir / file, val_probs, y[va],
                       {"method": "platt", "a": a, "b": b, "fitted_on": "validation"},
                       "train non-members" if spec.kind == "calibrated" else "train",
                       {**training, "n": int(len(fit)), "n_early_stop": int(len(split["early_stop"])),
                        "seconds": round(time.perf_counter() - t0, 2)}, parity)
    log.info("%s: validation AUC %.3f, threshold %.3f, %d epochs (%.1f s)", attack, entry["validation"]["auc"],
             entry["threshold"], training["epochs_run"], entry["training"]["seconds"])
    return entry


def head_entry(attack: str, x_shape: tuple, onnx_file: Path, probs: np.ndarray, labels: np.ndarray,
               calibration_record: dict, standardisation_fitted_on: str, training: dict, parity: dict,
               on: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """One attack's heads.json entry, split or cross-fitted alike: its graph, and the thresholds and metrics of the
    calibration rows' probabilities ``probs`` (the validation split, or every out-of-fold row with ``on``).
    ``extra`` (the cross-fitting record) goes before ``onnx_parity``."""
    spec = get_attack(attack)
    threshold, ba = calibration.balanced_accuracy_threshold(probs, labels)
    return {
        "file": onnx_file.name,
        "sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
        "kind": spec.kind,
        "tier": spec.tier,
        "description": spec.description,
        "input": {"name": "x", "dtype": "float32", "shape": [None, *map(int, x_shape[1:])]},
        "outputs": ["score", "probability"],
        "threshold": threshold,
        "thresholds": {"balanced_accuracy": threshold, "fpr_1pct": calibration.fpr_threshold(probs, labels, 0.01),
                       "fpr_0_1pct": calibration.fpr_threshold(probs, labels, 0.001)},
        # Kept so that check/scan/evaluate fit the conformal thresholds of any --max-fpr without retraining.
        VALIDATION_KEY: validation_record(probs, labels),
        "calibration": calibration_record,
        "standardisation": {"fitted_on": standardisation_fitted_on},
        "validation": {"n": int(len(labels)), **({"on": on} if on else {}), "auc": metrics.auc(labels, probs),
                       "accuracy": metrics.accuracy(labels, probs, threshold), "balanced_accuracy": ba},
        "training": training,
        **(extra or {}),
        "onnx_parity": parity,
    }


def blind_baseline(probs_test: np.ndarray, y_test: np.ndarray, val_auc: float, n_boot: int, seed: int) -> dict:
    """Does the query side alone separate members from non-members? Then the aux sets differ in distribution."""
    value = metrics.auc(y_test, probs_test)
    ci = metrics.bootstrap_ci(y_test, probs_test, metrics.fast_auc, n_boot, seed)
    # Only separation in the head's own direction counts: a head that was fitted to tell members apart and
    # ranks them the other way on held-out rows has learned noise, not a difference between the two sets.
    warn = bool((np.isfinite(ci[0]) and ci[0] > 0.5) or (np.isfinite(value) and value > BLIND_AUC_LIMIT))
    out = {
        "validation_auc": val_auc,
        "test_auc": {"value": value, "ci95": ci},
        "n_test": int(len(y_test)),
        "distribution_shift_warning": warn,
    }
    if warn:
        out["message"] = (
            f"the blind baseline (query-side features only, no generated image) separates the auxiliary members "
            f"from the non-members (test AUC {value:.3f}, 95% CI {ci[0]:.3f}-{ci[1]:.3f}): the two sets differ in "
            "distribution, so verdicts from these heads are not evidence of training"
        )
    return out


def labelled_rows(batch: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """The rows with a member label (1/0), their ids and labels; rows marked -1 (unknown) are left out."""
    if "member" not in batch or "ids" not in batch:
        raise InputError(f"feature batch lacks 'member'/'ids' (has {sorted(batch)})")
    labels_all = np.asarray(batch["member"]).astype(np.int64)
    keep = np.flatnonzero((labels_all == 0) | (labels_all == 1))
    if len(keep) < len(labels_all):
        log.warning("%d rows without a member label are left out of training", len(labels_all) - len(keep))
    rows = {k: np.asarray(v)[keep] for k, v in batch.items() if np.ndim(v) >= 1 and len(v) == len(labels_all)}
    ids = _str_ids(rows["ids"])
    if len(set(ids)) != len(ids):
        raise InputError("feature batch has duplicate ids; each query must appear once")
    return rows, ids, labels_all[keep]


def _checked_inputs(rows: Mapping[str, np.ndarray], attack: str) -> np.ndarray:
    x = build_inputs(rows, attack)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise InputError(f"attack {attack}: {int(bad.sum())} row(s) have non-finite features (first id "
                         f"{_str_ids(rows['ids'][bad][:1])[0]!r}); the feature store is damaged, recompute it")
    return x


def _fit_all(rows: Mapping[str, np.ndarray], y: np.ndarray, split: Mapping[str, Any], cfg: TrainConfig,
             out_dir: Path, quiet: bool = False) -> tuple[dict, dict | None]:
    """Every attack's heads.json entry, and the blind baseline's report (on the test split; with cross-fitting
    and no test split, on the out-of-fold scores, which no member that made them saw either)."""
    from ..progress import progress
    from .crossfit import fit_crossfit_attack

    attacks: dict[str, Any] = {}
    blind = None
    for attack in progress(cfg.attacks, desc="train", unit="head", quiet=quiet):
        x = _checked_inputs(rows, attack)
        if cfg.folds:
            attacks[attack], oof = fit_crossfit_attack(attack, x, y, split["plan"], split["pool"], cfg, out_dir)
        else:
            attacks[attack] = fit_attack(attack, x, y, split, cfg, out_dir)
        if attack == "blind":
            te = split["test"]
            if len(te):
                _, p_te = run_session(ort_session(out_dir / attacks[attack]["file"], cfg.threads or None), x[te])
                y_te = y[te]
            else:
                p_te, y_te = oof, y[split["pool"]]
            blind = blind_baseline(p_te, y_te, attacks[attack]["validation"]["auc"], cfg.n_boot,
                                   derive_seed("blind", cfg.seed))
            if not len(te):
                blind["on"] = "out-of-fold"
    return attacks, blind


def train_heads(batch: Mapping[str, np.ndarray], out_dir: str | Path, cfg: TrainConfig,
                store_manifest: dict | None = None, store_sha256: str | None = None,
                store_path: str | None = None, quiet: bool = False) -> dict:
    """Train every attack in ``cfg.attacks`` on a feature-store batch; write ONNX heads and heads.json.
    A progress bar counts the heads (off with ``quiet`` or when stderr is not a terminal)."""
    cfg.validate()
    if "blind" not in cfg.attacks:
        # Every set of heads carries its distribution-shift check; there is no opting out of it.
        cfg = dataclasses.replace(cfg, attacks=tuple(cfg.attacks) + ("blind",))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder")
    leftovers = list(out_dir.iterdir()) if out_dir.is_dir() else []
    if not (out_dir / HEADS_FILE).is_file() and not all(map(_written_by_train, leftovers)):
        # Leftovers of a killed `audit train` (ONNX files, no heads.json yet) may be overwritten; anything else may
        # be the user's.
        raise UsageError(f"{out_dir}: folder is not empty and holds no heads; choose an empty or new folder")
    rows, ids, y = labelled_rows(batch)
    split: dict[str, Any] = stratified_split(ids, y, cfg.seed, cfg.train_fraction, cfg.val_fraction)
    if cfg.folds:
        from .crossfit import fold_plan

        split["pool"] = np.sort(np.concatenate([split["train"], split["validation"]]))
        split["plan"] = fold_plan(split["pool"], y, ids, int(cfg.folds), cfg.seed, cfg.early_stop_fraction)
    else:
        split["fit"], split["early_stop"] = early_stop_split(split["train"], y, ids, cfg.seed,
                                                             cfg.early_stop_fraction)

    out_dir.mkdir(parents=True, exist_ok=True)
    # A half-retrained folder must not look valid: heads.json goes first and comes back last.
    (out_dir / HEADS_FILE).unlink(missing_ok=True)
    for stale in out_dir.glob("*.onnx"):
        stale.unlink()

    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        attacks, blind = _fit_all(rows, y, split, cfg, out_dir, quiet)
    finally:
        torch.set_num_threads(previous_threads)

    scored = [a for a in attacks if a != "blind"]
    if "IV" in attacks:
        default = "IV"
    else:
        default = max(scored or list(attacks), key=lambda a: np.nan_to_num(attacks[a]["validation"]["auc"]))
    store_manifest = store_manifest or {}
    manifest = make_manifest(
        "heads", cfg.to_dict(), store_manifest.get("target"),
        embedder=store_manifest.get("embedder"), captioner=store_manifest.get("captioner"),
        feature_store={"path": store_path, "sha256": store_sha256, "created": store_manifest.get("created"),
                       "config": store_manifest.get("config"), "reference": store_manifest.get("reference")},
    )
    info = {
        "manifest": manifest,
        "input_signature": input_signature(rows),
        "split": _split_record(split, y, ids, cfg),
        "default_attack": default,
        "attacks": attacks,
        "blind_baseline": blind,
    }
    cfg.save(out_dir / CONFIG_FILE)
    atomic_write_text(out_dir / HEADS_FILE, json.dumps(_jsonable(info), indent=2) + "\n")
    return info


def _split_record(split: Mapping[str, Any], y: np.ndarray, ids: list[str], cfg: TrainConfig) -> dict:
    """heads.json's ``split``: which rows each part of the procedure used, by id."""
    test_fraction = round(1 - cfg.train_fraction - cfg.val_fraction, 10)
    if cfg.folds:
        from .crossfit import split_record

        return split_record(split["plan"], split["pool"], split["test"], y, ids, cfg.seed, max(0.0, test_fraction))
    return {
        "mode": "split",
        "seed": cfg.seed,
        "fractions": {"train": cfg.train_fraction, "validation": cfg.val_fraction, "test": test_fraction},
        **{s: [ids[i] for i in split[s]] for s in SPLITS},
        "early_stop": [ids[i] for i in split["early_stop"]],  # held out of `train` for early stopping
        "ids_sha256": {s: ids_digest([ids[i] for i in split[s]]) for s in SPLITS},
        "counts": {s: {"members": int((y[split[s]] == 1).sum()), "nonmembers": int((y[split[s]] == 0).sum())}
                   for s in SPLITS},
    }


def _written_by_train(path: Path) -> bool:
    return path.is_file() and (path.name in (HEADS_FILE, CONFIG_FILE) or path.name.endswith((".onnx", ".onnx.data")))


def _jsonable(obj: Any) -> Any:
    """NaN is not JSON: metrics that cannot be computed (one class only) are written as null."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def read_heads_json(path: Path) -> dict:
    return read_json(path, missing=f"not a heads folder (no {HEADS_FILE}); train heads with `audit train`")
