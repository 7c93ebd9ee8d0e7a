"""Do three-way verdicts keep their false-positive budget on rows that touched nothing? Side by side per budget:
the nominal rate of the conformal rule, (k + 1) / (n + 1) for n calibration non-members, and the FPR / miss rate
measured on the test split, averaged over many train/validation/test splits (seeds) of one feature store; with
``--folds 0,5`` for the split rule (n = the validation non-members) and the cross-fitted one (n = every
out-of-fold non-member) on the same test rows of each seed.

    python benchmarks/verdict_budget.py STORE.h5 [--seeds 20] [--attacks II-S] [--budgets 0.05,0.1,0.2]
                                                 [--folds 0] [--test-fraction 0.25] [--reference]

``--reference`` (a store featurised with ``audit features --reference``) trains each attack's reference-calibrated
forms too (``X-ref``, ``X-ref-score``) and prints their mean TPR and decided fraction beside the plain attack's,
with the ratio to it, per rule and budget.

The guarantee is marginal (over the draw of the calibration rows): one split's FPR spreads around the budget by
about sqrt(budget / n); the mean over seeds is what must stay within it. Heads are retrained per seed (the blind
baseline too, which sees no generated image: a head at chance on this data).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np


def calibration_counts(info: dict) -> dict:
    """Members / non-members the thresholds are fitted on: the validation split, or every out-of-fold row."""
    counts = info["split"]["counts"]
    return counts["out_of_fold"] if info["split"].get("mode") == "cross-fit" else counts["validation"]


def nominal(budget: float, n: int) -> float:
    k = math.floor(budget * (n + 1) + 1e-9) - 1
    return (k + 1) / (n + 1) if k >= 0 else 0.0


def with_reference_forms(attacks: list[str]) -> list[str]:
    """Each attack followed by those of its reference-calibrated forms that exist (``X-ref``, ``X-ref-score``)."""
    from audit.attacks.inputs import ATTACKS

    out = []
    for a in attacks:
        out += [n for n in (a, f"{a}-ref", f"{a.removesuffix('-score')}-ref-score") if n in ATTACKS and n not in out]
    return out


def reference_ratios(rows: list[dict]) -> list[dict]:
    """Per rule, budget and plain attack: each form's mean TPR and decided fraction, and their ratios to the plain
    attack's (None where the plain one is 0)."""
    by = {(r["folds"], r["budget"], r["attack"]): r for r in rows}
    out = []
    for (k, b, a), plain in by.items():
        if "-ref" in a or a == "blind":
            continue
        for form in (a, f"{a}-ref", f"{a.removesuffix('-score')}-ref-score"):
            r = by.get((k, b, form))
            if r is None:
                continue
            out.append({"folds": k, "budget": b, "attack": form, "plain": a, "tpr_mean": r["tpr_mean"],
                        "decided_mean": r["decided_mean"], "fpr_mean": r["fpr_mean"],
                        "tpr_ratio": r["tpr_mean"] / plain["tpr_mean"] if plain["tpr_mean"] else None,
                        "decided_ratio": (r["decided_mean"] / plain["decided_mean"]
                                          if plain["decided_mean"] else None)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--attacks", default="II-S")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--folds", default="0", help="comma-separated: 0 for the split rule, K for K cross-fitted folds")
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--reference", action="store_true",
                    help="also train each attack's -ref and -ref-score forms (a store with reference features)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from audit import api

    if args.reference:
        args.attacks = ",".join(with_reference_forms(args.attacks.split(",")))

    budgets = [float(b) for b in args.budgets.split(",")]
    folds = [int(k) for k in args.folds.split(",")]
    rates: dict = {}
    n_cal: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for k in folds:
                heads = Path(tmp) / f"heads{seed}-{k}"
                info = api.train(args.store, heads, attacks=args.attacks, seed=seed, register=False, quiet=True,
                                 folds=k, test_fraction=args.test_fraction).info
                n_cal[k] = calibration_counts(info)
                for b in budgets:
                    ev = api.evaluate(args.store, heads, n_boot=0, seed=seed, max_fpr=b)
                    for attack, m in ev.attacks.items():
                        v = m["verdicts"]
                        rates.setdefault((k, attack, b), []).append(
                            (v["fpr"]["value"], v["miss_rate"]["value"], v["decided_fraction"]["value"],
                             v["tpr"]["value"]))
    rows = []
    print(f"{args.seeds} seeds; calibration rows (members / non-members): "
          + ", ".join(f"{'split' if k == 0 else f'{k} folds'} {n_cal[k]['members']}/{n_cal[k]['nonmembers']}"
                      for k in folds))
    print(f"{'rule':<9} {'attack':<7} {'budget':>7} {'nominal':>8} {'FPR mean':>9} {'sd of mean':>11} "
          f"{'miss mean':>10} {'decided':>8} {'TPR':>6}")
    for (k, attack, b), r in rates.items():
        a = np.array(r, dtype=np.float64)
        sd = float(np.nanstd(a[:, 0]) / np.sqrt(len(a)))
        rows.append({"folds": k, "attack": attack, "budget": b, "nominal": nominal(b, n_cal[k]["nonmembers"]),
                     "fpr_mean": float(np.nanmean(a[:, 0])), "miss_mean": float(np.nanmean(a[:, 1])),
                     "decided_mean": float(np.nanmean(a[:, 2])), "tpr_mean": float(np.nanmean(a[:, 3])),
                     "fpr_sd_of_mean": sd, "splits": len(a)})
        x = rows[-1]
        rule = "split" if k == 0 else f"{k} folds"
        print(f"{rule:<9} {attack:<7} {b:>7g} {x['nominal']:>8.3f} {x['fpr_mean']:>9.3f} {sd:>11.3f} "
              f"{x['miss_mean']:>10.3f} {x['decided_mean']:>8.3f} {x['tpr_mean']:>6.3f}")
    ratios = reference_ratios(rows) if args.reference else []
    if ratios:
        print("\nreference-calibrated forms beside the plain attack (mean TPR of member verdicts, mean decided "
              "fraction; ratio: form / plain)")
        print(f"{'rule':<9} {'budget':>7} {'attack':<13} {'TPR':>6} {'x plain':>8} {'decided':>8} {'x plain':>8} "
              f"{'FPR':>6}")
        for r in ratios:
            rule = "split" if r["folds"] == 0 else f"{r['folds']} folds"
            ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{rule:<9} {r['budget']:>7g} {r['attack']:<13} {r['tpr_mean']:>6.3f} {ratio(r['tpr_ratio']):>8} "
                  f"{r['decided_mean']:>8.3f} {ratio(r['decided_ratio']):>8} {r['fpr_mean']:>6.3f}")
    if args.json:
        out = {"splits": args.seeds, "folds": folds, "calibration": {str(k): n_cal[k] for k in folds}, "rows": rows,
               **({"reference_ratios": ratios} if args.reference else {})}
        if folds == [0]:  # the split rule alone: its calibration rows are the validation split
            out["validation"] = n_cal[0]
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
