"""`features` and `scan` on a Ray cluster give the single-machine outputs, bit for bit at the same thread counts:
with a worker node lost mid-run, after the driver is killed and resumed, with bad files in the folder. A node
without the models and a failing worker end the run with one line; without Ray, --ray names the extra.

The cluster (tests/conftest.py: ray_cluster) is a head and two worker nodes on this machine, shared by the tests.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch
from typer.testing import CliRunner

from audit import api
from audit.cli import app
from audit.errors import ClusterError, UsageError
from audit.features.store import KEYS, FeatureStore
from processes import ENV, committed, run_until

# Small batches so that a run has several (the cluster splits the work by batch), one torch thread per worker.
SETTINGS = dict(n_gen=1, steps=2, seed=4, batch_size=2, caption_tokens=6)
N_ROWS = 13


class one_thread:
    """The single-machine reference runs at the workers' thread count (--threads 1)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """13 rows: 9 toy scenes and, among them, a corrupt PNG, a truncated JPEG, a folder named like an image and a
    listed file that is missing, each with a caption: rows a worker must report as statuses, not failures."""
    from PIL import Image

    from audit.toy import scenes

    root = tmp_path_factory.mktemp("cluster_data")
    images, captions = scenes.scene_images(6, "members", 9)
    scenes.write_imagefolder(root, images, captions, [i % 2 == 0 for i in range(9)])
    (root / "img_00001_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    Image.fromarray(images[0]).save(root / "full.jpg", format="JPEG")
    (root / "img_00004_truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:300])
    (root / "full.jpg").unlink()
    (root / "img_00006_dir.png").mkdir()
    with open(root / "metadata.jsonl", "a") as fh:
        for name in ("img_00001_corrupt.png", "img_00004_truncated.jpg", "img_00006_dir.png", "img_00007_gone.png"):
            fh.write(json.dumps({"file_name": name, "text": "a shape", "member": False}) + "\n")
    return root


def _models(tiny_world):
    return dict(embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]))


@pytest.fixture(scope="module")
def reference(tiny_world, folder, tmp_path_factory):
    """The single-machine store, at one torch thread."""
    out = tmp_path_factory.mktemp("cluster_ref") / "ref.h5"
    with one_thread():
        api.featurize(str(tiny_world["target"]), folder, out, quiet=True, **_models(tiny_world), **SETTINGS)
    return out


def _assert_same_store(got_path, want_path):
    got, want = FeatureStore.open(got_path), FeatureStore.open(want_path)
    assert got.complete and want.complete
    a, b = got.read(ok_only=False), want.read(ok_only=False)
    for key in KEYS:
        assert np.array_equal(a[key], b[key]), key
    assert {k: v for k, v in got.manifest.items() if k != "created"} == \
        {k: v for k, v in want.manifest.items() if k != "created"}


def test_the_reference_holds_the_bad_rows_as_statuses(reference):
    status = dict(zip(*(FeatureStore.open(reference).read(ok_only=False, keys=("ids", "status")).values())))
    assert len(status) == N_ROWS
    assert {k: v for k, v in status.items() if v != "ok"} == {
        "img_00001_corrupt.png": "unreadable", "img_00004_truncated.jpg": "unreadable",
        "img_00006_dir.png": "unreadable", "img_00007_gone.png": "missing"}


def test_features_on_ray_equal_one_machine_with_a_worker_node_lost_midway(ray_cluster, tiny_world, folder,
                                                                           reference, tmp_path):
    victim = sorted(ray_cluster.worker_nodes, key=lambda n: n.node_id)[0]
    lost = {}

    def lose_a_node(n_committed):
        if not lost and n_committed >= 4:
            ray_cluster.remove_node(victim)
            lost["after"] = n_committed

    out = tmp_path / "ray.h5"
    # Both workers up before the first batch (Ray Data's own setting; the command starts with whichever is up):
    # otherwise the first to load may compute all these tiny batches before the other one starts.
    context = ray.data.DataContext.get_current()
    waited, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 300
    try:
        summary = api.featurize(str(tiny_world["target"]), folder, out, quiet=True, ray=ray_cluster.address,
                                workers=2, threads=1, on_batch=lose_a_node, **_models(tiny_world), **SETTINGS)
    finally:
        context.wait_for_min_actors_s = waited
        ray_cluster.add_node(**ray_cluster.node_args)  # the next tests get two worker nodes again
        ray_cluster.wait_for_nodes()
    assert 4 <= lost["after"] < N_ROWS
    stats = summary.ray["worker_stats"]
    assert any(victim.node_id[:8] in w["node"] and w["batches"] for w in stats), stats  # it was doing work
    assert sum(w["batches"] for w in stats) == 7
    _assert_same_store(out, reference)


def _cli_features(tiny_world, folder, out, *extra):
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return [sys.executable, "-m", "audit.cli", "features", "--target", str(tiny_world["target"]), "--embedder",
            str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"]), "--data", str(folder), "--out",
            str(out), *opts, *extra]


def test_features_driver_killed_then_resumed_on_ray_equals_one_machine(ray_cluster, tiny_world, folder, reference,
                                                                       tmp_path):
    out = tmp_path / "killed.h5"
    # One worker: batches then finish one by one, so the kill lands between two commits, well before the end.
    cmd = _cli_features(tiny_world, folder, out, "--ray", ray_cluster.address, "--workers", "1", "--threads", "1")
    run_until(cmd, committed("features", N_ROWS)(2), timeout=300)
    killed_at = FeatureStore.open(out).n_committed
    assert 2 <= killed_at < N_ROWS
    env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([*cmd, "--resume", "--quiet"], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on Ray (1 worker)" in done.stdout
    _assert_same_store(out, reference)


@pytest.fixture(scope="module")
def heads(tiny_world, tmp_path_factory):
    from tinyheads import tiny_heads

    return tiny_heads(tiny_world, tmp_path_factory.mktemp("cluster_heads"))


def test_scan_on_ray_resumes_a_cut_results_file_into_the_one_machine_results(ray_cluster, heads, folder, tmp_path):
    ref = tmp_path / "ref.jsonl"
    with one_thread():
        api.scan(folder, ref, heads=heads["heads"], batch_size=3, quiet=True, **heads["kw"])
    lines = ref.read_bytes().splitlines(keepends=True)
    assert len(lines) == N_ROWS
    # A scan killed while writing row 5: rows 4 and 5 share a batch with the finished row 3, so the workers score
    # that batch whole again (as one machine does) and only its missing rows are written.
    out = tmp_path / "ray.jsonl"
    out.write_bytes(b"".join(lines[:4]) + lines[4][:25])
    summary = api.scan(folder, out, heads=heads["heads"], batch_size=3, quiet=True, resume=True,
                       ray=ray_cluster.address, workers=2, threads=1, **heads["kw"])
    assert out.read_bytes() == ref.read_bytes()
    counts = summary.counts
    assert counts.pop("skipped (already in the results)") == 4 and sum(counts.values()) == N_ROWS - 4
    assert counts["unreadable"] == 2 and counts["missing"] == 1  # the bad rows among the 9 left


def test_a_node_without_the_model_folder_fails_the_run_in_one_line(ray_cluster, tiny_world, folder, tmp_path):
    gone = tmp_path / "models" / "target"  # on no node (this machine is every node)
    result = CliRunner().invoke(app, ["features", "--target", str(gone), "--embedder", str(tiny_world["clip"]),
                                      "--captioner", str(tiny_world["blip"]), "--data", str(folder), "--out",
                                      str(tmp_path / "s.h5"), "--ray", ray_cluster.address, "--threads", "1"])
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: worker on "), result.output
    assert "(node " in errors[0] and f"target folder {gone} is missing on that node" in errors[0]
    assert not (tmp_path / "s.h5").exists()


def test_a_failing_worker_fails_the_run_with_its_rows_and_error(ray_cluster, tiny_world, folder, tmp_path):
    broken = tmp_path / "broken"  # a target whose scheduler cannot run 2 steps: generate raises in the worker
    shutil.copytree(tiny_world["target"], broken)
    config = broken / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"num_train_timesteps": 1000', '"num_train_timesteps": 1'))
    out = tmp_path / "s.h5"
    with pytest.raises(ClusterError) as info:
        api.featurize(str(broken), folder, out, quiet=True, ray=ray_cluster.address, threads=1,
                      **_models(tiny_world), **SETTINGS)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 1
    assert "failed on batch 0 (rows img_00000.png, img_00001.png): ValueError: `num_inference_steps`: 2 cannot " \
           "be larger than" in message, message
    assert not out.exists()  # nothing was committed: the first batch failed


def test_without_ray_the_ray_option_names_the_extra(monkeypatch, tiny_world, folder, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as on an installation without it
    with pytest.raises(UsageError, match=r"pip install 'audit\[ray\]'"):
        api.featurize("toy", folder, tmp_path / "s.h5", ray="local")
    result = CliRunner().invoke(app, ["scan", str(folder), "--target", "toy", "--out", str(tmp_path / "r.jsonl"),
                                      "--ray", "local"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --ray needs Ray Data"), result.output


def test_workers_and_threads_need_ray(folder, tmp_path):
    with pytest.raises(UsageError, match="--ray"):
        api.featurize("toy", folder, tmp_path / "s.h5", workers=2)


def test_shipped_bytes_decode_to_the_pixels_and_statuses_of_reading_the_files(tmp_path):
    """The worker's side of the transfer, on ~45 kinds of good and bad files: the bytes the driver's node reads
    decode on a worker to what the file gives on one machine, and an unreadable file marks its row the same."""
    from audit.cluster.workers import ShippedImages, read_payload, rows_item
    from audit.imagefolder import Row, load_row_image, read_imagefolder
    from badcorpus import write_bad_corpus

    write_bad_corpus(tmp_path / "data", tmp_path / "outside")
    here, there = read_imagefolder(tmp_path / "data"), read_imagefolder(tmp_path / "data")
    row_dicts, shipped = pickle.loads(read_payload(rows_item(0, there)["rows"]))
    rows = [Row(**r) for r in row_dicts]
    images = ShippedImages(rows, shipped)
    for i, (a, b) in enumerate(zip(here, rows)):
        want, got = load_row_image(a), images[i] if i in images else None
        assert (a.status, a.error) == (b.status, b.error), a.id
        assert (want is None and got is None) or np.array_equal(want, got), a.id
    assert sum(r.ok for r in rows) >= 10 and len({r.status for r in rows}) >= 5


def test_features_on_ray_with_a_compiled_target_equal_one_machine(ray_cluster, tiny_export, folder, monkeypatch,
                                                                   tmp_path):
    """An `audit export` folder as the target: the workers load the onnxruntime graphs (and the export's compiled
    embedder and captioner) once each, at the one-machine run's onnxruntime threads."""
    monkeypatch.setenv("AUDIT_THREADS", "1")
    target = str(tiny_export["path"])
    ref, out = tmp_path / "ref.h5", tmp_path / "ray.h5"
    api.featurize(target, folder, ref, quiet=True, **SETTINGS)
    summary = api.featurize(target, folder, out, quiet=True, ray=ray_cluster.address, workers=2, **SETTINGS)
    assert summary.ray["ort_threads"] == 1  # --threads unset: the driver's own setting, AUDIT_THREADS here
    _assert_same_store(out, ref)


