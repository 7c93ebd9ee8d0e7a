"""Trained heads as users meet them: load a heads folder, score feature batches through onnxruntime, and the
per-user registry that lets ``check``/``scan`` find the heads of a target without ``--heads``.

Registry layout: ``$AUDIT_HOME`` (default ``~/.cache/audit``) ``/heads/<target name>-<target hash>/`` holds a copy
of the heads folder and ``registered.json`` (when, and from which folder). Nothing is registered unless asked
(``audit train --register``, ``audit heads use``). The bundled toy target's heads live in ``audit/toy/bundle/heads``
and are found by hash. ``Heads.source`` says which of the three a loaded folder is; ``provenance`` and
``provenance_line`` say it in full, as check/scan report it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import audit_home
from ..errors import ArtifactError, InputError
from ..manifest import check_manifest
from ..tiers import TIERS
from .decision import DEFAULT_MAX_FPR, DEFAULT_RULE, VALIDATION_KEY, Decision, fit_decision
from .export import ort_session, run_session
from .inputs import ATTACKS, build_inputs, input_signature, tier_of, tiers_of
from .train import HEADS_FILE, read_heads_json

log = logging.getLogger(__name__)


class Heads:
    """A loaded heads folder. ``predict`` runs every (or the chosen) attack's ONNX head on a feature batch."""

    def __init__(self, path: Path, info: dict, threads: int | None = 1, source: str = "given"):
        self.path = path
        self.info = info
        self.threads = threads
        self.source = source  # given (--heads), registered, or bundled
        self._sessions: dict = {}

    @property
    def attacks(self) -> list[str]:
        return list(self.info["attacks"])

    @property
    def default_attack(self) -> str:
        return self.info["default_attack"]

    @property
    def target(self) -> dict | None:
        return self.info["manifest"].get("target")

    @property
    def warnings(self) -> list[str]:
        blind = self.info.get("blind_baseline") or {}
        return [blind["message"]] if blind.get("distribution_shift_warning") and blind.get("message") else []

    def threshold(self, attack: str) -> float:
        return float(self.info["attacks"][attack]["threshold"])

    def tier(self, attack: str) -> str:
        """The attack's access tier (heads.json records it; heads trained before tiers existed are black-box)."""
        return self.info["attacks"][attack].get("tier") or tier_of(attack)

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers whose features these heads read (the blind baseline reads only the query side)."""
        return tiers_of(self.attacks)

    def decision(self, attack: str, rule: str = DEFAULT_RULE, max_fpr: float = DEFAULT_MAX_FPR,
                 max_miss: float | None = None) -> Decision:
        """The verdict rule of ``attack`` at this budget, fitted on the heads' validation probabilities."""
        if attack not in self.info["attacks"]:
            raise InputError(f"attack {attack!r} is not in {self.path}; it has: {', '.join(self.attacks)}")
        return fit_decision(self.info["attacks"][attack], attack, rule, max_fpr, max_miss, str(self.path))

    def decisions(self, rule: str = DEFAULT_RULE, max_fpr: float = DEFAULT_MAX_FPR,
                  max_miss: float | None = None) -> dict[str, Decision]:
        return {a: self.decision(a, rule, max_fpr, max_miss) for a in self.attacks}

    def check_compatible(self, target: dict | None = None, embedder: dict | None = None,
                         captioner: dict | None = None) -> None:
        """Refuse models other than those the heads were trained with, naming both."""
        check_manifest(self.info["manifest"], "heads", str(self.path), target)
        for role, given in (("embedder", embedder), ("captioner", captioner)):
            made = self.info["manifest"].get(role)
            if given is not None and made and made.get("hash") != given.get("hash"):
                raise ArtifactError(
                    f"{self.path}: heads were trained on features of {role} {made.get('name')!r} (weights "
                    f"{made.get('hash')}), not {given.get('name')!r} (weights {given.get('hash')})"
                )

    def _session(self, attack: str):
        if attack not in self._sessions:
            f = head_file(self.path, self.info["attacks"][attack]["file"], attack)
            self._sessions[attack] = ort_session(f, self.threads)
        return self._sessions[attack]

    def _check_signature(self, batch: Mapping[str, np.ndarray]) -> None:
        want = self.info.get("input_signature", {})
        got = input_signature(batch)
        bad = [f"{k} {got[k]} (heads expect {want[k]})" for k in want if k in got and got[k] != want[k]]
        if bad:
            raise InputError(f"features do not fit the heads in {self.path}: {', '.join(bad)}")

    def predict(self, batch: Mapping[str, np.ndarray], attacks: list[str] | None = None) -> dict[str, dict]:
        """``{attack: {"score": [N], "probability": [N], "threshold": t}}`` for each attack (default: all)."""
        self._check_signature(batch)
        out = {}
        for attack in attacks or self.attacks:
            if attack not in self.info["attacks"]:
                raise InputError(f"attack {attack!r} is not in {self.path}; it has: {', '.join(self.attacks)}")
            x = build_inputs(batch, attack)
            want = self.info["attacks"][attack]["input"]["shape"][1:]
            if list(x.shape[1:]) != want:
                raise InputError(f"attack {attack}: input shape {list(x.shape[1:])} != {want} the head was "
                                 f"trained on ({self.path})")
            score, prob = run_session(self._session(attack), x)
            out[attack] = {"score": score, "probability": prob, "threshold": self.threshold(attack),
                           "tier": self.tier(attack)}
        return out

    def __repr__(self) -> str:
        return f"Heads({str(self.path)!r}, attacks={self.attacks}, default={self.default_attack!r})"


