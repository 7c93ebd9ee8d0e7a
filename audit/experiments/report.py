"""RESULTS.md from the numbers dict: settings, tables, plots, findings stated from the numbers, timings.

Every number and every finding sentence is computed from the run; nothing here is written by hand per run.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..attacks.inputs import base_attack
from ..config import atomic_write_text

FAMILIES = {"I (quality)": ("I-P", "I-S"), "II (reconstruction)": ("II-P", "II-S"),
            "III (faithfulness)": ("III-X", "III-T"), "IV (combined)": ("IV",)}


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _ms(entry: dict, digits: int = 3) -> str:
    if entry["n"] == 0:
        return "–"
    if entry["n"] == 1:
        return _f(entry["mean"], digits)
    return f"{_f(entry['mean'], digits)} ± {_f(entry['std'], digits)}"


def _auc(agg: dict, a: str) -> float:
    return agg[a]["auc"]["mean"] if a in agg else float("nan")


def _metric_table(agg: dict, attacks: list[str], tiers: dict[str, str]) -> list[str]:
    lines = ["| attack | tier | accuracy | AUC | TPR at 1% FPR |", "|---|---|---|---|---|"]
    for a in attacks:
        lines.append(f"| {a} | {tiers.get(a, 'black-box')} | {_ms(agg[a]['accuracy'])} | {_ms(agg[a]['auc'])} | "
                     f"{_ms(agg[a]['tpr_at_1pct_fpr'])} |")
    return lines


def _table_attacks(n: dict) -> list[str]:
    """The attacks of the RQ1 and RQ3 tables: both tiers (older numbers: the black-box attacks)."""
    return n.get("both_tiers") or n["attacks"]


def _grid_table(table: dict, attacks: list[str], first: str, metric: str = "auc", fmt=str) -> list[str]:
    lines = [f"| {first} | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for k, agg in table.items():
        lines.append(f"| {fmt(k)} | " + " | ".join(_ms(agg[a][metric]) for a in attacks) + " |")
    return lines


def _seeds(agg: dict) -> str:
    return ", ".join(str(s) for s in agg["_seeds"])


VARIANTS = (("split", "split"), ("crossfit", "cross-fit"), ("reference crossfit", "cross-fit + reference"))


def _ref_form(attack: str) -> str:
    """The reference form of an attack: ``X-ref`` for a head, ``X-ref-score`` for an untrained ``X-score``."""
    return attack.removesuffix("-score") + "-ref-score" if attack.endswith("-score") else attack + "-ref"


def _tpr(entry: dict, ci: dict | None, metric: str) -> str:
    text = _f(entry["metrics"][metric]["mean"], 2)
    lo_hi = (ci or {}).get(metric)
    return text + (f" [{_f(lo_hi[0], 2)}, {_f(lo_hi[1], 2)}]" if lo_hi and None not in lo_hi else "")


def _verdict_row(name: str, label: str, variant: dict, attack: str) -> str:
    m = {k: v[attack] for k, v in variant.items() if k in ("metrics", "ci95_first_seed") and attack in v}
    v = variant["verdicts"].get(attack)
    if "metrics" not in m or v is None:
        return ""
    ci = m.get("ci95_first_seed")
    c = v["counts"]
    return (f"| {name} | {label} | {_f(m['metrics']['auc']['mean'])} | {_tpr(m, ci, 'tpr_at_1pct_fpr')} | "
            f"{_tpr(m, ci, 'tpr_at_0_1pct_fpr')} | {_f(v['decided_fraction'], 2)} ({c['member']}/{c['non-member']}/"
            f"{c['inconclusive']}) | {_f(v['fpr'], 3)} |")


def verdict_table(tiers: dict) -> list[str]:
    """Rows per attack and variant (split, cross-fitted, cross-fitted with the reference) of one target."""
    header = ("| attack | heads | AUC | TPR at 1% FPR | TPR at 0.1% FPR | decided at 1% (member/non-member/"
              "inconclusive) | FPR of member verdicts on test non-members |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for tier, variants in tiers.items():
        # The attacks the cross-fitted cells ran (the study's verdict_attacks); all of the split's otherwise.
        shown = (variants.get("crossfit") or variants["split"])["metrics"]
        plain = [a for a in variants["split"]["metrics"] if a != "blind" and a in shown]
        ref = variants.get("reference crossfit") or {"metrics": {}}
        for a in plain:
            for key, label in VARIANTS[:2]:
                if key in variants:
                    lines.append(_verdict_row(a, label, variants[key], a))
            # the reference form of a, then any other (e.g. II-S-ref-score, the score of a head attack)
            extra = [r for r in ref["metrics"] if r not in plain and r != "blind" and base_attack(r) == base_attack(a)
                     and (r == _ref_form(a) or not any(_ref_form(p) == r for p in plain))]
            for r in sorted(extra, key=lambda r: r != _ref_form(a)):
                if r == _ref_form(a) or a == base_attack(a):
                    lines.append(_verdict_row(r, VARIANTS[2][1], ref, r))
        for key, label in VARIANTS[:2]:
            if key in variants:
                lines.append(_verdict_row(f"blind ({tier} cells)", label, variants[key], "blind"))
    return [row for row in lines if row]


def _mean_decided(verdicts: dict, attacks: list[str]) -> float:
    return sum(verdicts[a]["decided_fraction"] for a in attacks) / len(attacks)


def _unresolvable(verdicts: dict, names: list[str], budget: float) -> str:
    """Why nothing is decided, when the calibration rows cannot resolve the budget (n + 1 < 1 / budget)."""
    n = min((verdicts[a].get("n_calibration_nonmembers", 0) for a in names), default=0)
    need = math.ceil(1 / budget - 1 - 1e-9)
    if not n or n >= need:
        return ""
    return (f" (their {n} out-of-fold non-members cannot resolve a {budget:g} budget, which needs {need}: a larger "
            "auxiliary set or a larger budget)")


def verdict_findings(n: dict) -> list[str]:
    """What cross-fitting and the reference do to verdicts at the budget, and whether issue #20's goals hold."""
    out = []
    budget = n.get("verdict_max_fpr", 0.01)
    for q, targets in (n.get("verdicts") or {}).items():
        for target, tiers in targets.items():
            for tier, variants in tiers.items():
                if "crossfit" not in variants:
                    continue
                sp, cf = variants["split"]["verdicts"], variants["crossfit"]["verdicts"]
                names = [a for a in sp if a != "blind" and a in cf]
                if not names:
                    continue
                none_sp = sum(sp[a]["decided_fraction"] == 0 for a in names)
                fprs = [cf[a]["max_fpr_over_seeds"] for a in names if math.isfinite(cf[a]["max_fpr_over_seeds"])]
                out.append(
                    f"Verdicts at max-fpr {budget:g} ({q.upper()} {target}, {tier}): split heads decide "
                    f"{_mean_decided(sp, names):.2f} of the test rows on average ({none_sp} of {len(names)} attacks "
                    f"leave every row inconclusive); cross-fitted heads decide {_mean_decided(cf, names):.2f}"
                    + (f", with a largest realised FPR of member verdicts on test non-members of {max(fprs):.3f}"
                       if fprs else "") + _unresolvable(cf, names, budget) + ".")
    weak = ((n.get("verdicts") or {}).get("rq3") or {}).get("weak") or {}
    for tier, variants in weak.items():
        ref = variants.get("reference crossfit")
        if not ref:
            continue
        met, missed = [], []
        for a in ref["metrics"]:
            if a == "blind" or a.endswith(("-ref", "-ref-score")) or _ref_form(a) not in ref["metrics"]:
                continue
            plain = ref["metrics"][a]["tpr_at_1pct_fpr"]["mean"]
            with_ref = ref["metrics"][_ref_form(a)]["tpr_at_1pct_fpr"]["mean"]
            if not (math.isfinite(plain) and math.isfinite(with_ref)):
                continue
            (met if with_ref > 0 and with_ref >= 2 * plain else missed).append(
                f"{a} {plain:.2f} -> {_ref_form(a)} {with_ref:.2f}")
        if met or missed:
            out.append(f"Issue #20's goal on the weak fine-tune ({tier}, cross-fitted, same store and test rows; the "
                       f"reference at least doubles TPR at 1% FPR): "
                       + (f"met for {len(met)} of {len(met) + len(missed)} attacks ({'; '.join(met)})" if met else
                          f"met for none of {len(missed)} attacks")
                       + (f"; missed for {'; '.join(missed)}" if missed else "") + ".")
    return out


