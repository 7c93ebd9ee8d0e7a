"""Scale-out cost: `audit features` as one process vs on Ray with 1 and 2 workers, side by side in one run.

Each variant is the real command (`audit features ... --json`) in its own subprocess, on the same toy queries and
settings, in this order: one process at 1 thread (the Ray workers' setting), `--ray ADDRESS --workers 1 --threads
1`, `--ray ADDRESS --workers 2 --threads 1` (ADDRESS `local`: each Ray run starts and stops its own private
cluster, as a user's command does), and with `--default-threads` one process at this machine's default threads.
Per variant (its fastest of `--repeats` interleaved rounds): the command's wall time, rows featurised per second
after the first batch (which, on Ray, waits for the actors to start and load the models), peak RSS of the driver
process and of each worker. Then, per round, Ray's overhead per row against one process at the same thread count
and the ratios (their medians over the rounds). Every store is compared with the 1-thread one-process store (the
same bits, or how far apart).

    python benchmarks/scale.py                               # bundled toy target, 48 toy queries
    python benchmarks/scale.py --world DIR --queries 8 --steps 2 --n-gen 1 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
        code = app(argv, standalone_mode=False)  # an error's exit code is returned, not raised, in this mode
    finally:
        Path(peak_file).write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    sys.exit(code if isinstance(code, int) else 0)


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
    # Steady state, the same for every variant: the rows after the first batch, over the time after it (the first
    # batch of a Ray run waits for its actors to start and load the models).
    rows, first = summary["rows"], summary["first_batch_seconds"]
    steady_rows, steady_s = rows - min(rows, args.batch_size), summary["seconds"] - first
    return {"wall_s": round(wall, 2), "featurise_s": summary["seconds"], "first_batch_s": first,
            "rows_per_s": steady_rows / steady_s if steady_s > 0 and steady_rows else float("nan"),
            "driver_peak_rss_mib": round(float(peak.read_text()), 1),
            "worker_peak_rss_mib": sorted(w["peak_rss_mib"] for w in ray["worker_stats"]) if ray else [],
            "store": str(out)}


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
    p.add_argument("--repeats", type=int, default=1, help="rounds of all variants, interleaved")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(rest[1:] if rest[:1] == ["--"] else rest, args.child)

    load = os.getloadavg()[0]
    print(f"target {args.world or args.target}; {args.queries} queries, {args.batch_size} a batch, n_gen {args.n_gen}, "
          f"{args.steps} steps; Ray at {args.ray}; {args.repeats} round(s); machine {os.cpu_count()} cores, load "
          f"{load:.1f}")
    if args.default_threads:
        VARIANTS[DEFAULT_THREADS] = ([], {})
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _queries(tmp / "queries", args.queries)
        (tmp / "stores").mkdir()
        for _ in range(args.repeats):  # interleaved: a change of the machine's load hits every variant
            runs = {name: _run(name, args, data, tmp / "stores") for name in VARIANTS}
            for r in runs.values():
                r["vs_one_process_1_thread"] = _compare(r["store"], runs["one process, 1 thread"]["store"])
            for r in runs.values():
                Path(r.pop("store")).unlink()
            rounds.append({"runs": runs, "ratios": _ratios(runs)})
    # Each variant's fastest run (the least disturbed on a shared machine); ratios only within a round.
    results = {name: max((r["runs"][name] for r in rounds), key=lambda x: x["rows_per_s"]) for name in VARIANTS}
    print(f"\n{'fastest of the rounds':32}{'wall s':>8}{'rows/s':>9}{'driver MiB':>12}{'workers MiB':>16}"
          f"{'same store':>12}")
    for name, r in results.items():
        workers = ", ".join(f"{m:.0f}" for m in r["worker_peak_rss_mib"]) or "-"
        print(f"{name:32}{r['wall_s']:>8.1f}{r['rows_per_s']:>9.2f}{r['driver_peak_rss_mib']:>12.0f}{workers:>16}"
              f"{'yes' if all(x['runs'][name]['vs_one_process_1_thread']['same_bits'] for x in rounds) else 'NO':>12}")
    if DEFAULT_THREADS in results:
        d = results[DEFAULT_THREADS]["vs_one_process_1_thread"]
        print(f"at the default threads the store is {'the same bits' if d['same_bits'] else 'not the same bits'}: "
              f"generated pixels within {d['pixels_max_abs_uint8']} uint8 levels, embeddings within "
              f"{d['embeddings_max_abs']:.1e}, captions of generated images "
              f"{'equal' if d['gen_captions_equal'] else 'DIFFERENT'}")
    print()
    for k, r in enumerate(rounds, 1):
        x = r["ratios"]
        print(f"round {k}: Ray's overhead per row (1 worker vs one process, both 1 thread) "
              f"{x['ray_overhead_ms_per_row']:+.1f} ms ({x['ray_1_worker_over_one_process']:.2f}x the rows/s); 2 "
              f"workers {x['ray_2_workers_over_one_process']:.2f}x one process, "
              f"{x['ray_2_workers_over_1_worker']:.2f}x "
              f"1 worker; before the first batch: Ray {x['before_first_batch_s_ray_1_worker']:.1f} s (cluster and "
              f"actor start, model loading), one process {x['before_first_batch_s_one_process']:.1f} s (imports, "
              "model loading)")
    if len(rounds) > 1:
        med = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]}
        print("medians over the rounds: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    results["rounds"] = rounds
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("json", "child")}
    results["load_average"] = [load, os.getloadavg()[0]]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _ratios(runs: dict) -> dict:
    one, r1, r2 = (runs[k] for k in ("one process, 1 thread", "ray, 1 worker x 1 thread", "ray, 2 workers x 1 thread"))

    def before_first(r):  # process start to the first committed batch
        return r["wall_s"] - r["featurise_s"] + r["first_batch_s"]

    return {"ray_overhead_ms_per_row": (1 / r1["rows_per_s"] - 1 / one["rows_per_s"]) * 1e3,
            "ray_1_worker_over_one_process": r1["rows_per_s"] / one["rows_per_s"],
            "ray_2_workers_over_one_process": r2["rows_per_s"] / one["rows_per_s"],
            "ray_2_workers_over_1_worker": r2["rows_per_s"] / r1["rows_per_s"],
            "before_first_batch_s_ray_1_worker": before_first(r1),
            "before_first_batch_s_one_process": before_first(one)}

if __name__ == "__main__":
    main()
