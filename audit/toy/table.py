"""Print the README's toy-world table from a world folder's world.json (numbers come from the build itself).

    python -m audit.toy.table [WORLD_DIR] [--remeasure]

``--remeasure`` also recomputes the member/non-member gap on this machine's CPU from the saved models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import BUNDLE


def table(world: dict, cpu_gap: dict | None = None) -> str:
    m, cfg = world["metrics"], world["config"]
    gap = m["membership_gap"]
    rows = [
        ("members / non-members measured", f"{gap['n_members']} / {gap['n_nonmembers']} (same distribution)"),
        ("pixel MSE real vs generated, members (mean)", f"{gap['member_mse_mean']:.4f}"),
        ("pixel MSE real vs generated, non-members (mean)", f"{gap['nonmember_mse_mean']:.4f}"),
        ("AUC of that single score (no training)", f"{gap['auc']:.3f}"),
    ]
    if cpu_gap:
        rows.append(("same, re-measured on CPU (MSE m / n, AUC)",
                     f"{cpu_gap['member_mse_mean']:.4f} / {cpu_gap['nonmember_mse_mean']:.4f}, {cpu_gap['auc']:.3f}"))
    rows += [
        (f"CLIP text→image top-1, {cfg['n_heldout']} held-out scenes",
         f"{m['clip_text_to_image_top1_heldout']:.3f} (chance {m['clip_top1_chance']:.3f})"),
        ("BLIP next-token accuracy, held-out captions", f"{m['blip_token_accuracy_heldout']:.3f}"),
        ("build time", f"{world['build_seconds']:.0f} s on {world['device']} (torch {world['torch']})"),
        ("generation for the gap", f"{gap['denoising_steps']} DDIM steps, no guidance, 1 image per caption"),
    ]
    lines = ["| measurement | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", nargs="?", default=str(BUNDLE))
    parser.add_argument("--remeasure", action="store_true")
    args = parser.parse_args()
    world = json.loads((Path(args.world) / "world.json").read_text(encoding="utf-8"))
    cpu_gap = None
    if args.remeasure:
        from diffusers import StableDiffusionPipeline

        from .build import load_world_config, split_data
        from .train import membership_gap

        cfg = load_world_config(args.world)
        pipe = StableDiffusionPipeline.from_pretrained(Path(args.world) / "target", use_safetensors=True)
        cpu_gap = membership_gap(pipe, split_data(cfg, "members"), split_data(cfg, "nonmembers"), cfg.seed + 10_000,
                                 cfg.eval_steps, "cpu")
    print(table(world, cpu_gap))


if __name__ == "__main__":
    main()