def variation_findings(n: dict) -> list[str]:
    var = [a for a in n.get("variation_attacks") or [] if a in n["rq1"]]
    if not var:
        return []
    rq1 = n["rq1"]
    best = max(var, key=lambda a: _auc(rq1, a))
    evals = n["unet_evaluations_per_query"]
    line = (f"Variation tier (img2img of the query, {evals.get('variation')} UNet evaluations per query vs "
            f"{evals['black-box']} for the black-box features): best {best} (AUC {_ms(rq1[best]['auc'])}, TPR at 1% "
            f"FPR {_ms(rq1[best]['tpr_at_1pct_fpr'])})")
    if "IV" in rq1:
        line += f"; IV {_auc(rq1, 'IV'):.3f}"
    vb = n.get("rq1_variation_blind")
    if vb:
        line += f"; blind baseline on the variation cells {_ms(vb['auc'])}"
    out = [line + "."]
    vs = n.get("var_strength") or {}
    if len(vs) > 1:
        out.append("RQ4 img2img strength (best variation AUC): " + ", ".join(
            f"{float(k):g} {max(_auc(agg, a) for a in var):.3f}" for k, agg in vs.items()) + ".")
    return out


def findings(n: dict) -> list[str]:
    """Sentences about what holds and what does not, each computed from the numbers."""
    out = []
    attacks = [a for a in n["attacks"] if a != "blind"]
    rq1 = n["rq1"]
    best = max(attacks, key=lambda a: _auc(rq1, a))
    out.append(f"Best single attack on the bundled target: {best} (AUC {_ms(rq1[best]['auc'])}, TPR at 1% FPR "
               f"{_ms(rq1[best]['tpr_at_1pct_fpr'])}).")
    fam = {f: max((_auc(rq1, a) for a in members if a in rq1), default=float("nan"))
           for f, members in FAMILIES.items()}
    fam = {f: v for f, v in fam.items() if math.isfinite(v)}
    order = sorted(fam, key=lambda f: -fam[f])
    out.append("Attack families by their best AUC: " + " > ".join(f"{f} {fam[f]:.3f}" for f in order) + ".")
    if {"I (quality)", "II (reconstruction)", "III (faithfulness)"} <= set(fam):
        holds = fam["II (reconstruction)"] > fam["III (faithfulness)"] > fam["I (quality)"]
        out.append("The paper's ordering (reconstruction > faithfulness > quality) "
                   + ("holds here." if holds else "does not hold here."))
    if "IV" in rq1:
        single = max(_auc(rq1, a) for a in attacks if a != "IV")
        out.append(f"The combined attack IV (AUC {_auc(rq1, 'IV'):.3f}) "
                   + ("beats" if _auc(rq1, "IV") > single else "does not beat")
                   + f" the best single attack ({single:.3f}).")
    px = [a for a in attacks if a.endswith("-P")]
    sem = [a for a in attacks if a.endswith("-S")]
    if px and sem:
        bp, bs = max(_auc(rq1, a) for a in px), max(_auc(rq1, a) for a in sem)
        out.append(f"Pixel heads (best AUC {bp:.3f}) {'beat' if bp > bs else 'trail'} semantic heads "
                   f"(best {bs:.3f}) on this 32x32 toy world.")
    gray = [a for a in n.get("graybox_attacks") or [] if a in rq1]
    if gray:
        best_g = max(gray, key=lambda a: _auc(rq1, a))
        evals = n["unet_evaluations_per_query"]
        line = (f"Gray-box tier (the target's own denoising error on the query image; "
                f"{evals['gray-box']} UNet evaluations per query for all three attacks, vs n_gen x steps = "
                f"{evals['black-box']} for the black-box features): best {best_g} (AUC {_ms(rq1[best_g]['auc'])}, TPR at "
                f"1% FPR {_ms(rq1[best_g]['tpr_at_1pct_fpr'])})")
        if "IV" in rq1:
            line += (", " + ("at or above" if _auc(rq1, best_g) >= _auc(rq1, "IV") else "below")
                     + f" IV ({_auc(rq1, 'IV'):.3f})")
        scores = [a for a in gray if a.endswith("-score")]
        if scores:
            line += "; untrained scores: " + ", ".join(f"{a} {_auc(rq1, a):.3f}" for a in scores)
        out.append(line + ".")
    blind = rq1.get("blind")
    if blind:
        flagged = [s for s, b in n["rq1_blind"].items() if b and b.get("distribution_shift_warning")]
        out.append(f"Blind baseline AUC {_ms(blind['auc'])}: "
                   + ("flagged a distribution shift on seed(s) " + ", ".join(map(str, flagged)) if flagged else
                      "no distribution shift between the auxiliary members and non-members was flagged") + ".")
    rq3 = n["rq3"]
    if rq3:
        labels = list(rq3)
        for tier, names in (("black-box", attacks), ("gray-box", [a for a in n.get("graybox_attacks") or []])):
            names = [a for a in names if all(a in rq3[lab] for lab in labels)]
            if not names:
                continue
            best3 = {lab: max(_auc(rq3[lab], a) for a in names) for lab in labels}
            mono = all(best3[labels[i]] <= best3[labels[i + 1]] + 1e-9 for i in range(len(labels) - 1))
            out.append(f"RQ3 ({tier}): best AUC by fine-tuning length "
                       + ", ".join(f"{lab} {best3[lab]:.3f}" for lab in labels)
                       + (" — the best AUC rises with fine-tuning length (memorisation)." if mono else
                          " — not monotone in fine-tuning length."))
    aux = n["aux"]
    fr = list(aux)
    if len(fr) > 1:
        lo, hi = fr[0], fr[-1]
        out.append(f"RQ4 aux size: best AUC {max(_auc(aux[lo], a) for a in attacks):.3f} with {float(lo):g} of the "
                   f"auxiliary set vs {max(_auc(aux[hi], a) for a in attacks):.3f} with {float(hi):g}.")
    steps = n["steps"]
    if len(steps) > 1:
        out.append("RQ4 denoising steps: best AUC " + ", ".join(
            f"{k} steps {max(_auc(v, a) for a in attacks):.3f}" for k, v in steps.items()) + ".")
    ng = n["n_gen"]
    if len(ng) > 1:
        out.append("RQ4 n_gen: best AUC " + ", ".join(
            f"n_gen {k} {max(_auc(v, a) for a in attacks):.3f}" for k, v in ng.items()) + ".")
    cap = n["caption"]
    if "blip" in cap:
        diffs = {a: _auc(cap["blip"], a) - _auc(cap["given"], a) for a in attacks}
        out.append("RQ4 caption source: with the toy BLIP's caption of the query instead of the given caption, AUC "
                   "changes by " + ", ".join(f"{a} {d:+.3f}" for a, d in diffs.items()) + ".")
    emb = n["embedder"]
    if "clip2" in emb:
        sem_a = [a for a in attacks if a not in ("I-P", "II-P")]
        diffs = {a: _auc(emb["clip2"], a) - _auc(emb["toy-clip"], a) for a in sem_a}
        out.append("RQ4 embedder: with the second CLIP, semantic-attack AUCs change by "
                   + ", ".join(f"{a} {d:+.3f}" for a, d in diffs.items()) + ".")
    d = n["defence"]
    if len(d) > 1:
        none_best = max(_auc(d["none"], a) for a in attacks)
        parts = []
        for name, agg in d.items():
            if name == "none":
                continue
            cost = n["defence_cost"][name]
            parts.append(f"{name}: best AUC {max(_auc(agg, a) for a in attacks):.3f} (PSNR {cost['psnr_db']:.1f} dB)")
        out.append(f"RQ5 defences (attacker retrains on defended outputs; undefended best AUC {none_best:.3f}): "
                   + "; ".join(parts) + ".")
        for label, table in (("retrained on defended outputs", d), ("trained before the defence",
                                                                     n["defence_transfer"])):
            drops = [(_auc(d["none"], a) - _auc(agg, a), name, a) for name, agg in table.items() if name != "none"
                     for a in attacks if math.isfinite(_auc(agg, a))]
            if drops:
                drop, name, a = max(drops)
                out.append(f"Largest AUC drop with heads {label}: {a} under {name}, {_auc(d['none'], a):.3f} -> "
                           f"{_auc(table[name], a):.3f}.")
    out += variation_findings(n) + verdict_findings(n)
    fid = n["fid"]["bundle"]
    out.append(f"FID analogue (Fréchet distance in toy-CLIP space, bundled target): generated vs real "
               f"{fid['members']['fd']:.4f} for members, {fid['nonmembers']['fd']:.4f} for non-members "
               + ("— member captions give images closer to the real ones, as in the paper." if
                  fid["members"]["fd"] < fid["nonmembers"]["fd"] else "— the paper's direction does not hold."))
    sl = n["setlevel"]
    for att in (n["set_attack"], n.get("set_graybox_attack")):
        for name in ("bundle", *[k for k in sl if k.startswith("rq3")]):
            curve = sl[name].get(att) if att else None
            if not curve:
                continue
            pw = ", ".join(f"k={r['k']} {_f(r['power'], 2)}" for r in curve)
            fpr = max((r["fpr"] for r in curve if r["fpr"] is not None), default=float("nan"))
            out.append(f"Set-level ({name}, {att}): power {pw}; largest false-positive rate on non-member sets "
                       f"{fpr:.3f} at α = {n['config']['set_alpha']}.")
    return out