def load_heads(path: str | os.PathLike, target: dict | None = None, threads: int | None = 1,
               source: str = "given") -> Heads:
    """Open a heads folder (or its heads.json), checking manifest, target and the ONNX files' integrity.

    ``threads``: onnxruntime threads per head (the heads are tiny; 1 is fastest; None for the library default).
    """
    path = Path(path)
    folder = path.parent if path.name == HEADS_FILE else path
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such heads folder; train heads with `audit train STORE.h5 --out {folder}`")
    info = read_heads_info(folder)
    check_manifest(info["manifest"], "heads", str(folder), target)
    old = [a for a, e in info["attacks"].items() if VALIDATION_KEY not in e]
    if old:
        raise ArtifactError(f"{folder}: heads made by an older audit (no validation probabilities for attack "
                            f"{old[0]}, so no three-way verdicts); retrain them: `audit train STORE.h5 --out {folder}`")
    check_heads_schema(info, folder)
    for attack, entry in info["attacks"].items():
        f = head_file(folder, entry["file"], attack)
        if entry.get("sha256") and _sha256(f) != entry["sha256"]:
            raise ArtifactError(f"{f}: head of attack {attack} was modified after training (sha256 mismatch)")
    return Heads(folder, info, threads, source)


# ---------------------------------------------------------------- heads.json schema
# heads.json comes from whoever trained the heads; nothing in it is used before these checks (types, bounds, and
# head files that are plain regular files inside the folder).

MAX_HEADS_JSON_BYTES = 256 * 2**20  # the split's id lists and the validation probabilities dominate
MAX_HEAD_BYTES = 256 * 2**20  # a head is a small MLP or CNN (KiB to a few MiB)
MAX_ATTACKS = 64
MAX_PROBABILITIES = 10_000_000
MAX_INPUT_SIZE = 1 << 24


def read_heads_info(folder: Path) -> dict:
    """heads.json of ``folder``, size-checked before it is read, as a dict with a manifest and attacks."""
    file = folder / HEADS_FILE
    try:
        size = file.stat().st_size
    except OSError:
        size = 0  # read_heads_json names what is missing
    if file.is_file() and size > MAX_HEADS_JSON_BYTES:
        raise ArtifactError(f"{file}: {size} bytes, over the {MAX_HEADS_JSON_BYTES} a heads file may hold")
    if file.exists() and not file.is_file():
        raise ArtifactError(f"{file}: not a regular file")
    try:
        info = read_heads_json(file)
    except RecursionError:
        raise ArtifactError(f"{file}: not a heads file (JSON nested too deeply)") from None
    if not isinstance(info, dict) or not isinstance(info.get("manifest"), dict) \
            or not isinstance(info.get("attacks"), dict):
        raise ArtifactError(f"{file}: not a heads file (no manifest/attacks)")
    return info


