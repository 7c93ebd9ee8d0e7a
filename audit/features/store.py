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
  variation tier (``features.variation``; S strengths, V variations, P = V(V-1)/2 pairs):
    var_pixel_dist, var_clip_dist                   float32 [N, S, V]  each variation's distance to the query
    var_mean_pixel_dist                             float32 [N, S]     the variations' average's pixel distance
    var_pixel_pair, var_clip_pair                   float32 [N, S, P]  the variations' distances to each other

Nothing in a store is trusted before it is checked: ``FeatureStore.open`` validates every dataset's kind, dtype and
shape against this layout, the sizes against ``LIMITS`` and each other, and ``n_committed`` against the rows, and
``read`` refuses to allocate more than the memory available, so a small file declaring a huge dataset is refused in
one line before anything is allocated.

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
from ..tiers import BLACK_BOX, GRAY_BOX, TIERS, VARIATION

log = logging.getLogger(__name__)

KIND = "features"
STR_KEYS = ("ids", "status", "error", "caption", "caption_source")
COMMON_KEYS = ("member", "query_pixels", "query_img_emb", "caption_emb")
TIER_KEYS = {BLACK_BOX: ("gen_captions", "gen_pixels", "gen_img_emb", "gen_caption_emb"),
             GRAY_BOX: ("graybox_loss", "graybox_pia", "graybox_secmi", "graybox_clid"),
             VARIATION: ("var_pixel_dist", "var_clip_dist", "var_mean_pixel_dist", "var_pixel_pair",
                         "var_clip_pair")}
# The reference model's copy of a tier dataset (the query side is the same for both models and is stored once).
REF_PREFIX = "ref_"
# CLiD's three losses per timestep: conditional, unconditional, masked caption.
CLID_TERMS = 3
ARRAY_KEYS = COMMON_KEYS + TIER_KEYS[BLACK_BOX]
KEYS = STR_KEYS + ARRAY_KEYS  # a black-box store's datasets
# Bounds on what a store may declare (far above any real store: 1024 px thumbnails, 16k-wide embeddings).
LIMITS = {"rows": 100_000_000, "pixel_size": 1024, "dim": 16384, "n_gen": 1024, "n_timesteps": 1000, "n_clid": 1000,
          "n_strengths": 64, "n_var": 64}
MAX_MANIFEST_CHARS = 1 << 20
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
               n_timesteps: int = 0, n_strengths: int = 0, n_var: int = 0, reference: bool = False,
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
    if VARIATION in tiers:
        pairs = n_var * (n_var - 1) // 2
        shapes.update({"var_pixel_dist": ((n_strengths, n_var), np.float32),
                       "var_clip_dist": ((n_strengths, n_var), np.float32),
                       "var_mean_pixel_dist": ((n_strengths,), np.float32),
                       "var_pixel_pair": ((n_strengths, pairs), np.float32),
                       "var_clip_pair": ((n_strengths, pairs), np.float32)})
    if reference:
        shapes.update({REF_PREFIX + key: shapes[key] for key in tier_keys(tiers)})
    return shapes


def empty_batch(n: int, n_gen: int, pixel_size: int, dim: int, tiers: tuple[str, ...] = (BLACK_BOX,),
                n_timesteps: int = 0, n_strengths: int = 0, n_var: int = 0, reference: bool = False,
                n_clid: int = 0) -> dict[str, np.ndarray]:
    """A batch of ``n`` rows filled with the values failed rows keep: empty strings, zeros, member -1."""
    out = {}
    for key, (shape, dtype) in row_shapes(n_gen, pixel_size, dim, tiers, n_timesteps, n_strengths, n_var, reference,
                                          n_clid).items():
        if dtype is np.int8:
            out[key] = np.full((n, *shape), -1, np.int8)
        elif isinstance(dtype, np.dtype) and dtype.kind == "O":
            out[key] = np.full((n, *shape), "", dtype=object)
        else:
            out[key] = np.zeros((n, *shape), dtype)
    return out


def _open(path: Path, mode: str) -> h5py.File:
    if path.exists() and not path.is_file():  # a FIFO would block the open forever, a device read without end
        raise ArtifactError(f"{path}: not a regular file; not a feature store")
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
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str) or len(raw) > MAX_MANIFEST_CHARS:
        raise ArtifactError(f"{path}: feature store manifest is not a JSON text of at most {MAX_MANIFEST_CHARS} "
                            "characters")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: feature store manifest is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: feature store manifest is nested too deeply") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: feature store manifest is a JSON {type(manifest).__name__}, not an object")
    n_rows = manifest.get("n_rows")
    if n_rows is not None and not _count(n_rows, LIMITS["rows"]):
        raise ArtifactError(f"{path}: feature store manifest gives n_rows {str(n_rows)[:40]!r}, not an integer in "
                            f"[0, {LIMITS['rows']}]")
    return manifest


