"""The HDF5 feature store on its own: layout, append/commit, truncation of uncommitted rows, resume refusals."""

import h5py
import numpy as np
import pytest

from audit.errors import ArtifactError, UsageError
from audit.features.store import KEYS, FeatureStore, FeatureWriter, empty_batch
from audit.manifest import make_manifest

G, P, D = 2, 32, 8


def _manifest(**config):
    cfg = {"n_gen": G, "steps": 2, "seed": 0, **config}
    return make_manifest("features", cfg, {"name": "t", "hash": "abc"}, embedder={"name": "e", "hash": "e1"},
                         captioner={"name": "c", "hash": "c1"}, n_rows=5, rows_hash="r1")


def _batch(start, n, rng):
    b = empty_batch(n, G, P, D)
    for i in range(n):
        b["ids"][i] = f"img_{start + i:03d}.png"
        b["status"][i] = "ok" if (start + i) != 3 else "unreadable"
        b["error"][i] = "" if (start + i) != 3 else "img_003.png: not a readable image"
        b["caption"][i] = f"caption {start + i} ünïcödé"
        b["caption_source"][i] = "metadata"
        b["gen_captions"][i] = [f"gen {start + i} {j}" for j in range(G)]
    b["member"][:] = rng.integers(0, 2, n)
    b["query_pixels"][:] = rng.integers(0, 256, b["query_pixels"].shape)
    b["gen_pixels"][:] = rng.integers(0, 256, b["gen_pixels"].shape)
    for k in ("query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb"):
        b[k][:] = rng.standard_normal(b[k].shape)
    return b


def test_append_and_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.h5"
    w = FeatureWriter.create(path, _manifest(), G, P, D)
    b1, b2 = _batch(0, 3, rng), _batch(3, 2, rng)
    w.append(b1)
    w.append(b2)
    store = FeatureStore.open(path)
    assert store.complete and len(store) == 5 and (store.n_gen, store.pixel_size, store.dim) == (G, P, D)
    everything = store.read(ok_only=False)
    assert set(everything) == set(KEYS)
    for k in KEYS:
        expect = np.concatenate([b1[k], b2[k]])
        if expect.dtype == object:
            assert everything[k].tolist() == expect.tolist(), k
        else:
            np.testing.assert_array_equal(everything[k], expect, err_msg=k)
            assert everything[k].dtype == expect.dtype
    ok = store.read()
    assert ok["ids"].tolist() == ["img_000.png", "img_001.png", "img_002.png", "img_004.png"]
    assert store.status_counts() == {"ok": 4, "unreadable": 1}
    with h5py.File(path) as f:  # chunked and compressed, appendable along rows
        assert f["gen_pixels"].chunks[0] > 1 and f["gen_pixels"].compression == "gzip"
        assert f["gen_pixels"].maxshape[0] is None


def test_uncommitted_rows_are_invisible_and_dropped_on_resume(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.h5"
    w = FeatureWriter.create(path, _manifest(), G, P, D)
    w.append(_batch(0, 3, rng))
    # What a kill between writing arrays and raising the counter leaves: rows beyond n_committed.
    with h5py.File(path, "a") as f:
        for k in ("ids", "query_pixels", "gen_img_emb"):
            f[k].resize(5, axis=0)
    store = FeatureStore.open(path)
    assert len(store) == 3 and not store.complete
    assert len(store.read(ok_only=False)["query_pixels"]) == 3
    w2 = FeatureWriter.resume(path, _manifest())
    assert w2.n_committed == 3
    with h5py.File(path) as f:
        assert all(f[k].shape[0] == 3 for k in KEYS)


def test_resume_refuses_another_config_naming_the_difference(tmp_path):
    path = tmp_path / "s.h5"
    FeatureWriter.create(path, _manifest(), G, P, D)
    with pytest.raises(UsageError, match=r"steps: store has 2, this run has 5"):
        FeatureWriter.resume(path, _manifest(steps=5))
    other = _manifest()
    other["target"] = {"name": "other", "hash": "zzz"}
    with pytest.raises(UsageError, match=r"target: store was made with 't' \(weights abc\).*'other'"):
        FeatureWriter.resume(path, other)
    changed = _manifest()
    changed["rows_hash"] = "r2"
    with pytest.raises(UsageError, match="input folder changed"):
        FeatureWriter.resume(path, changed)


def test_existing_store_without_resume_is_an_error(tmp_path):
    path = tmp_path / "s.h5"
    FeatureWriter.create(path, _manifest(), G, P, D)
    with pytest.raises(UsageError, match="--resume"):
        FeatureWriter.create(path, _manifest(), G, P, D)


def test_open_refuses_non_stores_and_other_targets(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ArtifactError, match="junk.h5: not a readable feature store"):
        FeatureStore.open(junk)
    with pytest.raises(ArtifactError, match="not found"):
        FeatureStore.open(tmp_path / "missing.h5")
    bare = tmp_path / "bare.h5"
    h5py.File(bare, "w").close()
    with pytest.raises(ArtifactError, match="no audit manifest"):
        FeatureStore.open(bare)
    path = tmp_path / "s.h5"
    FeatureWriter.create(path, _manifest(), G, P, D)
    with pytest.raises(ArtifactError, match="made for target 't'"):
        FeatureStore.open(path, target={"name": "x", "hash": "other"})


def test_append_rejects_a_malformed_batch(tmp_path):
    w = FeatureWriter.create(tmp_path / "s.h5", _manifest(), G, P, D)
    b = _batch(0, 2, np.random.default_rng(0))
    b["gen_img_emb"] = b["gen_img_emb"][:, :1]
    with pytest.raises(ValueError, match="gen_img_emb"):
        w.append(b)
    assert FeatureStore.open(tmp_path / "s.h5").n_committed == 0
