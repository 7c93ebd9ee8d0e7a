"""Seconds and UNet evaluations per verdict: the variation tier (var-pixel, var-clip, var-all) vs black-box IV, and
the gray-box tier beside them, on the same queries in alternating rounds.

A verdict costs the features its attack reads: for IV the whole black-box tier (``n_gen`` generations of ``steps``
DDIM steps, their captions and embeddings), for a variation attack ``n_var`` variations at each strength of the
sweep (the last ``int(strength x steps)`` steps each, from the query's VAE latents) and their embeddings, for a
gray-box attack its UNet evaluations of the query. Each is timed through ``features.compute.featurize_rows``, the
function ``features``, ``check`` and ``scan`` use, after one warm-up each; the table gives the median over rounds of
seconds per query and of the per-round ratio to IV.

- toy (default): the bundled toy target, torch path (``--backend onnx``: an ``audit export`` of it, ``--export``).
- ``--fullsize``: SD-1.5's architecture with random weights (``audit.testing.fullsize``): time only, torch path,
  ``--fullsize-queries`` queries, one round. Never read attack results off random weights.

    python benchmarks/variation.py --json variation.json
    python benchmarks/variation.py --skip-toy --fullsize --fullsize-queries 1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _configs(args) -> list[tuple[str, object, str]]:
    """(label, FeaturesConfig, verdicts it gives), IV first."""
    from audit.features.compute import FeaturesConfig

    common = dict(n_gen=args.n_gen, steps=args.steps, seed=0, batch_size=args.batch_size,
                  caption_tokens=args.caption_tokens, var_strengths=tuple(args.strengths), n_var=args.n_var)
    return [("black-box", FeaturesConfig(tier="black-box", **common).validate(), "IV (any black-box attack)"),
            ("variation", FeaturesConfig(tier="variation", **common).validate(), "var-pixel, var-clip, var-all"),
            ("gray-box", FeaturesConfig(tier="gray-box", **common).validate(), "loss, PIA, SecMI, CLiD")]


def time_tiers(models, images, captions, args, label: str, warmup: bool = True) -> dict:
    from audit.features.compute import featurize_rows
    from audit.imagefolder import Row

    configs = _configs(args)

    def run(cfg, n):
        rows = [Row(id=f"q{i:05d}", path=f"q{i:05d}.png", caption=c) for i, c in enumerate(captions[:n])]
        t = time.perf_counter()
        for start in range(0, n, cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            featurize_rows(chunk, models, cfg, {i: images[start + i] for i in range(len(chunk))})
        assert all(r.ok for r in rows), [r.error for r in rows if not r.ok]
        return (time.perf_counter() - t) / n

    for _, cfg, _ in configs if warmup else ():
        run(cfg, min(2, len(images)))
    per = {name: [] for name, _, _ in configs}
    for r in range(args.rounds):
        for name, cfg, _ in configs:
            per[name].append(run(cfg, len(images)))
        print(f"[{label}] round {r + 1}: " + ", ".join(f"{n} {v[-1]:.3f} s/query" for n, v in per.items()),
              flush=True)
    table = {}
    for name, cfg, verdicts in configs:
        table[name] = {"verdicts": verdicts, "unet_evaluations_per_query": cfg.unet_evaluations()[cfg.tiers[0]],
                       "seconds_per_query": statistics.median(per[name]), "all_rounds": per[name],
                       "iv_over_this": statistics.median(b / v for b, v in zip(per["black-box"], per[name]))}
    return table


def print_table(table: dict, title: str) -> None:
    print(f"\n{title}")
    print("| features | verdicts of | UNet evaluations / query | s / verdict (median) | IV / this |")
    print("|---|---|---|---|---|")
    for name, t in table.items():
        print(f"| {name} | {t['verdicts']} | {t['unet_evaluations_per_query']} | {t['seconds_per_query']:.3f} | "
              f"{t['iv_over_this']:.2f}x |")


def toy(args) -> dict:
    from audit.features.compute import Models
    from audit.toy import scenes

    target = args.export if args.backend == "onnx" else "toy"
    if args.backend == "onnx" and not args.export:
        raise SystemExit("--backend onnx needs --export DIR (an `audit export --target toy` folder)")
    models = Models.load(target, graybox=True)
    images, captions = scenes.scene_images(7, "members", args.queries)
    return time_tiers(models, list(images), captions, args, f"toy ({args.backend})")


def fullsize(args) -> dict:
    import numpy as np

    from audit.features.compute import Models
    from audit.testing import fullsize as fs

    w = fs.world("sd-1.5", tiny=args.fullsize_tiny)
    t = time.perf_counter()
    models = Models.load(str(w["target"]), str(w["embedder"]), str(w["captioner"]), graybox=True)
    print(f"[full-size] loaded in {time.perf_counter() - t:.0f} s (random weights: time only)", flush=True)
    r = models.generator.resolution
    n = args.fullsize_queries
    images = list(np.random.default_rng(0).integers(0, 256, (n, r, r, 3), dtype=np.uint8))
    captions = [f"a photograph of a red bicycle leaning on a wall, number {i}" for i in range(n)]
    return time_tiers(models, images, captions, args, "full-size SD-1.5", warmup=False)


def main(argv=None) -> dict:
    from audit.features.variation import DEFAULT_N_VAR, DEFAULT_STRENGTHS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-gen", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--caption-tokens", type=int, default=30)
    p.add_argument("--strengths", type=lambda s: [float(v) for v in s.split(",")], default=list(DEFAULT_STRENGTHS))
    p.add_argument("--n-var", type=int, default=DEFAULT_N_VAR)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--export", help="an `audit export --target toy` folder (--backend onnx)")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--fullsize", action="store_true")
    p.add_argument("--fullsize-queries", type=int, default=1)
    p.add_argument("--fullsize-tiny", action="store_true", help=argparse.SUPPRESS)  # tests: the tiny stand-in
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = {"settings": {k: v for k, v in vars(args).items() if k != "json" and not isinstance(v, Path)}}
    if not args.skip_toy:
        out["toy"] = toy(args)
        print_table(out["toy"], f"toy target ({args.backend}), {args.queries} queries, {args.rounds} rounds")
    if args.fullsize:
        out["fullsize"] = fullsize(args)
        print_table(out["fullsize"], "SD-1.5 architecture, random weights (torch): time only")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
