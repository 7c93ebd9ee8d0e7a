"""Set-level inference: was this set of k images (of one owner) trained on, as a whole?

A one-sided test of H0 "the set's images are non-members" against H1 "they are members", from the per-image
scores of one attack head. The null comes only from scores of images known NOT to be members and never used to fit
the heads (their test split's non-members), so no member score is needed to calibrate it:

- ``permutation`` (default): the statistic is the mean score of the set. Under H0 the set's k scores and the n null
  scores are exchangeable, so the statistic is compared with the means of k scores drawn without replacement from
  the pooled k + n scores (Monte Carlo, seeded): p = (1 + #{draws >= statistic}) / (1 + draws). Valid for any
  number of draws and any null size, and it accounts for the null being a finite sample.
- ``fisher``: per-image empirical p-values against the null scores, combined as -2 sum log p ~ chi2(2k).
- ``stouffer``: the same p-values as normal quantiles, combined as sum z / sqrt(k) ~ N(0, 1).

Empirical p-values are (1 + #{null >= s}) / (1 + n_null): never 0, and valid (P(p <= a) <= a) for one image. Fisher
and Stouffer treat the images' p-values as independent, which they are not when they share one finite null (they
run over-confident as k grows); prefer the permutation test. Scores of the heads' validation split are not a valid
null: early stopping and calibration were fitted on them, so their non-members score lower than unseen ones.
``power_curve`` measures how often a test rejects member sets (power) and non-member sets (false-positive rate).

Verdicts at level ``alpha``: ``member`` when p <= alpha (a non-member set gets it with probability at most alpha),
else ``inconclusive``. There is no ``non-member`` verdict for a set: the test only measures evidence of training,
and a large p-value says the set's scores are not distinguishable from held-out non-members' by these heads, not
that the set was left out (a weak attack gives large p-values to member sets too). When alpha lies below the
smallest p-value the test can give (``min_p_value``: 1/(1 + n_resamples), and for the permutation test also
1 / C(n_null + k, k); for Fisher/Stouffer the combination of k p-values of 1/(1 + n_null)), no set can be called a
member, and ``reason`` says so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats

from ..config import Config
from ..errors import InputError, UnknownNameError, UsageError
from ..verdict import INCONCLUSIVE, MEMBER

METHODS = ("permutation", "fisher", "stouffer")
MIN_NULL = 10


@dataclasses.dataclass
class SetTestConfig(Config):
    method: str = "permutation"
    n_resamples: int = 10_000  # Monte Carlo draws of the permutation distribution
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


def permutation_pvalue(scores: np.ndarray, null: np.ndarray, n_resamples: int, rng: np.random.Generator) -> float:
    """p-value of the mean of ``scores`` among means of len(scores) draws without replacement from scores + null."""
    k = len(scores)
    pool = np.concatenate([scores, null])
    observed = scores.mean()
    exceed = 0
    step = max(1, 2_000_000 // len(pool))  # bound memory
    for i in range(0, n_resamples, step):
        m = min(step, n_resamples - i)
        draws = rng.permuted(np.broadcast_to(pool, (m, len(pool))), axis=1)[:, :k].mean(axis=1)
        # A tiny tolerance so that a draw equal to the observed mean up to rounding counts as "at least as large".
        exceed += int((draws >= observed - 1e-12 * max(1.0, abs(observed))).sum())
    return float((1.0 + exceed) / (1.0 + n_resamples))


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


def _test(s: np.ndarray, n: np.ndarray, cfg: SetTestConfig, rng: np.random.Generator) -> tuple[float, float]:
    if cfg.method == "permutation":
        return float(s.mean()), permutation_pvalue(s, n, cfg.n_resamples, rng)
    return combine(empirical_pvalues(s, n), cfg.method)


def min_p_value(k: int, n_null: int, cfg: SetTestConfig) -> float:
    """The smallest p-value the test can give a set of k scores against n_null null scores."""
    if cfg.method == "permutation":
        # The observed set is one of C(n + k, k) equally likely k-subsets of the pool; Monte Carlo adds 1/(1 + R).
        exact = math.exp(-(math.lgamma(n_null + k + 1) - math.lgamma(k + 1) - math.lgamma(n_null + 1)))
        return max(1.0 / (1.0 + cfg.n_resamples), exact)
    return combine(np.full(k, 1.0 / (1.0 + n_null)), cfg.method)[1]


def set_verdict(p_value: float, alpha: float, floor: float) -> dict:
    """``{"verdict", "alpha", "min_p_value", "reason"}`` of a set: member when p <= alpha, else inconclusive."""
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    if p_value <= alpha:
        return {"verdict": MEMBER, "alpha": alpha, "min_p_value": floor,
                "reason": f"p = {p_value:.3g} <= alpha {alpha:g}: evidence that the set was trained on"}
    if floor > alpha:
        reason = (f"alpha {alpha:g} is below the smallest p-value this test can give ({floor:.3g}: more null scores, "
                  "more images or more resamples are needed), so no set can be called a member")
    else:
        reason = (f"p = {p_value:.3g} > alpha {alpha:g}: no evidence of training at this level; a set test has no "
                  "non-member verdict (a large p-value does not show the set was left out)")
    return {"verdict": INCONCLUSIVE, "alpha": alpha, "min_p_value": floor, "reason": reason}


def set_test(scores: Sequence[float], null: Sequence[float], method: str = "permutation", n_resamples: int = 10_000,
             seed: int = 0, alpha: float = 0.05) -> dict:
    """One-sided test that the set with these per-image ``scores`` was trained on; ``null``: scores of held-out
    non-members (never fitted on).

    Returns ``{"p_value", "k", "statistic", "method", "n_null", "verdict", "alpha", "min_p_value", "reason"}``; a
    small p-value is evidence of training; ``verdict`` is ``member`` when p <= ``alpha``, else ``inconclusive``.
    """
    cfg = SetTestConfig(method, n_resamples, seed).validate()
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    s, n = _scores(scores, "scores"), _scores(null, "null scores")
    if len(n) < MIN_NULL:
        raise InputError(f"set test: the null distribution needs at least {MIN_NULL} non-member scores, got {len(n)}")
    stat, p = _test(s, n, cfg, np.random.default_rng(cfg.seed))
    return {"p_value": p, "k": int(len(s)), "statistic": stat, "method": cfg.method, "n_null": int(len(n)),
            **set_verdict(p, alpha, min_p_value(len(s), len(n), cfg))}


def power_curve(member_scores, nonmember_scores, ks: Sequence[int] = (1, 5, 10, 20), alpha: float = 0.05,
                n_sets: int = 300, method: str = "permutation", n_resamples: int = 200, seed: int = 0,
                null_fraction: float = 0.5) -> list[dict]:
    """Rejection rates at level ``alpha`` of random sets of k member images (power) and of k non-member images
    (false-positive rate), all scored by heads that never saw them.

    In each trial the non-member scores are split at random: ``null_fraction`` of them form the null, and the
    non-member set is drawn from the rest, so a set never overlaps its own null. A Monte Carlo p-value with few
    resamples is still a valid test (it only loses a little power).
    """
    cfg = SetTestConfig(method, max(100, n_resamples), seed).validate()
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < null_fraction < 1:
        raise UsageError(f"null_fraction must be in (0, 1), got {null_fraction}")
    members = _scores(member_scores, "member scores")
    nonmembers = _scores(nonmember_scores, "non-member scores")
    n_null = int(round(null_fraction * len(nonmembers)))
    rng = np.random.default_rng(seed)
    out = []
    for k in ks:
        rej = {"power": [], "fpr": []}
        for _ in range(n_sets):
            order = rng.permutation(len(nonmembers))
            null, rest = nonmembers[order[:n_null]], nonmembers[order[n_null:]]
            for name, pool in (("power", members), ("fpr", rest)):
                if k <= len(pool):
                    chosen = pool[rng.choice(len(pool), size=k, replace=False)]
                    rej[name].append(_test(chosen, null, cfg, rng)[1] <= alpha)
        out.append({"k": int(k), "alpha": alpha, "method": cfg.method, "n_sets": n_sets, "n_null": n_null,
                    "n_resamples": cfg.n_resamples,
                    "power": float(np.mean(rej["power"])) if rej["power"] else None,
                    "fpr": float(np.mean(rej["fpr"])) if rej["fpr"] else None})
    return out


def heads_null_scores(heads, attack: str | None = None, store: str | None = None,
                      score: str = "probability") -> tuple[np.ndarray, dict]:
    """The null for ``set_test`` from trained heads: their ``attack``'s ``score`` ("probability" or "score") on the
    test split's non-members (never used to fit, stop or calibrate the heads), read from the feature store the heads
    were trained on (or ``store``, which must hold those rows; of a store with more generated images per row than
    the heads take, the first are used). Returns (null scores, where they came from)."""
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
    test = [index[i] for i in h.info["split"]["test"] if i in index]
    rows = np.array([r for r in test if int(batch["member"][r]) == 0], dtype=np.int64)
    if len(rows) == 0:
        raise InputError(f"{path}: holds none of the test-split non-members of {h.path}")
    sub = {k: np.asarray(v)[rows] for k, v in batch.items() if np.ndim(v) >= 1 and len(v) == len(batch["ids"])}
    want = h.info.get("input_signature", {}).get("n_gen")
    if want and sub["gen_img_emb"].shape[1] > want:
        # Heads trained on the first n_gen images of a larger store: image j has the same seed for any n_gen.
        for key in ("gen_pixels", "gen_img_emb", "gen_caption_emb", "gen_captions"):
            sub[key] = sub[key][:, :want]
    null = np.asarray(h.predict(sub, [attack])[attack][score], np.float64)
    return null, {"heads": str(h.path), "attack": attack, "store": str(path), "score": score, "n": int(len(null))}
