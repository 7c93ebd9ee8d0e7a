"""kill -9 in the middle of real runs, then --resume: the outputs equal an uninterrupted run, no row lost or twice.

The model-free store test kills a process that does nothing but append, so the kill lands mid-write (a
half-written HDF5 chunk); the CLI tests kill `audit features` / `audit scan` subprocesses on the tiny models.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from audit.features.store import KEYS, FeatureStore
from processes import ENV, committed as _committed, run_until as _run_until


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from audit.features.store import FeatureWriter, empty_batch
    from audit.manifest import make_manifest

    B, G, P, D = 16, 2, 32, 64

    def batch(i):
        rng = np.random.default_rng(i)
        b = empty_batch(B, G, P, D)
        b["ids"][:] = [f"{i * B + j:06d}" for j in range(B)]
        b["status"][:] = "ok"
        b["gen_pixels"][:] = rng.integers(0, 256, b["gen_pixels"].shape, dtype=np.uint8)
        b["query_img_emb"][:] = rng.normal(size=b["query_img_emb"].shape)
        return b

    if __name__ == "__main__":
        path, n_batches, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
        manifest = make_manifest("features", {"batch_size": B}, {"name": "t", "hash": "h"}, n_rows=B * n_batches,
                                 embedder={"name": "e", "hash": "e"}, captioner={"name": "c", "hash": "c"},
                                 rows_hash="r")
        if resume:
            w = FeatureWriter.resume(path, manifest)
        else:
            w = FeatureWriter.create(path, manifest, G, P, D, chunk_rows=B)
        for i in range(w.n_committed // B, n_batches):
            w.append(batch(i))
            print("committed", w.n_committed, file=sys.stderr, flush=True)
""")


def _store_arrays(path):
    store = FeatureStore.open(path)
    assert store.complete
    return store.read(ok_only=False), store.manifest


def test_store_writer_killed_mid_write_resumes_exactly(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n_batches = 60
    rnd = random.Random(0)
    sys.path.insert(0, str(tmp_path))
    try:
        import writer as ref  # the same batches the subprocess writes
    finally:
        sys.path.remove(str(tmp_path))
    for trial in range(4):
        path = tmp_path / f"s{trial}.h5"
        after = 16 * rnd.randrange(5, 40)
        _run_until([sys.executable, str(script), str(path), str(n_batches), "0"],
                   lambda text: f"committed {after}\n" in text, timeout=60, extra_delay=rnd.random() * 0.01)
        killed_at = FeatureStore.open(path).n_committed
        assert after <= killed_at < 16 * n_batches
        subprocess.run([sys.executable, str(script), str(path), str(n_batches), "1"], check=True, timeout=120,
                       env=ENV, capture_output=True)
        got = FeatureStore.open(path).read(ok_only=False)
        assert list(got["ids"]) == [f"{i:06d}" for i in range(16 * n_batches)]  # none lost, none twice
        for i in range(n_batches):
            want = ref.batch(i)
            rows = slice(16 * i, 16 * (i + 1))
            assert np.array_equal(got["gen_pixels"][rows], want["gen_pixels"]), (trial, i)
            assert np.array_equal(got["query_img_emb"][rows], want["query_img_emb"]), (trial, i)


def _features_cmd(tiny_world, data, out, *extra):
    return [sys.executable, "-m", "audit.cli", "features", "--target", str(tiny_world["target"]),
            "--embedder", str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"]), "--data", str(data),
            "--out", str(out), "--n-gen", "1", "--steps", "2", "--batch-size", "1", "--seed", "4", *extra]


def test_features_killed_then_resumed_equals_uninterrupted(tiny_world, scan_folder, tmp_path):
    out = tmp_path / "killed.h5"
    _run_until(_features_cmd(tiny_world, scan_folder, out), _committed("features", 16)(2))
    killed_at = FeatureStore.open(out).n_committed
    assert 2 <= killed_at < 16
    subprocess.run(_features_cmd(tiny_world, scan_folder, out, "--resume", "--quiet"), check=True, env=ENV,
                   timeout=300, capture_output=True)
    ref = tmp_path / "ref.h5"  # the uninterrupted run: the same command, uninterrupted
    subprocess.run(_features_cmd(tiny_world, scan_folder, ref, "--quiet"), check=True, env=ENV, timeout=300,
                   capture_output=True)
    (want, want_manifest), (got, got_manifest) = _store_arrays(ref), _store_arrays(out)
    for key in KEYS:
        assert np.array_equal(got[key], want[key]), key
    assert len(set(got["ids"])) == len(got["ids"]) == 16
    assert {k: v for k, v in got_manifest.items() if k != "created"} == \
        {k: v for k, v in want_manifest.items() if k != "created"}


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory):
    """16 rows: tiny models featurise and scan fast, and a kill after 2 must land well before the end."""
    from audit.toy import scenes

    folder = tmp_path_factory.mktemp("scan")
    images, captions = scenes.scene_images(6, "members", 16)
    scenes.write_imagefolder(folder, images, captions, [i % 2 == 0 for i in range(16)])
    return folder