def _bad(folder: Path, where: str, value: object, want: str) -> ArtifactError:
    text = repr(value)
    return ArtifactError(f"{folder / HEADS_FILE}: {where} is {text[:60] + ('...' if len(text) > 60 else '')}, "
                         f"expected {want}")


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_probability(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0.0 <= value <= 1.0


def check_heads_schema(info: dict, folder: Path) -> None:
    """Refuse, in one line naming the field, a heads.json whose fields have the wrong type or are out of bounds."""
    for role in ("target", "embedder", "captioner"):
        ident = info["manifest"].get(role)
        if ident is not None and (not isinstance(ident, dict)
                                  or not all(isinstance(ident.get(k), (str, type(None))) for k in ("name", "hash"))):
            raise _bad(folder, f"manifest.{role}", ident, "an object with text name and hash")
    attacks = info["attacks"]
    if not 1 <= len(attacks) <= MAX_ATTACKS:
        raise _bad(folder, "attacks", f"{len(attacks)} entries", f"1 to {MAX_ATTACKS} attacks")
    for name, entry in attacks.items():
        if name not in ATTACKS:
            raise _bad(folder, "an attack name", name, f"one of {', '.join(ATTACKS)}")
        _check_attack(folder, name, entry)
    if not isinstance(info.get("default_attack"), str) or info["default_attack"] not in attacks:
        raise _bad(folder, "default_attack", info.get("default_attack"), f"one of its attacks ({', '.join(attacks)})")
    signature = info.get("input_signature", {})
    if not isinstance(signature, dict) or not all(isinstance(k, str) and _is_int(v, 0, MAX_INPUT_SIZE)
                                                  for k, v in signature.items()):
        raise _bad(folder, "input_signature", signature, f"an object of integers in [0, {MAX_INPUT_SIZE}]")
    blind = info.get("blind_baseline")
    if blind is not None and (not isinstance(blind, dict) or not isinstance(blind.get("message", ""), str)):
        raise _bad(folder, "blind_baseline", blind, "an object with a text message")
    split = info.get("split")
    if split is not None:
        if not isinstance(split, dict) or not isinstance(split.get("test", []), list) \
                or not isinstance(split.get("ids_sha256", {}), dict) or not isinstance(split.get("counts", {}), dict):
            raise _bad(folder, "split", split, "an object with a test list, ids_sha256 and counts objects")


def _check_attack(folder: Path, name: str, entry: object) -> None:
    where = f"attacks.{name}"
    if not isinstance(entry, dict):
        raise _bad(folder, where, entry, "an object")
    if not isinstance(entry.get("file"), str):
        raise _bad(folder, f"{where}.file", entry.get("file"), "a file name")
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise _bad(folder, f"{where}.sha256", sha, "64 hex digits")
    if not _is_probability(entry.get("threshold")):
        raise _bad(folder, f"{where}.threshold", entry.get("threshold"), "a probability in [0, 1]")
    if entry.get("tier") is not None and entry["tier"] not in TIERS:
        raise _bad(folder, f"{where}.tier", entry["tier"], f"one of {', '.join(TIERS)}")
    shape = (entry.get("input") or {}).get("shape") if isinstance(entry.get("input"), dict) else None
    if not isinstance(shape, list) or not 1 <= len(shape) <= 8 \
            or not all(_is_int(d, 1, MAX_INPUT_SIZE) for d in shape[1:]):
        raise _bad(folder, f"{where}.input.shape", shape, f"a list of up to 8 sizes in [1, {MAX_INPUT_SIZE}]")
    val = entry.get(VALIDATION_KEY)
    for side in ("members", "nonmembers"):
        probs = val.get(side) if isinstance(val, dict) else None
        if not isinstance(probs, list) or len(probs) > MAX_PROBABILITIES or not all(map(_is_probability, probs)):
            raise _bad(folder, f"{where}.{VALIDATION_KEY}.{side}", probs, "a list of probabilities in [0, 1]")
    thresholds = entry.get("thresholds")
    if thresholds is not None and (not isinstance(thresholds, dict)
                                   or not all(isinstance(v, (dict, int, float)) for v in thresholds.values())):
        raise _bad(folder, f"{where}.thresholds", thresholds, "an object")


def head_file(folder: Path, name: str, attack: str) -> Path:
    """The head file ``name`` of ``folder``: a plain file name (no path, no ``..``), a regular file that is not a
    symlink, within the size limit. Anything else is refused before it is opened."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or len(name) > 255
           or os.path.isabs(name))
    if bad:
        raise ArtifactError(f"{folder / HEADS_FILE}: attacks.{attack}.file {name[:60]!r} is not a plain file name "
                            "inside the heads folder")
    f = folder / name
    if f.is_symlink():
        raise ArtifactError(f"{f}: head of attack {attack} is a symlink; heads must be regular files in the folder")
    if not f.exists():
        raise ArtifactError(f"{f}: head of attack {attack} is missing")
    if not f.is_file():
        raise ArtifactError(f"{f}: head of attack {attack} is not a regular file")
    if f.stat().st_size > MAX_HEAD_BYTES:
        raise ArtifactError(f"{f}: head of attack {attack} is over {MAX_HEAD_BYTES} bytes")
    return f


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- registry

def _key(target: dict) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(target.get("name") or "target")).strip("._") or "target"
    return f"{name}-{target.get('hash')}"


def bundled_heads_path() -> Path:
    from ..toy import BUNDLE

    return BUNDLE / "heads"


REGISTERED_FILE = "registered.json"


def registry_root() -> Path:
    return audit_home() / "heads"


def register_heads(heads_dir: str | os.PathLike) -> Path:
    """Copy a heads folder into the user's registry under its target's key; returns the registered folder."""
    heads = load_heads(heads_dir)
    target = heads.target
    if not target or not target.get("hash"):
        raise ArtifactError(f"{heads.path}: heads record no target identity; they cannot be registered")
    dest = audit_home() / "heads" / _key(target)
    if dest.resolve() == heads.path.resolve():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy beside, then swap: a reader never sees a half-copied folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for f in [HEADS_FILE, *{e["file"] for e in heads.info["attacks"].values()}, "train_config.json"]:
            if (heads.path / f).is_file():
                shutil.copy2(heads.path / f, tmp / f)
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        (tmp / REGISTERED_FILE).write_text(json.dumps({"registered": when, "from": str(heads.path.resolve())},
                                                      indent=2) + "\n")
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("registered heads for target %s at %s", target.get("name"), dest)
    return dest


def _hash_of(folder: Path) -> str | None:
    try:
        return (read_heads_info(folder)["manifest"].get("target") or {}).get("hash")
    except (ArtifactError, KeyError, TypeError, AttributeError):
        return None


def find_heads(target: dict) -> Path | None:
    """The registered heads for a target identity: exact key, then any registered name with the same weights
    hash, then the bundled toy heads if they were made for these weights."""
    h = target.get("hash")
    root = audit_home() / "heads"
    exact = root / _key(target)
    if (exact / HEADS_FILE).is_file() and _hash_of(exact) == h:
        return exact
    if root.is_dir():
        for folder in sorted(root.glob(f"*-{h}")):
            if (folder / HEADS_FILE).is_file() and _hash_of(folder) == h:
                return folder
    bundled = bundled_heads_path()
    if (bundled / HEADS_FILE).is_file() and _hash_of(bundled) == h:
        return bundled
    return None


def no_heads_message(target: dict) -> str:
    return (
        f"no heads registered for target {target.get('name')!r} (weights {target.get('hash')}) in "
        f"{audit_home() / 'heads'}; train them: `audit features --target ... --data AUX_DIR --out store.h5` then "
        "`audit train store.h5 --out HEADS --register` (or `audit heads use HEADS`), or pass --heads HEADS"
    )


def _source_of(folder: Path) -> str:
    folder = folder.resolve()
    if folder == bundled_heads_path().resolve():
        return "bundled"
    return "registered" if folder.parent == registry_root().resolve() else "given"


def resolve_heads(heads: str | os.PathLike | None, target: dict, threads: int | None = 1) -> Heads:
    """``--heads`` if given (checked against the target), else the registered heads of ``target``."""
    if heads is not None:
        return load_heads(heads, target=target, threads=threads)
    found = find_heads(target)
    if found is None:
        raise ArtifactError(no_heads_message(target))
    return load_heads(found, target=target, threads=threads, source=_source_of(found))


# ---------------------------------------------------------------- provenance and the `audit heads` commands

def _calibration_rows(info: dict) -> dict:
    from .crossfit import crossfit_summary

    cross = crossfit_summary(info)
    if cross:
        return {"calibrated_on": "out-of-fold", "folds": cross["folds"], "n_calibration": cross["n_out_of_fold"]}
    counts = ((info.get("split") or {}).get("counts") or {}).get("validation") or {}
    return {"calibrated_on": "validation", "folds": None,
            "n_calibration": int(counts.get("members", 0)) + int(counts.get("nonmembers", 0))}


def folder_provenance(folder: Path, info: dict, source: str) -> dict:
    """Where a heads folder came from: ``source`` (given / registered / bundled), ``path``, when and from which
    folder it was registered, the feature store it was trained on, and the rows its thresholds were fitted on."""
    reg = {}
    if (folder / REGISTERED_FILE).is_file():
        try:
            reg = json.loads((folder / REGISTERED_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reg = {}
    store = (info.get("manifest") or {}).get("feature_store") or {}
    return {"source": source, "path": str(Path(folder).resolve()), "registered": reg.get("registered"),
            "registered_from": reg.get("from"), "store": store.get("path"),
            "store_sha256": (store.get("sha256") or "")[:16] or None,
            "target": (info.get("manifest") or {}).get("target"),
            **_calibration_rows(info)}


def provenance(heads: Heads) -> dict:
    return folder_provenance(Path(heads.path), heads.info, heads.source)


def provenance_line(p: dict) -> str:
    """One line: which heads, and where they came from."""
    where = {"given": "given with --heads", "bundled": "bundled with the toy target",
             "registered": f"registered {p.get('registered') or '(time unrecorded)'} from "
                           f"{p.get('registered_from') or '(folder unrecorded)'}"}[p["source"]]
    rows = (f"{p['folds']} cross-fitted folds, {p['n_calibration']} out-of-fold rows" if p.get("folds")
            else f"{p['n_calibration']} validation rows")
    return f"heads: {p['path']} ({where}; trained on {p.get('store') or 'an unrecorded store'}; {rows})"


def list_registered() -> list[dict]:
    """Every registered heads folder (``key``, provenance), and the bundled toy heads, the fallback of their target."""
    out = []
    root = registry_root()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / HEADS_FILE).is_file():
            continue
        try:
            info = read_heads_json(folder / HEADS_FILE)
        except ArtifactError:
            continue
        out.append({"key": folder.name, **folder_provenance(folder, info, "registered")})
    bundled = bundled_heads_path()
    if (bundled / HEADS_FILE).is_file():
        entry = {"key": "(bundled)", **folder_provenance(bundled, read_heads_json(bundled / HEADS_FILE), "bundled")}
        h = (entry.get("target") or {}).get("hash")
        # Registered heads of the same weights outrank the bundle (find_heads' order).
        entry["overridden_by"] = next((e["key"] for e in out if (e.get("target") or {}).get("hash") == h), None)
        out.append(entry)
    return out


def remove_registered(name: str) -> list[Path]:
    """Unregister heads by registry key (``NAME-HASH``, as ``audit heads list`` shows) or by target name (every
    key of that name). The bundled heads cannot be removed; they are the toy target's fallback."""
    entries = [e for e in list_registered() if e["source"] == "registered"]
    chosen = [e for e in entries if e["key"] == name] or [
        e for e in entries if (e.get("target") or {}).get("name") == name]
    if not chosen:
        keys = ", ".join(e["key"] for e in entries) or "none"
        raise ArtifactError(f"no registered heads named {name!r}; registered: {keys}")
    removed = []
    for e in chosen:
        shutil.rmtree(e["path"])
        removed.append(Path(e["path"]))
    return removed