def _count(value: Any, limit: int, low: int = 0) -> bool:
    """``value`` is an integer (Python or numpy scalar, not bool) in [low, limit]."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and low <= value <= limit


def check_layout(f: h5py.File, path: Path, manifest: dict) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(n_committed, shape of each dataset) once the store's layout is checked against the schema: every dataset
    of its tiers present as a dataset of the right dtype and rank, per-row sizes within ``LIMITS`` and the same
    in every dataset that shares them, rows within ``LIMITS`` and at least ``n_committed``. Reads no data."""
    reference = has_reference(manifest)
    keys = store_keys(store_tiers(manifest), reference)
    # Stores made before CLiD hold every other gray-box dataset.
    keys = tuple(k for k in keys if k in f or k.removeprefix(REF_PREFIX) != "graybox_clid")
    missing = [k for k in keys if k not in f]
    if missing:
        raise ArtifactError(f"{path}: feature store lacks dataset(s) {missing}")
    datasets = {k: f[k] for k in keys}
    for key, ds in datasets.items():
        if not isinstance(ds, h5py.Dataset):
            raise ArtifactError(f"{path}: {key} is an HDF5 {type(ds).__name__}, not a dataset; not a feature store")
    sizes = {}
    for name, key, axis in (("pixel_size", "query_pixels", 1), ("dim", "query_img_emb", 1),
                            ("n_gen", "gen_img_emb", 1), ("n_timesteps", "graybox_loss", 1),
                            ("n_clid", "graybox_clid", 1), ("n_strengths", "var_pixel_dist", 1),
                            ("n_var", "var_pixel_dist", 2)):
        if key in datasets:
            shape = datasets[key].shape
            value = shape[axis] if shape is not None and len(shape) > axis else None
            if not _count(value, LIMITS[name], 1):
                raise ArtifactError(f"{path}: dataset {key} has shape {shape}: its {name} must be in "
                                    f"[1, {LIMITS[name]}]; the store is damaged or not a feature store")
            sizes[name] = int(value)
    expected = row_shapes(sizes.get("n_gen", 0), sizes["pixel_size"], sizes["dim"], store_tiers(manifest),
                          sizes.get("n_timesteps", 0), sizes.get("n_strengths", 0), sizes.get("n_var", 0), reference,
                          sizes.get("n_clid", 0))
    for key, (row, dtype) in expected.items():
        if key not in datasets:  # graybox_clid in a store made before CLiD
            continue
        ds = datasets[key]
        text = isinstance(dtype, np.dtype) and dtype.kind == "O"
        kind_ok = (h5py.check_string_dtype(ds.dtype) is not None) if text else ds.dtype == np.dtype(dtype)
        if not kind_ok or ds.shape is None or tuple(ds.shape[1:]) != tuple(row) or len(ds.shape) != 1 + len(row):
            want = "text" if text else np.dtype(dtype).name
            layout = "(rows,)" if not row else f"(rows, {', '.join(map(str, row))})"
            raise ArtifactError(f"{path}: dataset {key} is {ds.dtype} {ds.shape}, expected {want} {layout}; the "
                                "store is damaged or not a feature store")
        if ds.shape[0] > LIMITS["rows"]:
            raise ArtifactError(f"{path}: dataset {key} declares {ds.shape[0]} rows, over {LIMITS['rows']}")
    n = f.attrs.get("n_committed", 0)
    n_rows = manifest.get("n_rows")
    if not _count(n, LIMITS["rows"]) or (n_rows is not None and n > n_rows):
        raise ArtifactError(f"{path}: n_committed {str(n)[:40]} is not an integer in [0, "
                            f"{n_rows if n_rows is not None else LIMITS['rows']}]; the store is damaged")
    shapes = {k: tuple(ds.shape) for k, ds in datasets.items()}
    short = [k for k, s in shapes.items() if s[0] < n]
    if short:
        raise ArtifactError(f"{path}: dataset(s) {short} hold fewer rows than the {int(n)} committed; the store is "
                            "damaged, delete it and recompute")
    return int(n), shapes


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
            n, shapes = check_layout(f, path, manifest)
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
    def n_strengths(self) -> int:
        """Variation strengths per row (0 in a store without the variation tier)."""
        return int(self._shapes["var_pixel_dist"][1]) if "var_pixel_dist" in self._shapes else 0

    @property
    def n_var(self) -> int:
        """Variations per strength (0 in a store without the variation tier)."""
        return int(self._shapes["var_pixel_dist"][2]) if "var_pixel_dist" in self._shapes else 0

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
        self._check_memory(keys, n)
        out: dict[str, np.ndarray] = {}
        try:
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
        except (OSError, KeyError, ValueError) as exc:  # a damaged chunk, an unknown filter, a changed file
            raise ArtifactError(f"{self.path}: cannot read the feature store ({str(exc).splitlines()[0]}); delete "
                                "it and recompute") from None
        return out

    def _check_memory(self, keys: tuple[str, ...], n: int) -> None:
        """Refuse, before allocating, a read larger than the memory this process can take."""
        from ..runtime.memory import available_bytes

        need = sum(n * int(np.prod(self._shapes[k][1:], dtype=np.int64)) * _itemsize(k) for k in keys)
        free = available_bytes()
        if free is not None and need > free:
            raise ArtifactError(f"{self.path}: reading its {n} rows needs {need / 2**30:.1f} GiB, more than the "
                                f"{free / 2**30:.1f} GiB of memory available")

    def status_counts(self) -> dict[str, int]:
        status = self.read(ok_only=False, keys=("status",))["status"]
        values, counts = np.unique(status, return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts)}


