"""Do three-way verdicts keep their false-positive budget on rows that touched nothing? Side by side per budget:
the nominal rate of the split-conformal rule, (k + 1) / (n + 1) for n validation non-members, and the FPR / miss
rate measured on the test split, averaged over many train/validation/test splits (seeds) of one feature store.

    python benchmarks/verdict_budget.py STORE.h5 [--seeds 20] [--attacks II-S] [--budgets 0.05,0.1,0.2]

The guarantee is marginal (over the draw of the validation split): one split's FPR spreads around the budget by
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--attacks", default="II-S")
    ap.add_argument("--budgets", default="0.05,0.1,0.2")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    from audit import api

    budgets = [float(b) for b in args.budgets.split(",")]
    rates: dict = {}
    n_val = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            heads = Path(tmp) / f"heads{seed}"
            info = api.train(args.store, heads, attacks=args.attacks, seed=seed, register=False, quiet=True).info
            n_val = info["split"]["counts"]["validation"]
            for b in budgets:
                ev = api.evaluate(args.store, heads, n_boot=0, seed=seed, max_fpr=b)
                for attack, m in ev.attacks.items():
                    v = m["verdicts"]
                    rates.setdefault((attack, b), []).append((v["fpr"]["value"], v["miss_rate"]["value"]))
    rows = []
    print(f"{args.seeds} splits; validation {n_val['nonmembers']} non-members / {n_val['members']} members per split")
    print(f"{'attack':<7} {'budget':>7} {'nominal':>8} {'FPR mean':>9} {'miss mean':>10} {'sd of mean':>11}")
    for (attack, b), r in rates.items():
        a = np.array(r, dtype=np.float64)
        k = math.floor(b * (n_val["nonmembers"] + 1) + 1e-9) - 1
        nominal = (k + 1) / (n_val["nonmembers"] + 1) if k >= 0 else 0.0
        sd = float(np.nanstd(a[:, 0]) / np.sqrt(len(a)))
        rows.append({"attack": attack, "budget": b, "nominal": nominal, "fpr_mean": float(np.nanmean(a[:, 0])),
                     "miss_mean": float(np.nanmean(a[:, 1])), "fpr_sd_of_mean": sd, "splits": len(a)})
        print(f"{attack:<7} {b:>7g} {nominal:>8.3f} {rows[-1]['fpr_mean']:>9.3f} {rows[-1]['miss_mean']:>10.3f} "
              f"{sd:>11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"splits": args.seeds, "validation": n_val, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