def write_results(n: dict, path: Path) -> None:
    cfg = n["config"]
    attacks = n["attacks"]
    run = n["run"]
    bundle = n["models"]["bundle"]
    rq1 = n["rq1"]
    counts = rq1["_counts"]
    L: list[str] = []
    L += ["# Results: membership inference on the toy world", "",
          "Generated by `audit experiment` (`audit/experiments/`); every number below comes from the run that wrote "
          "this file. Do not edit by hand: rerun the command. Machine-readable numbers: `experiment.json`.", "",
          f"Run started {run['started']}; it computed {run['computed_now']} of "
          f"{run['computed_now'] + run['reused']} tasks and took {run['total_seconds'] / 60:.1f} minutes wall-clock "
          f"on {run['cpus']} CPU cores with {cfg['workers']} worker process(es); on idle cores the whole study "
          f"takes about {run['idle_estimate_seconds'] / 60:.0f} minutes (see Timings).", ""]
    L += ["## Findings", ""] + [f"- {s}" for s in findings(n)] + [""]
    bc = bundle["config"]
    L += ["## Setup", "",
          f"- **Target** (RQ1/2, RQ4, RQ5): the bundled toy target, a latent `StableDiffusionPipeline` at 32x32 "
          f"pre-trained on {bc['n_public']} public scenes and fine-tuned {bc['finetune_steps']} steps on its "
          f"{bc['n_members']} members (world seed {bc['seed']}). Its build measured a single-score pixel "
          f"reconstruction AUC of {bundle['metrics']['membership_gap']['auc']:.3f} at "
          f"{bundle['metrics']['membership_gap']['denoising_steps']} steps.",
          f"- **Auxiliary data**: {cfg['n_members']} members and {cfg['n_nonmembers']} non-members drawn from the "
          f"toy world (data seed {cfg['data_seed']}). Each seed splits them 50/25/25 into train/validation/test: "
          f"{counts['train']['members']}+{counts['train']['nonmembers']} train, "
          f"{counts['validation']['members']}+{counts['validation']['nonmembers']} validation, "
          f"{counts['test']['members']}+{counts['test']['nonmembers']} test (members+non-members). Thresholds and "
          "calibration come from validation; every metric is on test. With "
          f"{counts['test']['nonmembers']} test non-members the FPR moves in steps of "
          f"1/{counts['test']['nonmembers']}"
          + (", so TPR at 1% FPR is the TPR at FPR 0." if counts["test"]["nonmembers"] < 100 else ".")
          + (" TPR at 0.1% FPR likewise is the TPR at FPR 0: it needs 1,000 test non-members to differ from it."
             if counts["test"]["nonmembers"] < 1000 else ""),
          f"- **Features**: n_gen {cfg['n_gen']}, {cfg['steps']} DDIM steps, no guidance; embedder toy-clip, "
          "captioner toy-blip (greedy)."
          + (f" Gray-box (`audit features --tier gray-box`, stores of their own): the errors of loss, PIA, "
             "SecMI (and CLiD's conditional, unconditional and masked-caption losses at its own timesteps) at "
             f"timesteps {', '.join(map(str, cfg['graybox_timesteps']))}, conditioned on the caption "
             f"without guidance ({n['unet_evaluations_per_query']['gray-box']} UNet evaluations per query); seed s "
             "draws the loss attack's noise; the same split seeds, so the same test rows as the black-box cells."
             if n.get("graybox_attacks") else "")
          + (f" Variation (`audit features --tier variation`, stores of their own): {cfg['n_var']} img2img "
             f"variations of each query at each strength {', '.join(f'{x:g}' for x in cfg['var_strengths'])} "
             f"({n['unet_evaluations_per_query'].get('variation')} UNet evaluations per query), seed s as above."
             if n.get("variation_attacks") else ""),
          f"- **Heads**: `audit.attacks.train_heads` with at most {cfg['epochs']} epochs, patience {cfg['patience']}, "
          f"other `TrainConfig` defaults; bootstrap CIs from {cfg['n_boot']} resamples (in experiment.json).",
          f"- **Seeds**: RQ1/RQ3 use seeds {', '.join(map(str, cfg['seeds']))}; seed s draws the generated images "
          f"(features seed s), the split and the heads' initialisation. RQ4/RQ5 vary the split/head seed "
          f"({', '.join(map(str, cfg['ablation_seeds']))}) on the seed-0 images. Tables give mean ± sample std "
          "over seeds.",
          "- **Reuse**: stores and cells are cached by a hash of their settings; the seed-0 store is made once with "
          f"n_gen {max(cfg['n_gen_grid'])} and smaller n_gen read its first images (image j of a caption has the "
          "same seed for any n_gen). The embedder and defence stores replay that store's generated images "
          "(exact at 32x32) instead of regenerating them.", ""]

    L += ["## RQ1/RQ2: attacks on the bundled target", "", f"![RQ1](./{n['plots']['rq1']})", ""]
    both = _table_attacks(n)
    tiers = n.get("tiers") or {}
    L += _metric_table(rq1, both, tiers) + [
        "", f"Seeds {_seeds(rq1)}. `blind` sees only the query image and caption embeddings (no generated image): "
        "the distribution-shift baseline. Gray-box rows read the target's own denoising error on the query image "
        "(see [attacks and tiers](attacks.md)); `X-score` is attack X's untrained statistic, `X` a head over its "
        "per-timestep errors.", ""]
    fid = n["fid"]
    L += ["## The FID table's analogue", "",
          "Fréchet distance in toy-CLIP image-embedding space between the generated images (seed 0, all n_gen images "
          "of each query) and the real images, per class. The real-vs-real row compares real members with real "
          "non-members: distances near it are at the sampling floor.", "",
          "| target | members: generated vs real | non-members: generated vs real | real members vs real non-members "
          "| pixel MSE members / non-members (single-score AUC) |", "|---|---|---|---|---|"]
    for name, f in fid.items():
        g = n["pixel_gap"][name]
        L.append(f"| {name} | {f['members']['fd']:.4f} | {f['nonmembers']['fd']:.4f} | "
                 f"{f['real_members_vs_real_nonmembers']:.4f} | {g['member_mse']:.4f} / {g['nonmember_mse']:.4f} "
                 f"({g['auc']:.3f}) |")
    L.append("")

    m = n["models"]
    L += ["## RQ3: memorisation strength", "",
          f"The token-based (DALL-E-mini-style) family exists in audit only untrained; training it on this CPU is out "
          f"of scope, so RQ3 compares diffusion targets that differ only in how long they were fine-tuned. Members "
          f"are the first {cfg['rq3_members']} member scenes of a world with seed {cfg['rq3_world_seed']} (never seen "
          f"by any bundled model); non-members the first {cfg['rq3_nonmembers']} non-member scenes of that world. "
          f"`untuned` is the bundled target itself (0 steps on these members: a control where there is nothing to "
          f"find); `weak` and `strong` are the bundled target fine-tuned {cfg['rq3_finetune_steps'][0]} and "
          f"{cfg['rq3_finetune_steps'][1]} steps (batch {cfg['rq3_batch']}, lr {cfg['rq3_lr']}; "
          f"{m['rq3-weak']['epochs']:.0f} and {m['rq3-strong']['epochs']:.0f} epochs) on them. Seeds "
          f"{', '.join(map(str, cfg['seeds']))} as in RQ1.", "", f"![RQ3](./{n['plots']['rq3']})", "",
          "| target | single-score pixel AUC at build | " + " | ".join(both) + " |",
          "|---" * (len(both) + 2) + "|"]
    for lab, agg in n["rq3"].items():
        gap = m.get(f"rq3-{lab}", {}).get("membership_gap", {}).get("auc")
        L.append(f"| {lab} | {_f(gap)} | " + " | ".join(_ms(agg[a]["auc"]) if a in agg else "–" for a in both)
                 + " |")
    L += ["", "(AUC, mean ± std over seeds.) TPR at 1% FPR:", ""]
    L += _grid_table(n["rq3"], [a for a in both if all(a in agg for agg in n["rq3"].values())], "target",
                     "tpr_at_1pct_fpr") + [""]

    L += verdict_section(n)
    L += ["## RQ4: ablations", "", f"![RQ4 grids](./{n['plots']['rq4_grids']})", "",
          f"![RQ4 caption and embedder](./{n['plots']['rq4_sources']})", "",
          "### Auxiliary data size", "",
          "The test split of each seed is held fixed; heads train on a nested, stratified fraction of the other 75% "
          "(split 64:32 train:validation). AUC:", ""]
    def train_rows(k) -> str:
        c = n["aux"][k]["_counts"]["train"]
        return f"{float(k):g} ({c['members'] + c['nonmembers']})"

    L += _grid_table(n["aux"], attacks, "fraction (train rows)", fmt=train_rows)
    L += ["", "### Denoising steps (AUC)", ""] + _grid_table(n["steps"], attacks, "steps")
    L += ["", "### Generated images per query (AUC)", ""] + _grid_table(n["n_gen"], attacks, "n_gen")
    L += ["", "### Caption source (AUC)", "",
          "`given`: the caption of the auxiliary data; `blip`: the toy BLIP's caption of the query image, used both "
          "to generate and as the text the attacks compare with.", ""] + _grid_table(n["caption"], attacks, "caption")
    c2 = m["clip2"]
    L += ["", "### Embedder (AUC)", "",
          f"`clip2`: a second CLIP trained here ({c2['recipe']['layers']} layers, hidden {c2['recipe']['hidden']}, "
          f"{c2['recipe']['steps']} steps of batch {c2['recipe']['batch']} on {c2['recipe']['n_public']} public "
          f"scenes of seed {c2['recipe']['seed']}); held-out text-to-image retrieval top-1 {c2['heldout_top1']:.3f} "
          f"vs {m['bundle_clip_top1_same_heldout']:.3f} for the toy CLIP on the same {c2['heldout_n']} scenes. The "
          "pixel attacks do not use the embedder.", ""] + _grid_table(n["embedder"], attacks, "embedder")

    vs = n.get("var_strength") or {}
    if vs:
        var = list(n["variation_attacks"]) + ["blind"]
        L += ["", "### img2img strength (variation tier)", "",
              f"One variation store per strength ({cfg['n_var']} variations a query, the seed-0 queries), head seeds "
              f"{', '.join(map(str, cfg['ablation_seeds']))}; UNet evaluations per query: "
              + ", ".join(f"{k}: {v}" for k, v in n["unet_evaluations_per_query"]["variation by strength"].items())
              + ".", "", f"![RQ4 variation strength](./{n['plots']['var_strength']})", "", "AUC:", ""]
        L += _grid_table(vs, var, "strength", fmt=lambda k: f"{float(k):g}")
        L += ["", "TPR at 1% FPR:", ""] + _grid_table(vs, var, "strength", "tpr_at_1pct_fpr",
                                                      fmt=lambda k: f"{float(k):g}")
    L += ["", "## RQ5: output defences", "",
          "Each defence perturbs every image the target returns (`audit.defences.DefendedGenerator`, seeded). "
          "`retrained`: the attacker's auxiliary features are also defended and the heads are trained on them; "
          "`before`: the heads trained on undefended outputs score the defended test split. Cost to the service: "
          "PSNR of defended vs undefended generated images (downscaled ones upscaled bicubically), and the Fréchet "
          "distance of all generated images to the real ones (undefended in the first row).", "",
          f"![RQ5](./{n['plots']['rq5']})", "",
          "| defence | PSNR dB | FD gen vs real | " + " | ".join(f"{a} retrained / before" for a in attacks) + " |",
          "|---" * (len(attacks) + 3) + "|"]
    for d, agg in n["defence"].items():
        cost = n["defence_cost"][d]
        tr = n["defence_transfer"].get(d)
        cells = [f"{_ms(agg[a]['auc'])} / {_ms(tr[a]['auc']) if tr else '–'}" for a in attacks]
        L.append(f"| {d} | {_f(cost['psnr_db'], 1)} | {cost['fd_generated_vs_real']:.4f} | " + " | ".join(cells)
                 + " |")

    L += ["", "## Set-level inference", "",
          f"For a set of k images of one owner: a one-sided test (`audit.attacks.setlevel`, method "
          f"`{cfg['set_method']}`, {cfg['set_resamples']} Monte Carlo draws per test) whose null comes only from "
          "non-members the heads never fitted on. Everything below uses the test split: member sets are drawn from "
          "its members; in each trial a random half of its non-members is the null and the non-member set is drawn "
          f"from the other half. {cfg['set_trials']} random sets of distinct images per k, kind and seed; power = "
          f"rejection rate on member sets, FPR = on non-member sets, at α = {cfg['set_alpha']}; mean over seeds "
          "(– where k exceeds the pool).", "", f"![set level](./{n['plots']['setlevel']})", "",
          "| target | attack | null size | " + " | ".join(f"k={k} power / FPR" for k in cfg["set_ks"]) + " |",
          "|---" * (len(cfg["set_ks"]) + 3) + "|"]
    for name, per_attack in n["setlevel"].items():
        for a, curve in per_attack.items():
            L.append(f"| {name} | {a} | {curve[0]['n_null']} | "
                     + " | ".join(f"{_f(r['power'], 2)} / {_f(r['fpr'], 3)}" for r in curve) + " |")
    L += ["", "With a null of n scores no single image can reach p below 1/(n + 1): small nulls cannot reject at "
          "k = 1 whatever the image."]

    L += ["", "## Timings", ""]
    if run["reused"]:
        L += [f"This invocation computed {run['computed_now']} tasks and reused {run['reused']} from the cache in "
              f"`{run['workdir']}`; reused tasks are timed as when they were computed (`timings.json` there)."]
    else:
        L += [f"This invocation computed every task: {run['tasks_seconds'] / 60:.1f} min for the tasks, "
              f"{run['total_seconds'] / 60:.1f} min for the whole command."]
    L += [f"Load average {run['load_average_before'][0]:.1f} before and {run['load_average_after'][0]:.1f} after, on "
          f"{run['cpus']} cores: with other jobs on the machine, wall-clock times include waiting for them. "
          f"Replaying the same schedule with each task's measured CPU seconds on "
          f"{cfg['workers']} idle cores gives {run['idle_estimate_seconds'] / 60:.1f} min for the tasks. Sums over "
          "tasks (tasks overlap when workers > 1):", "",
          "| stage | tasks | wall s (sum) | CPU s (sum) |", "|---|---|---|---|"]
    for stage, s in run["stages"].items():
        L.append(f"| {stage} | {s['tasks']} | {s['seconds']:.0f} | {s['cpu_seconds']:.0f} |")
    L += ["", "Per-task times are in `experiment.json` (`run.tasks`).", ""]
    atomic_write_text(path, "\n".join(L) + "\n")