def _itemsize(key: str) -> int:
    """Bytes per element of ``key`` once read (text: a pointer and a short string, 64 as an estimate)."""
    dtype = row_shapes(1, 8, 1, TIERS, 1)[key.removeprefix(REF_PREFIX)][1]
    return 64 if isinstance(dtype, np.dtype) and dtype.kind == "O" else np.dtype(dtype).itemsize


def store_tiers(manifest: dict) -> tuple[str, ...]:
    """The tiers a store's manifest says it holds (stores made before the gray-box tier hold black-box only)."""
    tiers = manifest.get("tiers") or (BLACK_BOX,)
    if not isinstance(tiers, (list, tuple)) or not all(isinstance(t, str) for t in tiers):
        raise ArtifactError(f"feature store manifest gives tiers {str(tiers)[:60]!r}, not a list of names; valid "
                            f"tiers are {', '.join(TIERS)}")
    tiers = tuple(tiers)
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



def refuse_existing(path: str | Path, resume: bool = False) -> None:
    """A feature store is never overwritten: an existing one is only continued, with --resume."""
    if Path(path).exists() and not resume:
        raise UsageError(f"{path}: feature store already exists; pass --resume to continue it, or delete it")

class FeatureWriter:
    """Appends committed batches to a store. Create with ``create`` or ``resume``."""

    def __init__(self, path: Path, manifest: dict, n_committed: int, shapes: dict):
        self.path = path
        self.manifest = manifest
        self.n_committed = n_committed
        self._shapes = shapes

    @classmethod
    def create(cls, path: str | Path, manifest: dict, n_gen: int, pixel_size: int, dim: int,
               chunk_rows: int = CHUNK_ROWS, n_timesteps: int = 0, n_strengths: int = 0,
               n_var: int = 0, n_clid: int = 0) -> "FeatureWriter":
        """``chunk_rows`` should equal the rows per ``append``: then an append only ever writes fresh chunks, and a
        kill mid-append cannot damage a chunk holding committed rows (a compressed chunk shared with the next batch
        is read back and rewritten, and a kill during that rewrite left committed rows unreadable)."""
        path = Path(path)
        refuse_existing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = row_shapes(n_gen, pixel_size, dim, store_tiers(manifest), n_timesteps, n_strengths, n_var,
                            has_reference(manifest), n_clid)
        tmp = path.with_name(f".{path.name}.creating")
        with h5py.File(tmp, "w") as f:
            for key, (shape, dtype) in shapes.items():
                numeric = not (isinstance(dtype, np.dtype) and dtype.kind == "O")
                # An empty axis (one variation has no pairs) cannot be chunked at its size: it is left resizable.
                f.create_dataset(key, shape=(0, *shape), maxshape=(None, *(d or None for d in shape)), dtype=dtype,
                                 chunks=(max(1, chunk_rows), *(max(1, d) for d in shape)), compression="gzip",
                                 compression_opts=4,
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
                            store.n_strengths, store.n_var, has_reference(store.manifest), store.n_clid)
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
