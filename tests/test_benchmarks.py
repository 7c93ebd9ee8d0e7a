"""benchmarks/runtime.py and benchmarks/graybox.py run end to end (tiny models, a few queries): the scripts the
README's speed figures come from must not rot. Their figures themselves are not asserted: speed is measured by
running them, not by tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime.py"
GRAYBOX = SCRIPT.with_name("graybox.py")


def test_runtime_benchmark_runs_both_paths_side_by_side(tiny_world, tiny_export, tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    for name in ("target", "clip", "blip"):
        (world / name).symlink_to(tiny_world[name], target_is_directory=True)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--world", str(world), "--export", str(tiny_export["path"]),
                           "--queries", "4", "--batch-size", "2", "--steps", "2", "--repeats", "2", "--passes", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for path in ("eager", "runtime", "runtime-lowmem", "runtime-1session"):
        assert result[path]["queries_per_s"] > 0 and result[path]["peak_rss_work_mib"] > 0
        assert len(result["all_runs"][path]) == 2
    # The two paths computed the same thing: images from the same seeds within the runtime's stated tolerance.
    assert result["agreement"]["images_max_abs_uint8"] <= 2
    assert len(result["same_round_ratios"]) == 2 and "median" in proc.stdout
    assert result["flops"]["unet_gflop_per_call"] > 0 and 0 < result["flops"]["unet_onnx_fraction"]


def test_graybox_benchmark_times_both_tiers_and_reports_aucs(tiny_export, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "AUDIT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(GRAYBOX), "--export", str(tiny_export["path"]), "--queries", "2",
                           "--rounds", "2", "--steps", "2", "--timesteps", "100,300", "--aux", "6", "--epochs", "2",
                           "--fullsize", "--fullsize-tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for part in ("toy", "fullsize"):
        table = result[part]
        assert table["black-box"]["unet_evaluations_per_query"] == 2 * 2
        assert table["gray-box, all three"]["unet_evaluations_per_query"] == 3 * 2 + 1
        assert all(len(t["all_rounds"]) == 2 and t["seconds_per_query"] > 0 for t in table.values())
    assert set(result["toy_auc"]["black-box"]["auc"]) == {"IV", "blind"}
    assert set(result["toy_auc"]["gray-box"]["auc"]) >= {"PIA", "PIA-score", "SecMI", "loss", "blind"}
    assert "RANDOM WEIGHTS (time only)" in proc.stdout and "| gray-box, PIA only |" in proc.stdout


def test_verdict_budget_benchmark_runs_on_a_store(tmp_path):
    """benchmarks/verdict_budget.py (the source of docs/verdicts.md's marginal-FPR table) runs end to end."""
    from attacks_data import planted_batch, write_store

    store = write_store(planted_batch(24, 24, seed=4), tmp_path / "store.h5")
    out = tmp_path / "budget.json"
    script = SCRIPT.parent / "verdict_budget.py"
    proc = subprocess.run([sys.executable, str(script), str(store), "--seeds", "2", "--budgets", "0.2,0.5",
                           "--folds", "0,2", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["splits"] == 2 and result["calibration"] == {"0": {"members": 6, "nonmembers": 6},
                                                                "2": {"members": 18, "nonmembers": 18}}
    rows = {(r["folds"], r["attack"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {(k, a, b) for k in (0, 2) for a in ("II-S", "blind") for b in (0.2, 0.5)}
    # 6 validation non-members: at 0.2 k = 0, nominal 1/7; at 0.5 k = 2, nominal 3/7. Cross-fitted: 18 out of fold.
    assert rows[0, "II-S", 0.2]["nominal"] == pytest.approx(1 / 7)
    assert rows[0, "II-S", 0.5]["nominal"] == pytest.approx(3 / 7)
    assert rows[2, "II-S", 0.2]["nominal"] == pytest.approx(3 / 19)
    assert all(0 <= r["fpr_mean"] <= 1 and r["splits"] == 2 for r in rows.values())


SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def test_scale_benchmark_runs_one_process_and_private_ray_clusters_side_by_side(tiny_world, tmp_path):
    """benchmarks/scale.py on tiny settings, with `--ray local`: each Ray run starts and stops its own cluster."""
    world = tmp_path / "world"
    world.mkdir()
    for name in ("target", "clip", "blip"):
        (world / name).symlink_to(tiny_world[name], target_is_directory=True)
    out = tmp_path / "scale.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SCALE), "--world", str(world), "--queries", "8", "--batch-size", "2",
                           "--steps", "2", "--n-gen", "1", "--json", str(out)], capture_output=True, text=True,
                          timeout=900, env={**env, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("one process, 1 thread", "ray, 1 worker x 1 thread", "ray, 2 workers x 1 thread"):
        r = result[name]
        assert r["rows_per_s"] > 0 and r["driver_peak_rss_mib"] > 0
        assert r["vs_one_process_1_thread"]["same_bits"], name  # the Ray stores are the one-process store
    # Workers report with their batches: on these few fast batches the first actor up may compute them all.
    assert 1 <= len(result["ray, 2 workers x 1 thread"]["worker_peak_rss_mib"]) <= 2
    assert "Ray's overhead per row" in proc.stdout and "ray_overhead_ms_per_row" in result["rounds"][0]["ratios"]


REALSIZE = Path(__file__).resolve().parents[1] / "benchmarks" / "realsize.py"


def test_realsize_benchmark_runs_both_paths_on_the_fullsize_builders(tmp_path):
    """benchmarks/realsize.py end to end with the full-size architectures at toy sizes (--tiny): the same builders,
    export, workers and report as at full size, in minutes."""
    import os

    out = tmp_path / "real.json"
    env = dict(os.environ, AUDIT_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, str(REALSIZE), "--tiny", "--targets", "sd-1.5", "--queries", "2",
                           "--steps", "2", "--caption-tokens", "4", "--cache", str(tmp_path / "cache"), "--profile",
                           "--json", str(out), "--markdown"], capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["sd-1.5"]
    for path in ("eager", "runtime"):
        assert r[path]["seconds_per_query"] > 0 and r[path]["peak_rss_work_mib"] > 0
        peak = r[path]["peak_call"]  # the timed call during which the featurising peak was reached
        assert peak["call"] in r[path]["calls"] and peak["rss_before_mib"] <= peak["peak_mib"]
        assert peak["peak_mib"] <= r[path]["peak_rss_work_mib"]
    assert {"target/unet", "target/vae_decoder", "captioner/decoder_step"} <= set(r["runtime"]["calls"])
    assert {"unet", "vae_decoder", "blip_decoder_step"} <= set(r["eager"]["calls"])
    assert r["agreement"]["images_max_abs_uint8"] <= 2
    assert r["export"]["export_seconds"] > 0 and r["export"]["export_peak_rss_mib"] > 0
    assert r["flops"]["unet_gflop_per_image"] > 0 and "MultiHeadAttention" in r["profile"]["unet"]["by_op"]
    assert "seconds per query" in proc.stdout and "eager/runtime" in proc.stdout
    assert "peak RSS featurising, runtime: during " in proc.stdout
    # rows per call are recorded, so per-image figures hold whatever each path batches
    assert r["eager"]["calls"]["unet"]["rows_per_call"] == 4  # 2 captions x n_gen 2, unguided
    assert 1 <= r["runtime"]["calls"]["target/unet"]["rows_per_call"] <= 4
    # the docs' tables: printed after the run, and the same again from the saved JSON alone
    again = subprocess.run([sys.executable, str(REALSIZE), "--from-json", str(out)], capture_output=True, text=True,
                           timeout=120, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "| seconds per query |" in again.stdout and "| Stable Diffusion 1.5, 512 px |" in again.stdout
    assert proc.stdout.endswith(again.stdout)


def test_startup_benchmark_loads_an_export_both_ways(tiny_export, tmp_path):
    out, home = tmp_path / "startup.json", tmp_path / "home"
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("startup.py")), "--export", str(tiny_export["path"]),
                           "--rounds", "1", "--home", str(home), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["loads"]] == ["save", "cold", "saved"]
    graphs = set(result["loads"][0]["per_graph_s"])
    assert {"target/unet", "embedder/image_encoder", "captioner/decoder_step"} <= graphs
    assert all(set(r["per_graph_s"]) == graphs for r in result["loads"])
    # The save round wrote one entry per graph, which the saved round read.
    entries = [p for p in (home / "ort-optimized").iterdir() if not p.name.startswith(".")]
    assert len(entries) == len(graphs) and "from the saved graph" in proc.stdout
