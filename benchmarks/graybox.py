"""Seconds per verdict: gray-box attacks (loss, PIA, SecMI) vs black-box attack IV, side by side in one run.

A verdict costs the features its attack reads (the head on them takes well under a millisecond, measured below):
for IV, the whole black-box tier (``n_gen`` images generated in ``steps`` DDIM steps per query, each captioned by
BLIP, query and generated images and captions embedded by CLIP); for a gray-box attack, the VAE encoding of the
query, its caption's text conditioning and the attack's UNet evaluations (plus the query-side embeddings of the
blind baseline). Each is timed through ``features.compute.featurize_rows``, the function ``audit features``,
``check`` and ``scan`` use, on the same queries, alternating tiers within each round (this machine's speed drifts
by tens of percent within seconds), after a warm-up of each; the table gives the median over rounds of seconds per
query and of the per-round ratio to IV.

Parts:
- toy (default): the bundled toy target at the study's settings (n_gen 2, 25 steps, no guidance), on the compiled
  runtime (its export is made once and cached under /tmp/audit-bench) or ``--runtime torch``. With ``--aux N`` the
  same run also featurises N members + N non-members of the toy world with both tiers, trains IV's head and every
  gray-box attack's and reports test AUCs on one split (same ids, same seed).
- ``--fullsize``: SD-1.5's architecture with random weights (``audit.testing.fullsize``; or ``--fullsize-dir DIR``,
  a diffusers folder of it): time only, on the torch path (exporting it takes ~15 min and 8 GiB), a few queries.
  It needs ~12 GB of free memory. Never read attack results off random weights: none are computed here.

    python benchmarks/graybox.py --aux 100 --json graybox.json
    python benchmarks/graybox.py --skip-toy --fullsize --fullsize-queries 1 --rounds 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

GRAY = ("loss", "PIA", "SecMI")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(images, captions):
    from audit.imagefolder import Row

    return [Row(id=f"q{i:05d}", path=f"q{i:05d}.png", caption=c) for i, c in enumerate(captions)], dict(
        enumerate(images))


def _configs(args):
    from audit.features.compute import FeaturesConfig

    common = dict(n_gen=args.n_gen, steps=args.steps, seed=0, batch_size=args.batch_size,
                  caption_tokens=args.caption_tokens, graybox_timesteps=tuple(args.timesteps))
    return (FeaturesConfig(tier="black-box", **common).validate(), FeaturesConfig(tier="gray-box", **common).validate())


def _variants(args):
    """(label, tier config, gray-box attacks computed, attacks whose verdict it gives)."""
    from audit.features.graybox import unet_evaluations

    black, gray = _configs(args)
    k = len(args.timesteps)
    out = [("black-box", black, (), "IV (any black-box attack)", args.n_gen * args.steps)]
    out.append(("gray-box, all three", gray, GRAY, "loss, PIA, SecMI (+ -score forms)", unet_evaluations(GRAY, k)))
    out += [(f"gray-box, {a} only", gray, (a,), f"{a}, {a}-score", unet_evaluations((a,), k)) for a in GRAY]
    return out


def time_tiers(models, images, captions, args, label: str, warmup: bool = True) -> dict:
    """Alternating rounds over the same queries; per variant the median seconds per query and ratio to IV.
    ``warmup`` first runs each variant once on 2 queries (at full size a UNet call dwarfs any first-call cost)."""
    from audit.features.compute import featurize_rows

    variants = _variants(args)

    def run(cfg, attacks, n):
        rows, imgs = _rows(images[:n], captions[:n])
        t = time.perf_counter()
        for start in range(0, n, cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            featurize_rows(chunk, models, cfg, {i: imgs[start + i] for i in range(len(chunk))},
                           graybox_attacks=attacks)
        assert all(r.ok for r in rows), [r.error for r in rows if not r.ok]
        return (time.perf_counter() - t) / n

    for _, cfg, attacks, _, _ in variants if warmup else ():  # warm-up: sessions, arenas, caches
        run(cfg, attacks, min(2, len(images)))
    per = {v[0]: [] for v in variants}
    for r in range(args.rounds):
        for name, cfg, attacks, _, _ in variants:
            per[name].append(run(cfg, attacks, len(images)))
        ratios = ", ".join(f"{n} {per['black-box'][-1] / per[n][-1]:.1f}x" for n in per if n != "black-box")
        print(f"[{label}] round {r + 1}: black-box {per['black-box'][-1]:.3f} s/query; IV/gray-box: {ratios}",
              flush=True)
    table = {}
    for name, cfg, attacks, verdicts, evals in variants:
        ratios = [b / g for b, g in zip(per["black-box"], per[name])]
        table[name] = {"verdicts": verdicts, "unet_evaluations_per_query": evals,
                       "seconds_per_query": statistics.median(per[name]), "all_rounds": per[name],
                       "iv_over_this": statistics.median(ratios)}
    return table


def print_table(table: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"| features | verdicts of | UNet evaluations / query | s / verdict (median) | IV / this |")
    print("|---|---|---|---|---|")
    for name, t in table.items():
        print(f"| {name} | {t['verdicts']} | {t['unet_evaluations_per_query']} | {t['seconds_per_query']:.3f} | "
              f"{t['iv_over_this']:.1f}x |")
    print("With `--reference` (calibration against a base model) every row costs about twice this: the same features "
          "are computed on the reference with the same seeds and noise.")


def toy_models(args):
    from audit.features.compute import Models
    from audit.toy import BUNDLE

    if args.runtime == "torch":
        return Models.load("toy", graybox=True), "toy (torch)"
    export = Path(args.export) if args.export else _sibling("runtime")._ensure_export(BUNDLE, None)[0]
    return Models.load(str(export), graybox=True), f"toy export {export} (onnxruntime)"


def toy_auc(models, args) -> dict:
    """Both tiers on N + N toy aux rows, heads trained and evaluated on one split: IV vs the gray-box attacks."""
    with tempfile.TemporaryDirectory(prefix="graybox-bench-") as tmp:
        return _toy_auc(models, args, Path(tmp))


def _toy_auc(models, args, work: Path) -> dict:
    from audit import api
    from audit.attacks import evaluate_heads, load_heads
    from audit.features.compute import compute_store
    from audit.features.store import FeatureStore

    aux = api.toy_aux_data(work / "aux", args.aux, args.aux, seed=args.aux_seed)
    out = {}
    for cfg in _configs(args):
        tier = cfg.tier
        store = work / f"{tier}.h5"
        summary = compute_store(aux, store, models, cfg, quiet=True)
        heads = work / f"heads-{tier}"
        # IV against every gray-box attack (IV's own inputs are the other semantic attacks' together).
        attacks = "IV" if tier == "black-box" else "all"
        # One split (the heads the documented figures were measured with; one ONNX member per head to time).
        api.train(store, heads, attacks=attacks, register=False, quiet=True, epochs=args.epochs, folds=0)
        h = load_heads(heads)
        fs = FeatureStore.open(store)
        batch = fs.read()
        t = time.perf_counter()
        for _ in range(10):
            h.predict(batch, [h.default_attack])
        head_ms = (time.perf_counter() - t) / 10 / len(batch["ids"]) * 1e3
        ev = evaluate_heads(batch, h, fs.manifest, str(store), n_boot=200)
        out[tier] = {"store_seconds_per_row": summary["seconds"] / summary["rows"],
                     "head_ms_per_row": head_ms, "default_attack": h.default_attack,
                     "auc": {a: m["auc"] for a, m in ev["attacks"].items()}, "n_test": ev["n_test"]}
    return out


def fullsize(args) -> dict:
    import numpy as np

    from audit.features.compute import Models

    from audit.testing import fullsize as fs

    if args.fullsize_dir:
        target = Path(args.fullsize_dir)
        embedder = args.fullsize_embedder or str(fs.cached("clip-vit-l-14"))
        captioner = args.fullsize_captioner or str(fs.cached("blip-base"))
    else:
        w = fs.world("sd-1.5", tiny=args.fullsize_tiny)
        target, embedder, captioner = w["target"], str(w["embedder"]), str(w["captioner"])
    t = time.perf_counter()
    models = Models.load(str(target), embedder, captioner, graybox=True)
    print(f"[full-size] loaded {target} in {time.perf_counter() - t:.0f} s (random weights: time only)", flush=True)
    r = models.generator.resolution
    rng = np.random.default_rng(0)
    n = args.fullsize_queries
    images = rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8)
    captions = [f"a photograph of a red bicycle leaning on a wall, number {i}" for i in range(n)]
    return time_tiers(models, images, captions, args, "full-size SD-1.5", warmup=False)


def main() -> None:
    from audit.features.graybox import DEFAULT_TIMESTEPS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=16, help="toy queries timed per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="captions per featurize call (the CLI default)")
    p.add_argument("--n-gen", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--caption-tokens", type=int, default=30)
    p.add_argument("--timesteps", type=lambda s: [int(v) for v in s.split(",")], default=list(DEFAULT_TIMESTEPS))
    p.add_argument("--runtime", choices=("onnx", "torch"), default="onnx")
    p.add_argument("--export", help="an `audit export` folder of the bundled toy world (default: made and cached)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--aux", type=int, default=0, help="toy AUC part: N members + N non-members (0: skip)")
    p.add_argument("--aux-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=60, help="head training epochs in the AUC part (the study's)")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--fullsize", action="store_true", help="also time SD-1.5's architecture (random weights)")
    p.add_argument("--fullsize-dir", help="a diffusers folder with SD-1.5's architecture (default: built/cached)")
    p.add_argument("--fullsize-embedder", default="", help="with --fullsize-dir: CLIP folder (default: the cached "
                   "random-weight ViT-L/14)")
    p.add_argument("--fullsize-captioner", default="", help="with --fullsize-dir: BLIP folder (default: the cached "
                   "random-weight BLIP base)")
    p.add_argument("--fullsize-queries", type=int, default=1)
    p.add_argument("--fullsize-tiny", action="store_true", help="the same architecture at toy sizes (tests)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from audit.progress import silence_libraries
    from audit.toy import scenes

    silence_libraries()
    torch.set_num_threads(args.threads)
    result = {"settings": {k: v for k, v in vars(args).items()}, "load_before": os.getloadavg()}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; n_gen {args.n_gen}, {args.steps} "
          f"steps; gray-box timesteps {args.timesteps}", flush=True)
    if not args.skip_toy:
        models, where = toy_models(args)
        images, captions = scenes.scene_images(0, "heldout", args.queries)
        result["toy"] = time_tiers(models, images, captions, args, "toy")
        print_table(result["toy"], f"toy target, {where}: {args.queries} queries x {args.rounds} rounds")
        if args.aux:
            result["toy_auc"] = toy_auc(models, args)
            for tier, r in result["toy_auc"].items():
                aucs = ", ".join(f"{a} {m['value']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
                                 for a, m in r["auc"].items())
                print(f"[toy AUC, {tier}] {r['n_test']} test rows: {aucs}; store {r['store_seconds_per_row']:.3f} "
                      f"s/row, head {r['head_ms_per_row']:.3f} ms/row ({r['default_attack']})")
    if args.fullsize:
        result["fullsize"] = fullsize(args)
        print_table(result["fullsize"], f"full-size SD-1.5 architecture, RANDOM WEIGHTS (time only), torch path: "
                                        f"{args.fullsize_queries} queries x {args.rounds} rounds")
    result["load_after"] = os.getloadavg()
    print(f"\nload average {os.getloadavg()[0]:.2f} after")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