def verdict_section(n: dict) -> list[str]:
    """The section on verdicts at a small budget: split vs cross-fitted vs cross-fitted with the reference."""
    v = n.get("verdicts") or {}
    if not v:
        return []
    cfg = n["config"]
    budget = n.get("verdict_max_fpr", 0.01)
    L = [f"## Verdicts at a {budget:.0%} budget: cross-fitting and the reference", "",
         f"Each row is one attack's heads on the same test rows of each seed ({', '.join(map(str, cfg['seeds']))}): "
         f"`split` = the RQ1/RQ3 cells (thresholds from the 25% validation split); `cross-fit` = "
         f"`audit train --folds {cfg['crossfit_folds']}` on the same train + validation rows (thresholds from all "
         "out-of-fold scores, see [verdicts](verdicts.md)); `cross-fit + reference` = cross-fitted heads on a store "
         "with `audit features --reference` (same seeds and noise on the reference): `X-ref` heads read the target's "
         "features, the reference's and their difference, `X-ref-score` is X's score on the target minus on the "
         f"reference, standardised on non-members. References: the bundled target against `{cfg['reference_rq1']}` "
         "(its pre-training checkpoint); each RQ3 fine-tune against the bundled `toy` it was fine-tuned from, the "
         f"untuned control against `{cfg['reference_rq1']}`. Metrics are means over seeds; TPRs carry the first "
         f"seed's {cfg['n_boot']}-resample bootstrap 95% interval. `decided at {budget:.0%}`: the fraction of test "
         f"rows given a `member` or `non-member` verdict by `audit evaluate --max-fpr {budget:g}`'s thresholds (counts "
         "summed over seeds); the last column is the realised FPR of `member` verdicts on the test non-members "
         "(mean over seeds). With few test non-members both TPR columns are the TPR at FPR 0 (see Setup).", ""]
    for q, targets in v.items():
        for target, tiers in targets.items():
            if q == "rq3" and target == "untuned":
                continue  # a control with nothing to find; its numbers are in experiment.json
            name = "RQ1, the bundled target" if q == "rq1" else f"RQ3, the {target} fine-tune"
            L += [f"### {name}", ""] + verdict_table(tiers) + [""]
    return L