def test_features_with_a_reference_on_ray_equal_one_machine(ray_cluster, tiny_world, tiny_export, folder,
                                                           monkeypatch, tmp_path):
    """`--reference` on Ray, the reference a compiled export: every worker loads it beside the target, and the
    store (the ``ref_`` features and the reference in the manifest included) is the one-machine store, bit for
    bit."""
    monkeypatch.setenv("AUDIT_THREADS", "1")
    settings = dict(SETTINGS, reference=str(tiny_export["path"]))
    ref, out = tmp_path / "ref.h5", tmp_path / "ray.h5"
    with one_thread():
        api.featurize(str(tiny_world["target"]), folder, ref, quiet=True, **_models(tiny_world), **settings)
    summary = api.featurize(str(tiny_world["target"]), folder, out, quiet=True, ray=ray_cluster.address, workers=2,
                            threads=1, **_models(tiny_world), **settings)
    assert summary.unet_evaluations_per_query == {"black-box": 4}  # both models' generations
    got, want = FeatureStore.open(out), FeatureStore.open(ref)
    assert got.keys == want.keys and "ref_gen_pixels" in got.keys
    a, b = got.read(ok_only=False), want.read(ok_only=False)
    for key in got.keys:
        assert np.array_equal(a[key], b[key]), key
    assert got.reference is not None and got.reference == want.reference
    assert {k: v for k, v in got.manifest.items() if k != "created"} == \
        {k: v for k, v in want.manifest.items() if k != "created"}


