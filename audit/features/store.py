"""The HDF5 feature store: one row per query, appendable, resumable after a kill.

Layout (one row per input row, in the ImageFolder's sorted order; failed rows keep their row, zeros in the arrays):

    ids, status, error, caption, caption_source     utf-8 str [N]
    member                                          int8 [N]      1 member, 0 non-member, -1 unknown
    query_pixels                                    uint8 [N, P, P, 3]
    query_img_emb, caption_emb                      float32 [N, D]
  black-box tier:
    gen_captions                                    utf-8 str [N, G]
    gen_pixels                                      uint8 [N, G, P, P, 3]
    gen_img_emb, gen_caption_emb                    float32 [N, G, D]
  gray-box tier (``features.graybox``):
    graybox_loss, graybox_pia, graybox_secmi        float32 [N, K]  each attack's error at the K timesteps
    graybox_clid                                    float32 [N, K', 3]  CLiD's conditional, unconditional and
                                                                       masked-caption losses at its K' timesteps
  with a reference model (``--reference``): ``ref_`` + each tier dataset above but the query side (the reference's
  generated images, captions, embeddings; its gray-box errors), computed with the same seeds and noise

Root attributes: ``manifest`` (JSON, see ``audit.manifest``; ``tiers`` names the tiers it holds, a store without it
is black-box; ``reference`` the reference model's identity, absent without one) and ``n_committed``. A batch is
committed by writing its arrays, then raising ``n_committed`` last; the file is open only while a batch is written.
A run killed mid-write leaves rows past ``n_committed`` that no reader sees and that ``--resume`` truncates and
redoes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import ArtifactError, UsageError
from ..manifest import check_manifest
from ..tiers import BLACK_BOX, GRAY_BOX, TIERS

log = logging.getLogger(__name__)

KIND = "features"
STR_KEYS = ("ids", "status", "error", "caption", "caption_source")
COMMON_KEYS = ("member", "query_pixels", "query_img_emb", "caption_emb")
TIER_KEYS = {BLACK_BOX: ("gen_captions", "gen_pixels", "gen_img_emb", "gen_caption_emb"),
             GRAY_BOX: ("graybox_loss", "graybox_pia", "graybox_secmi", "graybox_clid")}
# The reference model's copy of a tier dataset (the query side is the same for both models and is stored once).
REF_PREFIX = "ref_"
# CLiD's three losses per timestep: conditional, unconditional, masked caption.
CLID_TERMS = 3
ARRAY_KEYS = COMMON_KEYS + TIER_KEYS[BLACK_BOX]
KEYS = STR_KEYS + ARRAY_KEYS  # a black-box store's datasets
# Rows per HDF5 chunk along axis 0: small enough that a resumed run rewrites little, large enough to compress.
CHUNK_ROWS = 32


def tier_keys(tiers: tuple[str, ...], reference: bool = False) -> tuple[str, ...]:
    """The tier datasets of ``tiers`` (with ``reference``, followed by the reference's copies)."""
    keys = tuple(k for t in TIERS if t in tiers for k in TIER_KEYS[t])
    return keys + (tuple(REF_PREFIX + k for k in keys) if reference else ())


def store_keys(tiers: tuple[str, ...] = (BLACK_BOX,), reference: bool = False) -> tuple[str, ...]:
    """The datasets of a store holding ``tiers`` (and a reference model's features)."""
    return STR_KEYS + COMMON_KEYS + tier_keys(tiers, reference)


def has_reference(manifest: dict) -> bool:
    return bool(manifest.get("reference"))


def row_shapes(n_gen: int, pixel_size: int, dim: int, tiers: tuple[str, ...] = (BLACK_BOX,),
               n_timesteps: int = 0, reference: bool = False,
               n_clid: int = 0) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-row shape and dtype of every dataset of a store holding ``tiers``."""
    s = h5py.string_dtype("utf-8")
    p = pixel_size
    shapes = {
        "ids": ((), s), "status": ((), s), "error": ((), s), "caption": ((), s), "caption_source": ((), s),
        "member": ((), np.int8),
        "query_pixels": ((p, p, 3), np.uint8),
        "query_img_emb": ((dim,), np.float32),
        "caption_emb": ((dim,), np.float32),
    }
    if BLACK_BOX in tiers:
        shapes.update({
            "gen_captions": ((n_gen,), s),
            "gen_pixels": ((n_gen, p, p, 3), np.uint8),
            "gen_img_emb": ((n_gen, dim), np.float32),
            "gen_caption_emb": ((n_gen, dim), np.float32),
        })
    if GRAY_BOX in tiers:
        shapes.update({key: ((n_timesteps,), np.float32) for key in TIER_KEYS[GRAY_BOX]})
        shapes["graybox_clid"] = ((n_clid, CLID_TERMS), np.float32)
    if reference:
        shapes.update({REF_PREFIX + key: shapes[key] for key in tier_keys(tiers)})
    return shapes


def empty_batch(n: int, n_gen: int, pixel_size: int, dim: int, tiers: tuple[str, ...] = (BLACK_BOX,),
                n_timesteps: int = 0, reference: bool = False, n_clid: int = 0) -> dict[str, np.ndarray]:
    """A batch of ``n`` rows filled with the values failed rows keep: empty strings, zeros, member -1."""
    out = {}
    for key, (shape, dtype) in row_shapes(n_gen, pixel_size, dim, tiers, n_timesteps, reference, n_clid).items():
        if dtype is np.int8:
            out[key] = np.full((n, *shape), -1, np.int8)
        elif isinstance(dtype, np.dtype) and dtype.kind == "O":
            out[key] = np.full((n, *shape), "", dtype=object)
        else:
            out[key] = np.zeros((n, *shape), dtype)
    return out


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: feature store not found") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: not a readable feature store ({str(exc).splitlines()[0]}); delete it and "
                            "recompute") from None


def _read_manifest(f: h5py.File, path: Path) -> dict:
    raw = f.attrs.get("manifest")
    if raw is None:
        raise ArtifactError(f"{path}: HDF5 file has no audit manifest; not a feature store")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: feature store manifest is not valid JSON ({exc.msg})") from None


class FeatureStore:
    """Read access to a feature store. ``read()`` gives the dict the attacks consume."""

    def __init__(self, path: Path, manifest: dict, n_committed: int, shapes: dict[str, tuple]):
        self.path = path
        self.manifest = manifest
        self.n_committed = n_committed
        self._shapes = shapes
        self.keys = tuple(shapes)

    @classmethod
    def open(cls, path: str | Path, target: dict | None = None) -> "FeatureStore":
        """Open a store; with ``target`` (an identity dict) refuse a store made for another target."""
        path = Path(path)
        with _open(path, "r") as f:
            manifest = _read_manifest(f, path)
            check_manifest(manifest, KIND, str(path), target)
            keys = store_keys(store_tiers(manifest), has_reference(manifest))
            # Stores made before CLiD hold every other gray-box dataset.
            keys = tuple(k for k in keys if k in f or k.removeprefix(REF_PREFIX) != "graybox_clid")
            missing = [k for k in keys if k not in f]
            if missing:
                raise ArtifactError(f"{path}: feature store lacks dataset(s) {missing}")
            n = int(f.attrs.get("n_committed", 0))
            shapes = {k: f[k].shape for k in keys}
        short = [k for k, s in shapes.items() if s[0] < n]
        if short:
            raise ArtifactError(f"{path}: dataset(s) {short} hold fewer rows than the {n} committed; the store is "
                                "damaged, delete it and recompute")
        return cls(path, manifest, n, shapes)

    @property
    def n_rows(self) -> int:
        """Rows the finished store will hold (all rows of the input folder)."""
        return int(self.manifest.get("n_rows", self.n_committed))

    @property
    def complete(self) -> bool:
        return self.n_committed >= self.n_rows

    @property
    def tiers(self) -> tuple[str, ...]:
        return store_tiers(self.manifest)

    @property
    def reference(self) -> dict | None:
        """The reference model's identity (name, weights hash), None for a store made without one."""
        return self.manifest.get("reference") or None

    @property
    def n_gen(self) -> int:
        """Generated images per row (0 in a store without the black-box tier)."""
        return int(self._shapes["gen_img_emb"][1]) if "gen_img_emb" in self._shapes else 0

    @property
    def n_timesteps(self) -> int:
        """Gray-box timesteps per row (0 in a store without the gray-box tier)."""
        return int(self._shapes["graybox_loss"][1]) if "graybox_loss" in self._shapes else 0

    @property
    def n_clid(self) -> int:
        """CLiD's timesteps per row (0 in a store without them)."""
        return int(self._shapes["graybox_clid"][1]) if "graybox_clid" in self._shapes else 0

    @property
    def dim(self) -> int:
        return int(self._shapes["query_img_emb"][1])

    @property
    def pixel_size(self) -> int:
        return int(self._shapes["query_pixels"][1])

    def __len__(self) -> int:
        return self.n_committed

    def read(self, ok_only: bool = True, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Committed rows as numpy arrays (strings as ``str`` arrays); ``ok_only`` keeps rows with status ok.
        ``keys``: the datasets to read (default: all the store holds)."""
        keys = self.keys if keys is None else keys
        if not self.complete:
            log.warning("%s: store is incomplete (%d of %d rows); run `audit features ... --resume` to finish it",
                        self.path, self.n_committed, self.n_rows)
        n = self.n_committed
        out: dict[str, np.ndarray] = {}
        with _open(self.path, "r") as f:
            status = f["status"].asstr()[:n]
            keep = np.flatnonzero(np.asarray(status, dtype=object) == "ok") if ok_only else None
            for key in keys:
                ds = f[key]
                if h5py.check_string_dtype(ds.dtype) is not None:
                    arr = ds.asstr()[:n]
                    arr = np.asarray(arr, dtype=str) if arr.size else np.zeros(arr.shape, dtype=str)
                else:
                    arr = ds[:n]
                out[key] = arr[keep] if keep is not None else arr
        return out

    def status_counts(self) -> dict[str, int]:
        status = self.read(ok_only=False, keys=("status",))["status"]
        values, counts = np.unique(status, return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}


def store_tiers(manifest: dict) -> tuple[str, ...]:
    """The tiers a store's manifest says it holds (stores made before the gray-box tier hold black-box only)."""
    tiers = tuple(manifest.get("tiers") or (BLACK_BOX,))
    unknown = [t for t in tiers if t not in TIERS]
    if unknown:
        raise ArtifactError(f"feature store manifest names unknown tier(s) {unknown}; valid tiers are "
                            f"{', '.join(TIERS)}")
    return tiers


def _differences(old: dict, new: dict) -> list[str]:
    """What makes a stored manifest incompatible with the run asking to extend it (empty when compatible)."""
    diffs = []
    for key in sorted(set(old.get("config", {})) | set(new.get("config", {}))):
        a, b = old.get("config", {}).get(key), new.get("config", {}).get(key)
        if a != b:
            diffs.append(f"{key}: store has {a!r}, this run has {b!r}")
    for key in ("target", "embedder", "captioner", "reference"):
        a, b = old.get(key) or {}, new.get(key) or {}
        if a.get("hash") != b.get("hash"):
            diffs.append(f"{key}: store was made with {a.get('name')!r} (weights {a.get('hash')}), this run uses "
                         f"{b.get('name')!r} (weights {b.get('hash')})")
    if store_tiers(old) != store_tiers(new):
        diffs.append(f"tiers: store has {', '.join(store_tiers(old))}, this run computes "
                     f"{', '.join(store_tiers(new))}")
    for key in ("n_rows", "rows_hash"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: store has {old.get(key)!r}, this run's data has {new.get(key)!r} (the input folder "
                         "changed)")
    return diffs


def refuse_different(path: Path, stored: dict, manifest: dict) -> None:
    """UsageError naming every difference when a run with ``manifest`` may not extend the store of ``stored``."""
    diffs = _differences(stored, manifest)
    if diffs:
        raise UsageError(f"{path}: cannot resume, the store was made differently: " + "; ".join(diffs)
                         + ". Rerun with the store's settings, or delete it to start over")


class FeatureWriter:
    """Appends committed batches to a store. Create with ``create`` or ``resume``."""

    def __init__(self, path: Path, manifest: dict, n_committed: int, shapes: dict):
        self.path = path
        self.manifest = manifest
        self.n_committed = n_committed
        self._shapes = shapes

    @classmethod
    def create(cls, path: str | Path, manifest: dict, n_gen: int, pixel_size: int, dim: int,
               chunk_rows: int = CHUNK_ROWS, n_timesteps: int = 0, n_clid: int = 0) -> "FeatureWriter":
        """``chunk_rows`` should equal the rows per ``append``: then an append only ever writes fresh chunks, and a
        kill mid-append cannot damage a chunk holding committed rows (a compressed chunk shared with the next batch
        is read back and rewritten, and a kill during that rewrite left committed rows unreadable)."""
        path = Path(path)
        if path.exists():
            raise UsageError(f"{path}: feature store already exists; pass --resume to continue it, or delete it")
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = row_shapes(n_gen, pixel_size, dim, store_tiers(manifest), n_timesteps, has_reference(manifest),
                            n_clid)
        tmp = path.with_name(f".{path.name}.creating")
        with h5py.File(tmp, "w") as f:
            for key, (shape, dtype) in shapes.items():
                numeric = not (isinstance(dtype, np.dtype) and dtype.kind == "O")
                f.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                 chunks=(max(1, chunk_rows), *shape), compression="gzip", compression_opts=4,
                                 shuffle=numeric and np.dtype(dtype).itemsize > 1)
            f.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
            f.attrs["n_committed"] = 0
        tmp.replace(path)  # a store exists only once all its datasets do
        return cls(path, manifest, 0, shapes)

    @classmethod
    def resume(cls, path: str | Path, manifest: dict) -> "FeatureWriter":
        """Continue a store made by the same config, models and data; drop rows written but never committed."""
        path = Path(path)
        store = FeatureStore.open(path)
        refuse_different(path, store.manifest, manifest)
        n = store.n_committed
        with _open(path, "a") as f:
            for key in store.keys:
                if f[key].shape[0] != n:
                    log.info("%s: dropping %d uncommitted row(s) of %s", path, f[key].shape[0] - n, key)
                    f[key].resize(n, axis=0)
        shapes = row_shapes(store.n_gen, store.pixel_size, store.dim, store.tiers, store.n_timesteps,
                            has_reference(store.manifest), store.n_clid)
        shapes = {k: v for k, v in shapes.items() if k in store.keys}
        # Keep the original manifest (creation time included): a resumed store equals an uninterrupted one.
        return cls(path, store.manifest, n, shapes)

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def append(self, batch: dict[str, np.ndarray]) -> None:
        """Write one batch of rows, then commit it (the counter is raised only after every array is written)."""
        n = len(batch["ids"])
        for key, (shape, _) in self._shapes.items():
            if key not in batch:
                raise ValueError(f"batch lacks {key!r}")
            if tuple(np.shape(batch[key])) != (n, *shape):
                raise ValueError(f"batch {key!r} has shape {np.shape(batch[key])}, expected {(n, *shape)}")
        start = self.n_committed
        with _open(self.path, "a") as f:
            for key in self._shapes:
                ds = f[key]
                ds.resize(start + n, axis=0)
                value = batch[key]
                if h5py.check_string_dtype(ds.dtype) is not None:
                    value = np.asarray(value, dtype=object)
                ds[start:start + n] = value
            f.flush()
            f.attrs["n_committed"] = start + n
        self.n_committed = start + n
