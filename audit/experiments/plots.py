"""The study's figures (PNG, matplotlib Agg), drawn from the numbers dict only."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


def _bars(ax, groups: dict[str, dict], attacks: list[str], metric: str, title: str) -> None:
    """Grouped bars: one group per attack, one bar per setting, error bars = std over seeds."""
    n = len(groups)
    width = 0.8 / max(1, n)
    x = np.arange(len(attacks))
    for i, (label, agg) in enumerate(groups.items()):
        means = [agg[a][metric]["mean"] for a in attacks]
        stds = [agg[a][metric]["std"] for a in attacks]
        ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=stds, label=str(label), capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(attacks, rotation=0, fontsize=8)
    ax.set_title(title, fontsize=10)
    if metric == "auc":
        ax.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(n, 4))


def _lines(ax, table: dict, attacks: list[str], metric: str, xlabel: str, log_x: bool = False) -> None:
    xs = [float(k) for k in table]
    for a in attacks:
        means = np.array([table[k][a][metric]["mean"] for k in table])
        stds = np.array([table[k][a][metric]["std"] for k in table])
        style = dict(linestyle="--", color="grey") if a == "blind" else {}
        ax.errorbar(xs, means, yerr=stds, marker="o", markersize=3, capsize=2, label=a, **style)
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0, 1.05)


def write_plots(nums: dict, out: Path) -> dict[str, str]:
    plt = _plt()
    attacks = nums["attacks"]
    both = nums.get("both_tiers") or attacks  # RQ1/RQ3: black-box and gray-box attacks
    files = {}

    wide = max(15, len(both) * 1.1)
    fig, axes = plt.subplots(3, 1, figsize=(wide, 10)) if len(both) > len(attacks) else plt.subplots(1, 3, figsize=(15, 4))
    for ax, m, t in zip(axes, ("accuracy", "auc", "tpr_at_1pct_fpr"), ("accuracy", "AUC", "TPR at 1% FPR")):
        _bars(ax, {"bundled toy target": nums["rq1"]}, both, m, f"RQ1/RQ2: {t} (mean ± std over seeds)")
    files["rq1"] = _save(fig, out / "rq1_attacks.png")

    rq3_both = [a for a in both if all(a in agg for agg in nums["rq3"].values())]
    fig, axes = plt.subplots(2, 1, figsize=(wide, 8)) if len(rq3_both) > len(attacks) else plt.subplots(1, 2, figsize=(14, 4))
    for ax, m in zip(axes, ("auc", "tpr_at_1pct_fpr")):
        _bars(ax, nums["rq3"], rq3_both, m, f"RQ3: {m.replace('_', ' ')} by memorisation strength")
    files["rq3"] = _save(fig, out / "rq3_memorisation.png")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    _lines(axes[0], nums["aux"], attacks, "auc", "fraction of the auxiliary set", log_x=True)
    _lines(axes[1], nums["steps"], attacks, "auc", "denoising steps", log_x=True)
    _lines(axes[2], nums["n_gen"], attacks, "auc", "generated images per query (n_gen)")
    axes[2].legend(fontsize=7, loc="lower right")
    for ax, t in zip(axes, ("RQ4: auxiliary data size", "RQ4: denoising steps", "RQ4: n_gen")):
        ax.set_title(t, fontsize=10)
    files["rq4_grids"] = _save(fig, out / "rq4_ablations.png")

    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    _bars(axes[0], nums["caption"], attacks, "auc", "RQ4: caption source (AUC)")
    _bars(axes[1], nums["embedder"], attacks, "auc", "RQ4: embedder (AUC)")
    files["rq4_sources"] = _save(fig, out / "rq4_caption_embedder.png")

    fig, axes = plt.subplots(1, 2, figsize=(15, 4))
    _bars(axes[0], nums["defence"], attacks, "auc", "RQ5: AUC under output defences (heads retrained on them)")
    transfer = {"none": nums["defence"]["none"], **nums["defence_transfer"]}
    _bars(axes[1], transfer, attacks, "auc", "RQ5: AUC, heads trained before the defence")
    files["rq5"] = _save(fig, out / "rq5_defences.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    att = nums["set_attack"]
    ks = [r["k"] for r in nums["setlevel"]["bundle"][att]]
    for a, curve in nums["setlevel"]["bundle"].items():
        style = dict(linestyle="--", color="grey") if a == "blind" else {}
        axes[0].plot([r["k"] for r in curve], [r["power"] for r in curve], marker="o", label=f"{a} power", **style)
    curve = nums["setlevel"]["bundle"][att]
    axes[0].plot([r["k"] for r in curve], [r["fpr"] for r in curve], marker="x", linestyle=":", color="black",
                 label=f"{att} FPR")
    axes[0].set_title("Set-level power, bundled target (each attack)", fontsize=10)
    gray_att = nums.get("set_graybox_attack")
    for i, (name, d) in enumerate((k, v) for k, v in nums["setlevel"].items() if k.startswith("rq3")):
        c = f"C{i}"
        for a, line in ((att, "-"), (gray_att, "--")):
            if not a or a not in d:
                continue
            pts = [(r["k"], r["power"], r["fpr"]) for r in d[a]]
            axes[1].plot([p[0] for p in pts if p[1] is not None], [p[1] for p in pts if p[1] is not None],
                         marker="o", linestyle=line, color=c, label=f"{name} {a} power")
            if a == att:
                axes[1].plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None],
                             marker="x", linestyle=":", color=c, label=f"{name} {a} FPR")
    title = f"attack {att}" + (f" (solid) and {gray_att} (dashed)" if gray_att else "")
    axes[1].set_title(f"Set-level power and FPR by memorisation strength, {title}", fontsize=10)
    for ax in axes:
        ax.axhline(nums["config"]["set_alpha"], color="red", linewidth=0.6, linestyle=":")
        ax.set_xlabel("images in the set (k)")
        ax.set_xticks(ks)
        ax.set_ylim(-0.02, 1.05)
        ax.legend(fontsize=7)
    files["setlevel"] = _save(fig, out / "setlevel_power.png")

    if nums.get("var_strength"):
        var = list(nums["variation_attacks"]) + ["blind"]
        fig, axes = plt.subplots(1, 2, figsize=(14, 4))
        for ax, m in zip(axes, ("auc", "tpr_at_1pct_fpr")):
            _lines(ax, nums["var_strength"], var, m, "img2img strength (one strength per store)")
            ax.set_title(f"RQ4: variation tier, {m.replace('_', ' ')} by strength", fontsize=10)
        axes[1].legend(fontsize=7)
        files["var_strength"] = _save(fig, out / "rq4_variation_strength.png")
    return files
