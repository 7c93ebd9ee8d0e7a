"""Calibration and decision thresholds, fitted on the validation split only."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt scaling P(member) = sigmoid(a * score + b), with Platt's smoothed targets.

    The smoothed targets (N+ + 1)/(N+ + 2) and 1/(N- + 2) keep the slope finite when the validation split is
    perfectly separated, which on small auxiliary sets it often is.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.int64)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("Platt scaling needs both members and non-members in the validation split")
    t = np.where(y == 1, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))
    scale = max(float(s.std()), 1e-6)  # optimise on a unit scale for conditioning, then map back

    def nll(p: np.ndarray) -> tuple[float, np.ndarray]:
        z = p[0] * s / scale + p[1]
        q = _sigmoid(z)
        eps = 1e-12
        loss = -np.sum(t * np.log(q + eps) + (1 - t) * np.log(1 - q + eps))
        grad_z = q - t
        return float(loss), np.array([np.sum(grad_z * s / scale), np.sum(grad_z)])

    res = minimize(nll, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a, b = res.x
    return float(a / scale), float(b)


def apply_platt(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    return _sigmoid(a * np.asarray(scores, np.float64) + b)


def balanced_accuracy_threshold(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold t (member iff p >= t) maximising balanced accuracy on these rows -> (t, balanced accuracy).

    Candidates are midpoints between consecutive distinct probabilities (a threshold on a data point generalises
    worse than one between points); among equally good ones the closest to 0.5, the natural cut of a calibrated
    probability on balanced data.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    u = np.unique(p)
    cands = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-6]]) if len(u) > 1 else np.array([u[0]])
    pos, neg = y == 1, y == 0
    pred = p[None, :] >= cands[:, None]
    tpr = pred[:, pos].mean(1) if pos.any() else np.zeros(len(cands))
    tnr = (~pred[:, neg]).mean(1) if neg.any() else np.zeros(len(cands))
    ba = (tpr + tnr) / 2
    best = np.flatnonzero(np.isclose(ba, ba.max()))
    i = best[np.argmin(np.abs(cands[best] - 0.5))]
    return float(np.clip(cands[i], 0.0, 1.0)), float(ba[i])


def fpr_threshold(probs: np.ndarray, labels: np.ndarray, max_fpr: float) -> dict:
    """The lowest threshold whose false-positive rate on these rows is at most ``max_fpr``.

    With n non-members the achievable FPRs are multiples of 1/n; below 1/n the threshold admits no non-member at
    all (FPR 0), and ``resolution`` says so.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    neg = np.sort(p[y == 0])[::-1]
    n_neg = len(neg)
    allowed = int(np.floor(max_fpr * n_neg + 1e-9))  # false positives allowed
    if allowed >= n_neg:
        t = 0.0
    else:
        # Strictly above the (allowed+1)-th highest non-member: that one and all below it are rejected.
        t = float(np.nextafter(neg[allowed], np.inf))
    pred = p >= t
    fpr = float(pred[y == 0].mean()) if n_neg else float("nan")
    tpr = float(pred[y == 1].mean()) if (y == 1).any() else float("nan")
    return {"threshold": t, "max_fpr": max_fpr, "fpr": fpr, "tpr": tpr, "n_nonmembers": n_neg,
            "resolution": (1.0 / n_neg) if n_neg else None}
