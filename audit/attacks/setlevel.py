"""Set-level inference: was this set of k images (of one owner) trained on, as a whole?

A one-sided test of H0 "the set's images are non-members" against H1 "they are members", from the per-image
scores of one attack head. The null distribution comes from scores of held-out images known NOT to be members
(the heads' validation non-members, never the images under test), so no member score is needed to calibrate it:

- ``mean`` (default): the statistic is the mean score of the set; its null is the mean of k scores drawn with
  replacement from the null scores (Monte Carlo, seeded). p = (1 + #{null means >= statistic}) / (1 + draws).
- ``fisher``: per-image empirical p-values against the null scores, combined as -2 sum log p ~ chi2(2k).
- ``stouffer``: the same p-values as normal quantiles, combined as sum z / sqrt(k) ~ N(0, 1).

Empirical p-values are (1 + #{null >= s}) / (1 + n_null): never 0, and valid (P(p <= a) <= a) under H0.
Fisher and Stouffer treat the images as independent; the mean test only assumes the set is a draw from the same
distribution as the null images. ``power_curve`` measures how often each test rejects member sets (power) and
non-member sets (false-positive rate) of size k at a significance level.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import stats

from ..config import Config
from ..errors import InputError, UnknownNameError, UsageError

METHODS = ("mean", "fisher", "stouffer")


@dataclasses.dataclass
class SetTestConfig(Config):
    method: str = "mean"
    n_resamples: int = 10_000  # Monte Carlo draws of the null mean (method "mean")
    seed: int = 0

    def validate(self) -> "SetTestConfig":
        if self.method not in METHODS:
            raise UnknownNameError(f"unknown set-test method {self.method!r}; valid methods are: {', '.join(METHODS)}")
        if self.n_resamples < 100:
            raise UsageError(f"n_resamples must be >= 100, got {self.n_resamples}")
        return self


def _scores(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise InputError(f"set test: no {what}")
    if not np.isfinite(a).all():
        raise InputError(f"set test: {what} contain NaN or infinite values")
    return a


def empirical_pvalues(scores, null) -> np.ndarray:
    """Per-score one-sided p-values (1 + #{null >= s}) / (1 + n_null); larger scores mean more member-like."""
    s, n = _scores(scores, "scores"), np.sort(_scores(null, "null scores"))
    at_least = len(n) - np.searchsorted(n, s, side="left")
    return (1.0 + at_least) / (1.0 + len(n))


def null_means(null, k: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted means of ``n_resamples`` draws of k null scores (with replacement)."""
    n = _scores(null, "null scores")
    out = np.empty(n_resamples)
    step = max(1, 2_000_000 // max(1, k))  # bound memory for large k
    for i in range(0, n_resamples, step):
        m = min(step, n_resamples - i)
        out[i:i + m] = n[rng.integers(0, len(n), size=(m, k))].mean(axis=1)
    return np.sort(out)


def _p_from_sorted(sorted_null: np.ndarray, stat: float) -> float:
    at_least = len(sorted_null) - np.searchsorted(sorted_null, stat, side="left")
    return float((1.0 + at_least) / (1.0 + len(sorted_null)))


def combine(p: np.ndarray, method: str) -> tuple[float, float]:
    """(statistic, p-value) of Fisher's or Stouffer's combination of per-image p-values."""
    k = len(p)
    if method == "fisher":
        stat = float(-2.0 * np.log(p).sum())
        return stat, float(stats.chi2.sf(stat, 2 * k))
    if method == "stouffer":
        stat = float(stats.norm.isf(p).sum() / np.sqrt(k))
        return stat, float(stats.norm.sf(stat))
    raise UnknownNameError(f"unknown combination {method!r}; valid are fisher, stouffer")


def set_test(scores: Sequence[float], null: Sequence[float], method: str = "mean", n_resamples: int = 10_000,
             seed: int = 0) -> dict:
    """One-sided test that the set with these per-image ``scores`` was trained on.

    Returns ``{"p_value", "k", "statistic", "method", "n_null"}``; a small p-value is evidence of training.
    """
    cfg = SetTestConfig(method, n_resamples, seed).validate()
    s, n = _scores(scores, "scores"), _scores(null, "null scores")
    if len(n) < 10:
        raise InputError(f"set test: the null distribution needs at least 10 non-member scores, got {len(n)}")
    if cfg.method == "mean":
        stat = float(s.mean())
        p = _p_from_sorted(null_means(n, len(s), cfg.n_resamples, np.random.default_rng(cfg.seed)), stat)
    else:
        stat, p = combine(empirical_pvalues(s, n), cfg.method)
    return {"p_value": p, "k": int(len(s)), "statistic": stat, "method": cfg.method, "n_null": int(len(n))}


def power_curve(member_scores, nonmember_scores, null, ks: Sequence[int] = (1, 5, 10, 20), alpha: float = 0.05,
                n_sets: int = 500, method: str = "mean", n_resamples: int = 10_000, seed: int = 0) -> list[dict]:
    """Rejection rates at level ``alpha`` for random sets of k member images (power) and of k non-member images
    (false-positive rate). Each set is k distinct images; ``null`` must be disjoint from both pools."""
    cfg = SetTestConfig(method, n_resamples, seed).validate()
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    pools = {"members": _scores(member_scores, "member scores"), "nonmembers": _scores(nonmember_scores,
                                                                                        "non-member scores")}
    n = _scores(null, "null scores")
    rng = np.random.default_rng(seed)
    out = []
    for k in ks:
        row: dict = {"k": int(k), "alpha": alpha, "method": cfg.method, "n_sets": n_sets, "n_null": int(len(n))}
        sorted_null = null_means(n, k, cfg.n_resamples, rng) if cfg.method == "mean" else None
        for name, pool in pools.items():
            if k > len(pool):
                row[name] = None
                continue
            sets = np.stack([rng.choice(len(pool), size=k, replace=False) for _ in range(n_sets)])
            if sorted_null is not None:
                p = np.array([_p_from_sorted(sorted_null, float(pool[idx].mean())) for idx in sets])
            else:
                pv = empirical_pvalues(pool, n)
                p = np.array([combine(pv[idx], cfg.method)[1] for idx in sets])
            row[name] = float(np.mean(p <= alpha))
        row["power"], row["fpr"] = row.pop("members"), row.pop("nonmembers")
        out.append(row)
    return out


def heads_null_scores(heads, attack: str | None = None, store: str | None = None,
                      score: str = "probability") -> tuple[np.ndarray, dict]:
    """The null for ``set_test`` from trained heads: their ``attack``'s ``score`` ("probability" or "score") on the
    validation split's non-members, read from the feature store the heads were trained on (or ``store``, which must
    hold those rows; of a store with more generated images per row than the heads take, the first are used).
    Returns (null scores, where they came from)."""
    from ..features.store import FeatureStore
    from .heads import Heads, load_heads
    from .train import _str_ids

    h = heads if isinstance(heads, Heads) else load_heads(heads)
    attack = attack or h.default_attack
    if attack not in h.attacks:
        raise UnknownNameError(f"attack {attack!r} is not in {h.path}; it has: {', '.join(h.attacks)}")
    if score not in ("probability", "score"):
        raise UsageError(f"score must be 'probability' or 'score', got {score!r}")
    path = store or (h.info["manifest"].get("feature_store") or {}).get("path")
    if not path:
        raise UsageError(f"{h.path}: heads do not record their feature store; pass the store")
    batch = FeatureStore.open(path, target=h.target).read(ok_only=True)
    index = {i: k for k, i in enumerate(_str_ids(batch["ids"]))}
    val = [index[i] for i in h.info["split"]["validation"] if i in index]
    rows = np.array([r for r in val if int(batch["member"][r]) == 0], dtype=np.int64)
    if len(rows) == 0:
        raise InputError(f"{path}: holds none of the validation non-members of {h.path}")
    sub = {k: np.asarray(v)[rows] for k, v in batch.items() if np.ndim(v) >= 1 and len(v) == len(batch["ids"])}
    want = h.info.get("input_signature", {}).get("n_gen")
    if want and sub["gen_img_emb"].shape[1] > want:
        # Heads trained on the first n_gen images of a larger store: image j has the same seed for any n_gen.
        for key in ("gen_pixels", "gen_img_emb", "gen_caption_emb", "gen_captions"):
            sub[key] = sub[key][:, :want]
    null = np.asarray(h.predict(sub, [attack])[attack][score], np.float64)
    return null, {"heads": str(h.path), "attack": attack, "store": str(path), "score": score, "n": int(len(null))}