@pytest.fixture(scope="module")
def heads(tiny_world, tmp_path_factory):
    from tinyheads import tiny_heads

    return tiny_heads(tiny_world, tmp_path_factory.mktemp("heads"))


def test_scan_killed_then_resumed_equals_uninterrupted(heads, scan_folder, tmp_path):
    from audit.report.jsonl import read_jsonl

    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "audit.cli", "scan", str(scan_folder), "--out", str(out), "--batch-size", "1",
           *heads["opts"]]
    _run_until(cmd, _committed("scan", 16)(2))
    killed_at = len(read_jsonl(out)[0])
    assert 2 <= killed_at < 16
    subprocess.run([*cmd, "--resume", "--quiet"], check=True, env=ENV, timeout=300, capture_output=True)
    # The uninterrupted run as another subprocess of the same command: same thread count and environment, so
    # scores may be compared to float precision (across thread counts generation differs in the last bits, which
    # a steep calibration of these 3-epoch heads amplifies).
    ref = tmp_path / "ref.jsonl"
    subprocess.run([*cmd[:6], str(ref), *cmd[7:], "--quiet"], check=True, env=ENV, timeout=300, capture_output=True)
    got, want = read_jsonl(out)[0], read_jsonl(ref)[0]
    assert [r["id"] for r in got] == [r["id"] for r in want] == sorted(r["id"] for r in want)  # none lost or twice
    for g, w in zip(got, want):
        assert g.pop("probability") == pytest.approx(w.pop("probability"), abs=1e-6)
        for attack in w["scores"]:
            for k in ("score", "probability"):
                assert g["scores"][attack].pop(k) == pytest.approx(w["scores"][attack].pop(k), abs=1e-6)
        assert g == w


def test_train_killed_midway_leaves_heads_that_refuse_to_load_until_retrained(heads, tmp_path):
    """A heads folder is committed by heads.json, written last and atomically: a killed `audit train` leaves ONNX
    files but no heads.json, which every consumer refuses with one line; retraining into the folder works."""
    from typer.testing import CliRunner

    from audit.attacks import load_heads
    from audit.cli import app
    from audit.errors import ArtifactError

    out = tmp_path / "heads"
    cmd = [sys.executable, "-m", "audit.cli", "train", str(heads["store"]), "--out", str(out), "--no-register",
           "--epochs", "3", "--folds", "0"]
    _run_until(cmd, lambda _: out.is_dir() and any(out.glob("*.onnx")), timeout=300)
    assert not (out / "heads.json").exists()
    with pytest.raises(ArtifactError):
        load_heads(out)
    (img := tmp_path / "q.png").write_bytes((heads["store"].parent / "aux" / "img_00000.png").read_bytes())
    r = CliRunner().invoke(app, ["check", str(img), "--caption", "x",
                                 *[o if o != str(heads["heads"]) else str(out) for o in heads["opts"]]])
    assert r.exit_code == 1 and len([ln for ln in r.output.splitlines() if ln.startswith("error: ")]) == 1, r.output
    (out / "notes.txt").write_text("mine")  # a file train did not write: the folder is not train's to overwrite
    r = CliRunner().invoke(app, ["train", str(heads["store"]), "--out", str(out), "--no-register", "--epochs", "3",
                                 "--folds", "0"])
    assert r.exit_code == 2 and "not empty and holds no heads" in r.output
    (out / "notes.txt").unlink()  # only a killed run's leftovers: retraining into the folder just works
    r = CliRunner().invoke(app, ["train", str(heads["store"]), "--out", str(out), "--no-register", "--epochs", "3",
                                 "--folds", "0"])
    assert r.exit_code == 0, r.output
    assert load_heads(out).attacks
