"""Numbers of the study from finished cells and stores: seed aggregates, Fréchet distances, defence costs, and
set-level power. Pure functions over results; nothing here trains or generates."""

from __future__ import annotations

import numpy as np
from scipy import linalg

METRICS = ("accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")


def value(m) -> float:
    """A metric entry ``{"value", "ci95"}`` or a bare number -> float (NaN for null)."""
    v = m.get("value") if isinstance(m, dict) else m
    return float("nan") if v is None else float(v)


def aggregate(results: list[dict], attacks: list[str]) -> dict:
    """``{attack: {metric: {"mean", "std", "n", "values"}}}`` over cells (one per seed). std is the sample std
    (ddof 1; 0 for one seed)."""
    out: dict = {}
    for a in attacks:
        out[a] = {}
        for m in METRICS:
            vals = [value(r["metrics"][a][m]) for r in results if a in r["metrics"]]
            arr = np.array([v for v in vals if np.isfinite(v)])
            out[a][m] = {"mean": float(arr.mean()) if len(arr) else float("nan"),
                         "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                         "n": int(len(arr)), "values": vals}
    return out


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the FID formula)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_table(batch: dict) -> dict:
    """Fréchet distance in the store's embedder space between generated images and the real images, for members
    and non-members; a real-vs-real reference (members vs non-members) gives the sampling floor."""
    y = np.asarray(batch["member"])
    real, gen = np.asarray(batch["query_img_emb"]), np.asarray(batch["gen_img_emb"])
    out = {}
    for name, cls in (("members", 1), ("nonmembers", 0)):
        rows = y == cls
        g = gen[rows].reshape(-1, gen.shape[-1])
        out[name] = {"fd": frechet(g, real[rows]), "n_real": int(rows.sum()), "n_generated": int(len(g))}
    out["real_members_vs_real_nonmembers"] = frechet(real[y == 1], real[y == 0])
    return out


def pixel_distance(batch: dict) -> dict:
    """Mean pixel MSE (0-1 scale) between each query and its generated images, members vs non-members: the
    single-score reconstruction signal the toy world was built to carry."""
    y = np.asarray(batch["member"])
    q = np.asarray(batch["query_pixels"], np.float32)[:, None] / 255.0
    g = np.asarray(batch["gen_pixels"], np.float32) / 255.0
    mse = ((q - g) ** 2).mean(axis=(1, 2, 3, 4))
    from sklearn.metrics import roc_auc_score

    return {"member_mse": float(mse[y == 1].mean()), "nonmember_mse": float(mse[y == 0].mean()),
            "auc": float(roc_auc_score(y, -mse))}


def defence_cost(clean: dict, defended: dict) -> dict:
    """What a defence costs the service: PSNR of the defended generated images against the undefended ones (rows
    matched by id; downscaled images were brought back to the store's pixel size by the feature pipeline), and the
    Fréchet distance of all defended generated images to all real images (the undefended value is the baseline)."""
    from ..defences import psnr

    index = {str(i): k for k, i in enumerate(clean["ids"])}
    rows = np.array([index[str(i)] for i in defended["ids"]])
    c = np.asarray(clean["gen_pixels"])[rows, : defended["gen_pixels"].shape[1]]
    d = np.asarray(defended["gen_pixels"])
    flat_c, flat_d = c.reshape(-1, *c.shape[2:]), d.reshape(-1, *d.shape[2:])
    real = np.asarray(defended["query_img_emb"])
    gen = np.asarray(defended["gen_img_emb"]).reshape(-1, real.shape[-1])
    return {"psnr_db": psnr(flat_c, flat_d), "fd_generated_vs_real": frechet(gen, real)}


def set_level(result: dict, attack: str, ks, alpha: float, n_sets: int, method: str, n_resamples: int,
              seed: int) -> list[dict]:
    """Power and false-positive rate of the set test for one cell and attack, on the test split only (rows the
    heads never fitted on): member sets from its members; in each trial half of its non-members form the null and
    non-member sets come from the other half."""
    from ..attacks.setlevel import power_curve

    y = np.asarray(result["test"]["member"])
    p = np.asarray(result["test"]["probability"][attack])
    return power_curve(p[y == 1], p[y == 0], ks, alpha, n_sets, method, n_resamples, seed=seed)


def mean_curves(curves: list[list[dict]]) -> list[dict]:
    """Average power/FPR over seeds, k by k (None where k exceeded a pool)."""
    out = []
    for rows in zip(*curves):
        row = {"k": rows[0]["k"], "alpha": rows[0]["alpha"], "n_sets": rows[0]["n_sets"], "seeds": len(rows),
               "n_null": rows[0]["n_null"]}
        for key in ("power", "fpr"):
            vals = [r[key] for r in rows if r[key] is not None]
            row[key] = float(np.mean(vals)) if vals else None
            row[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def cell_verdicts(heads_dir, result: dict, max_fpr: float) -> dict:
    """Per attack, what the verdict rule at ``max_fpr`` (thresholds from the heads' validation or out-of-fold
    probabilities, ``audit evaluate --max-fpr``) does on the cell's test rows: the counts of member / non-member /
    inconclusive verdicts, the decided fraction, the realised FPR (member verdicts per test non-member) and TPR."""
    from pathlib import Path

    from ..attacks.decision import fit_decision
    from ..attacks.heads import read_heads_info
    from ..attacks.metrics import verdict_codes

    info = read_heads_info(Path(heads_dir))
    y = np.asarray(result["test"]["member"])
    out = {}
    for attack, probs in result["test"]["probability"].items():
        d = fit_decision(info["attacks"][attack], attack, max_fpr=max_fpr, where=str(heads_dir))
        v = verdict_codes(np.asarray(probs, np.float64), d.member_threshold, d.nonmember_threshold)
        out[attack] = {
            "counts": {"member": int((v == 1).sum()), "non-member": int((v == 0).sum()),
                       "inconclusive": int((v == -1).sum())},
            "decided_fraction": float((v >= 0).mean()),
            "fpr": float((v[y == 0] == 1).mean()) if (y == 0).any() else float("nan"),
            "tpr": float((v[y == 1] == 1).mean()) if (y == 1).any() else float("nan"),
            "n_calibration_nonmembers": int(d.n_validation_nonmembers),
        }
    return out


def aggregate_verdicts(per_seed: list[dict], attacks: list[str]) -> dict:
    """Seed means of ``cell_verdicts`` entries (counts summed over seeds)."""
    out: dict = {}
    for a in attacks:
        rows = [r[a] for r in per_seed if a in r]
        if not rows:
            continue
        entry = {k: float(np.nanmean([r[k] for r in rows])) if any(np.isfinite(r[k]) for r in rows)
                 else float("nan") for k in ("decided_fraction", "fpr", "tpr")}
        entry["max_fpr_over_seeds"] = float(np.nanmax([r["fpr"] for r in rows])) if rows else float("nan")
        entry["counts"] = {k: int(sum(r["counts"][k] for r in rows)) for k in rows[0]["counts"]}
        entry["n_calibration_nonmembers"] = min(int(r.get("n_calibration_nonmembers", 0)) for r in rows)
        entry["n"] = len(rows)
        out[a] = entry
    return out