def test_a_worker_with_other_weights_stops_the_run_naming_both_nodes():
    """Every result names the models that computed it; one node with a stale copy ends the run (one machine
    cannot hold two copies at one path, so the results are written as two nodes would send them)."""
    from audit.cluster.ray_driver import ClusterConfig, ClusterRun
    from audit.cluster.workers import WorkerSpec

    run = ClusterRun(None, ClusterConfig(), WorkerSpec(kind="features", target="/models/t"), "identities")
    ids = {"target": {"name": "t", "hash": "aaaa"}, "embedder": {"name": "e", "hash": "bbbb"}}
    run._record({"node": "n1 (node 1)", "pid": 1, "peak_rss_mib": 900.0, "identities": ids})
    run._record({"node": "n1 (node 1)", "pid": 1, "peak_rss_mib": 950.0, "identities": ids})
    with pytest.raises(ClusterError, match=r"the worker on n2 \(node 2\) has another target than the one on n1 "
                                           r"\(node 1\) \(.*'cccc'.* vs .*'aaaa'.*\)"):
        run._record({"node": "n2 (node 2)", "pid": 2, "peak_rss_mib": 900.0,
                     "identities": {**ids, "target": {"name": "t", "hash": "cccc"}}})
    assert run.describe()["worker_stats"] == [{"node": "n1 (node 1)", "pid": 1, "batches": 2, "peak_rss_mib": 950.0}]


