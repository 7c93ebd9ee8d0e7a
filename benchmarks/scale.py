"""Scale-out cost: `audit features` as one process vs on Ray with 1 and 2 workers, side by side in one run.

Each variant is the real command (`audit features ... --json`) in its own subprocess, on the same toy queries and
settings, in this order: one process at 1 thread (the Ray workers' setting), `--ray ADDRESS --workers 1 --threads
1`, `--ray ADDRESS --workers 2 --threads 1` (ADDRESS `local`: each Ray run starts and stops its own private
cluster, as a user's command does), and with `--default-threads` one process at this machine's default threads.
Per variant: the command's wall time, rows featurised per second once the models are loaded (Ray: after the first
batch came back, when every actor has loaded), peak RSS of the driver process and of each worker. Then Ray's
overhead per row against one process at the same thread count, and the ratios, all from this run. Every store is
compared with the 1-thread one-process store (the same bits, or how far apart).

    python benchmarks/scale.py                               # bundled toy target, 48 toy queries
    python benchmarks/scale.py --world DIR --queries 8 --steps 2 --n-gen 1 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (extra CLI options, environment)
    "one process, 1 thread": ([], {"OMP_NUM_THREADS": "1", "AUDIT_THREADS": "1"}),
    "ray, 1 worker x 1 thread": (["--workers", "1", "--threads", "1"], {}),
    "ray, 2 workers x 1 thread": (["--workers", "2", "--threads", "1"], {}),
}
DEFAULT_THREADS = "one process, default threads"  # --default-threads: how far another thread count moves outputs


def child(argv: list[str], peak_file: str) -> None:
    """Run the CLI in this process, then record this process's peak RSS (the driver's, on Ray)."""
    from audit.cli import app

    try:
        app(argv, standalone_mode=False)
    finally:
        Path(peak_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _queries(folder: Path, n: int) -> Path:
    from audit.toy import scenes

    images, captions = scenes.scene_images(0, "heldout", n)
    return scenes.write_imagefolder(folder, images, captions)


def _run(name: str, args, data: Path, tmp: Path) -> dict:
    extra, env_extra = VARIANTS[name]
    out = tmp / f"variant{list(VARIANTS).index(name)}.h5"
    models = [] if args.world is None else ["--embedder", str(args.world / "clip"), "--captioner",
                                            str(args.world / "blip")]
    target = args.target if args.world is None else str(args.world / "target")
    argv = ["features", "--target", target, *models, "--data", str(data), "--out", str(out), "--n-gen",
            str(args.n_gen), "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--quiet", "--json",
            *(["--ray", args.ray] if name.startswith("ray") else []), *extra]
    peak = tmp / "peak.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **env_extra}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(peak), "--", *argv], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    ray = summary.get("ray")
    rows = summary["rows"]
    if ray:  # steady state: the rows after the first batch, over the time after it
        steady_rows, steady_s = rows - min(rows, args.batch_size), summary["seconds"] - ray["first_batch_seconds"]
        workers = sorted(w["peak_rss_mib"] for w in ray["worker_stats"])
    else:
        steady_rows, steady_s, workers = rows, summary["seconds"], []
    return {"wall_s": round(wall, 2), "featurise_s": summary["seconds"],
            "rows_per_s": steady_rows / steady_s if steady_s > 0 and steady_rows else float("nan"),
            "driver_peak_rss_mib": round(float(peak.read_text()), 1), "worker_peak_rss_mib": workers,
            "first_batch_s": ray["first_batch_seconds"] if ray else None, "store": str(out)}


def _compare(a: str, b: str) -> dict:
    """Whether two stores are the same bits, and how far apart their generated pixels and embeddings are."""
    import numpy as np

    from audit.features.store import KEYS, FeatureStore

    x, y = FeatureStore.open(a).read(ok_only=False), FeatureStore.open(b).read(ok_only=False)
    emb = ("query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb")
    return {"same_bits": all(np.array_equal(x[k], y[k]) for k in KEYS),
            "pixels_max_abs_uint8": int(np.abs(x["gen_pixels"].astype(int) - y["gen_pixels"].astype(int)).max()),
            "embeddings_max_abs": float(max(np.abs(x[k] - y[k]).max() for k in emb)),
            "gen_captions_equal": bool(np.array_equal(x["gen_captions"], y["gen_captions"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="toy", help="target of the runs (default: the bundled toy target)")
    p.add_argument("--world", type=Path, help="folder with target/, clip/, blip/ instead of --target")
    p.add_argument("--ray", default="local", help="Ray address of the Ray runs (default: a private local cluster)")
    p.add_argument("--queries", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4, help="captions per batch: the unit a worker computes")
    p.add_argument("--n-gen", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--default-threads", action="store_true", help="also run one process at this machine's default "
                   "threads, and say how far its outputs are from the 1-thread run's")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(rest[1:] if rest[:1] == ["--"] else rest, args.child)

    load = os.getloadavg()[0]
    print(f"target {args.world or args.target}; {args.queries} queries, {args.batch_size} a batch, n_gen {args.n_gen}, "
          f"{args.steps} steps; Ray at {args.ray}; machine {os.cpu_count()} cores, load {load:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _queries(tmp / "queries", args.queries)
        (tmp / "stores").mkdir()
        if args.default_threads:
            VARIANTS[DEFAULT_THREADS] = ([], {})
        results = {name: _run(name, args, data, tmp / "stores") for name in VARIANTS}
        base = results["one process, 1 thread"]["store"]
        for r in results.values():
            r["vs_one_process_1_thread"] = _compare(r["store"], base)
        for r in results.values():
            r.pop("store")
    print(f"\n{'':32}{'wall s':>8}{'rows/s':>9}{'driver MiB':>12}{'workers MiB':>16}{'same store':>12}")
    for name, r in results.items():
        workers = ", ".join(f"{m:.0f}" for m in r["worker_peak_rss_mib"]) or "-"
        print(f"{name:32}{r['wall_s']:>8.1f}{r['rows_per_s']:>9.2f}{r['driver_peak_rss_mib']:>12.0f}{workers:>16}"
              f"{'yes' if r['vs_one_process_1_thread']['same_bits'] else 'NO':>12}")
    if DEFAULT_THREADS in results:
        d = results[DEFAULT_THREADS]["vs_one_process_1_thread"]
        print(f"at the default threads the store is {'the same bits' if d['same_bits'] else 'not the same bits'}: "
              f"generated pixels within {d['pixels_max_abs_uint8']} uint8 levels, embeddings within "
              f"{d['embeddings_max_abs']:.1e}, captions of generated images "
              f"{'equal' if d['gen_captions_equal'] else 'DIFFERENT'}")
    one, r1, r2 = (results[k] for k in ("one process, 1 thread", "ray, 1 worker x 1 thread",
                                        "ray, 2 workers x 1 thread"))
    overhead_ms = (1 / r1["rows_per_s"] - 1 / one["rows_per_s"]) * 1e3
    ratios = {"ray_1_worker_over_one_process": r1["rows_per_s"] / one["rows_per_s"],
              "ray_2_workers_over_one_process": r2["rows_per_s"] / one["rows_per_s"],
              "ray_2_workers_over_1_worker": r2["rows_per_s"] / r1["rows_per_s"],
              "ray_overhead_ms_per_row": overhead_ms,
              "ray_startup_s_1_worker": r1["wall_s"] - r1["featurise_s"] + r1["first_batch_s"]}
    print(f"\nRay's overhead per row (1 worker vs one process, both 1 thread): {overhead_ms:+.1f} ms "
          f"({ratios['ray_1_worker_over_one_process']:.2f}x the rows/s); 2 workers: "
          f"{ratios['ray_2_workers_over_one_process']:.2f}x one process, {ratios['ray_2_workers_over_1_worker']:.2f}x "
          f"1 worker. Before its first batch, a Ray command spent {ratios['ray_startup_s_1_worker']:.1f} s (cluster "
          f"start, actor start, model loading), one process {one['wall_s'] - one['featurise_s']:.1f} s (imports, "
          "model loading).")
    results["ratios"] = ratios
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("json", "child")}
    results["load_average"] = [load, os.getloadavg()[0]]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