def test_graybox_features_on_ray_equal_one_machine(ray_cluster, tiny_world, folder, tmp_path):
    """Every tier in one store: the workers' gray-box errors and variation distances are the one-machine ones, bit
    for bit."""
    settings = dict(SETTINGS, tier="all", graybox_timesteps=(100, 300), var_strengths=(0.5,), n_var=2)
    ref, out = tmp_path / "ref.h5", tmp_path / "ray.h5"
    with one_thread():
        api.featurize(str(tiny_world["target"]), folder, ref, quiet=True, **_models(tiny_world), **settings)
    summary = api.featurize(str(tiny_world["target"]), folder, out, quiet=True, ray=ray_cluster.address, workers=2,
                            threads=1, **_models(tiny_world), **settings)
    assert summary.tiers == ["black-box", "gray-box", "variation"]
    assert summary.unet_evaluations_per_query == {"black-box": 2, "gray-box": 16, "variation": 2}
    got, want = FeatureStore.open(out), FeatureStore.open(ref)
    assert got.tiers == want.tiers == ("black-box", "gray-box", "variation") and got.keys == want.keys
    a, b = got.read(ok_only=False), want.read(ok_only=False)
    for key in got.keys:
        assert np.array_equal(a[key], b[key]), key
    assert (a["graybox_pia"][a["status"] == "ok"] > 0).all() and (a["var_pixel_dist"][a["status"] == "ok"] > 0).all()
    assert {k: v for k, v in got.manifest.items() if k != "created"} == \
        {k: v for k, v in want.manifest.items() if k != "created"}
