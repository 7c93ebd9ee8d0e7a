"""Three-way verdicts at a false-positive budget: split-conformal thresholds on the heads' validation split.

With the n validation non-members' probabilities v_i, a query of probability p has the conformal p-value
``(1 + #{v_i >= p}) / (n + 1)``; its verdict is ``member`` when that is <= ``max_fpr``. For a non-member that is
exchangeable with the validation non-members (drawn from the same distribution, never fitted on), the p-value is
super-uniform, so the chance of a ``member`` verdict is at most ``max_fpr`` (over the draw of the validation split
and the query). Symmetrically, with the validation members' probabilities m_j, the verdict is ``non-member`` when
``(1 + #{m_j <= p}) / (n_members + 1) <= max_miss``: a member like the validation members is called a non-member
with probability at most ``max_miss``. Between the two: ``inconclusive``.

In threshold form: ``member`` iff ``p >= member_threshold``, ``non-member`` iff ``p < nonmember_threshold``.
The smallest p-value n validation rows can give is 1/(n + 1), so a budget needs ``n >= 1/budget - 1`` rows of its
class (99 non-members for 1%); with fewer the side is unresolvable, its threshold is None, no verdict takes that
side, and ``notes`` says so. Where the two regions overlap (well separated classes), the rule cuts at their
midpoint; each region only shrinks, so both bounds still hold.

``balanced`` is the two-way rule: member iff ``p >= `` the threshold maximising balanced accuracy on validation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..errors import ArtifactError, UnknownNameError, UsageError
from ..verdict import INCONCLUSIVE, MEMBER, NON_MEMBER

RULES = ("budget", "balanced")
DEFAULT_RULE = "budget"
DEFAULT_MAX_FPR = 0.01
VALIDATION_KEY = "validation_probabilities"  # per attack in heads.json: {"members": [...], "nonmembers": [...]}


def check_budget(max_fpr: float, max_miss: float | None = None, rule: str = DEFAULT_RULE) -> tuple[float, float]:
    """Validated (max_fpr, max_miss); max_miss defaults to max_fpr."""
    if rule not in RULES:
        raise UnknownNameError(f"unknown decision rule {rule!r}; valid rules are: {', '.join(RULES)}")
    max_miss = max_fpr if max_miss is None else max_miss
    for name, v in (("--max-fpr", max_fpr), ("--max-miss", max_miss)):
        if not (isinstance(v, (int, float)) and 0 < float(v) < 1):
            raise UsageError(f"{name} must be in (0, 1), got {v}")
    return float(max_fpr), float(max_miss)


def rows_needed(budget: float) -> int:
    """Fewest validation rows of a class for which a conformal p-value can reach ``budget``."""
    return max(0, math.ceil(1.0 / budget - 1.0 - 1e-9))


def _allowed(budget: float, n: int) -> int:
    """Most validation rows of the class that may lie beyond the query for the verdict to be taken (-1: none)."""
    return int(math.floor(budget * (n + 1) + 1e-9)) - 1


@dataclasses.dataclass(frozen=True)
class Decision:
    """A fitted verdict rule for one attack; ``decide(p)`` gives ``member`` / ``non-member`` / ``inconclusive``."""

    rule: str
    attack: str
    max_fpr: float | None
    max_miss: float | None
    member_threshold: float | None  # member iff p >= this; None: no member verdict is possible
    nonmember_threshold: float | None  # non-member iff p < this; None: no non-member verdict is possible
    validation_fpr: float | None  # validation non-members at or above member_threshold
    validation_miss: float | None  # validation members below nonmember_threshold
    n_validation_nonmembers: int
    n_validation_members: int
    notes: tuple[str, ...] = ()
    # Which rows the thresholds were fitted on: "validation" (a split), or "out-of-fold" (cross-fitted heads, whose
    # validation_* fields then count every out-of-fold row).
    calibrated_on: str = "validation"

    @property
    def member_resolvable(self) -> bool:
        return self.member_threshold is not None

    @property
    def nonmember_resolvable(self) -> bool:
        return self.nonmember_threshold is not None

    def decide(self, probability: float) -> str:
        p = float(probability)
        if self.member_threshold is not None and p >= self.member_threshold:
            return MEMBER
        if self.nonmember_threshold is not None and p < self.nonmember_threshold:
            return NON_MEMBER
        return INCONCLUSIVE

    def decide_all(self, probabilities) -> np.ndarray:
        """Verdicts of an array of probabilities (object array of strings)."""
        p = np.asarray(probabilities, np.float64)
        out = np.full(p.shape, INCONCLUSIVE, dtype=object)
        if self.nonmember_threshold is not None:
            out[p < self.nonmember_threshold] = NON_MEMBER
        if self.member_threshold is not None:
            out[p >= self.member_threshold] = MEMBER
        return out

    def describe(self) -> str:
        """One line: the rule, its thresholds and what they achieve on validation."""
        member = ("no member verdict possible" if self.member_threshold is None
                  else f"member at P >= {self.member_threshold:.3f}")
        nonmember = ("no non-member verdict possible" if self.nonmember_threshold is None
                     else f"non-member below {self.nonmember_threshold:.3f}")
        return (f"{rule_text(self.to_dict())}: {member}, {nonmember}; on {self.calibrated_on} FPR "
                f"{_rate(self.validation_fpr)} "
                f"(resolution 1/{self.n_validation_nonmembers}), miss rate {_rate(self.validation_miss)} "
                f"(resolution 1/{self.n_validation_members})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Decision":
        """The rule back from ``to_dict`` (a Verdict's ``decision``); derived fields are recomputed."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "notes" else v) for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        n_neg, n_pos = self.n_validation_nonmembers, self.n_validation_members
        return {
            "rule": self.rule,
            "attack": self.attack,
            "max_fpr": self.max_fpr,
            "max_miss": self.max_miss,
            "member_threshold": self.member_threshold,
            "nonmember_threshold": self.nonmember_threshold,
            "validation_fpr": self.validation_fpr,
            "validation_miss": self.validation_miss,
            "fpr_resolution": 1.0 / n_neg if n_neg else None,
            "miss_resolution": 1.0 / n_pos if n_pos else None,
            "n_validation_nonmembers": n_neg,
            "n_validation_members": n_pos,
            "member_resolvable": self.member_resolvable,
            "nonmember_resolvable": self.nonmember_resolvable,
            "notes": list(self.notes),
            "calibrated_on": self.calibrated_on,
        }


def rule_text(decision: dict | None) -> str:
    """The rule of a ``{"rule", "max_fpr", "max_miss"}`` dict (an evaluation's or a Decision's) in a few words."""
    d = decision or {}
    if not d:
        return "an unrecorded rule"
    if d.get("rule") == "balanced":
        return "the two-way rule (threshold maximising balanced accuracy on validation)"
    miss = d.get("max_miss")
    return f"max-fpr {d.get('max_fpr'):g}" + (f", max-miss {miss:g}" if miss not in (None, d.get("max_fpr")) else "")


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def conformal_thresholds(nonmembers, members, max_fpr: float, max_miss: float | None = None
                         ) -> tuple[float | None, float | None]:
    """(member_threshold, nonmember_threshold) of the budget rule from validation probabilities of each class."""
    max_fpr, max_miss = check_budget(max_fpr, max_miss)
    neg = np.sort(np.asarray(nonmembers, np.float64))[::-1]  # descending
    pos = np.sort(np.asarray(members, np.float64))  # ascending
    member_t = nonmember_t = None
    k = _allowed(max_fpr, len(neg))
    if k >= 0:
        # member iff #{v >= p} <= k iff p > the (k+1)-th largest non-member; every p passes when k >= n.
        member_t = 0.0 if k >= len(neg) else float(np.nextafter(neg[k], np.inf))
    k = _allowed(max_miss, len(pos))
    if k >= 0:
        # non-member iff #{m <= p} <= k iff p < the (k+1)-th smallest member.
        nonmember_t = float(np.nextafter(1.0, np.inf)) if k >= len(pos) else float(pos[k])
    if member_t is not None and nonmember_t is not None and nonmember_t > member_t:
        member_t = nonmember_t = (member_t + nonmember_t) / 2
    return member_t, nonmember_t


def fit_decision(entry: dict, attack: str, rule: str = DEFAULT_RULE, max_fpr: float = DEFAULT_MAX_FPR,
                 max_miss: float | None = None, where: str = "heads") -> Decision:
    """The verdict rule of one attack from its heads.json entry (validation probabilities and balanced threshold)."""
    max_fpr, max_miss = check_budget(max_fpr, max_miss, rule)
    val = entry.get(VALIDATION_KEY)
    if not isinstance(val, dict) or "members" not in val or "nonmembers" not in val:
        raise ArtifactError(f"{where}: heads record no validation probabilities for attack {attack} (made by an "
                            "older audit, before three-way verdicts); retrain them with `audit train STORE.h5 "
                            "--out HEADS`")
    neg, pos = np.asarray(val["nonmembers"], np.float64), np.asarray(val["members"], np.float64)
    on = "out-of-fold" if entry.get("cross_fit") else "validation"
    notes: list[str] = []
    if rule == "balanced":
        t = float(entry["threshold"])
        member_t = nonmember_t = t
        max_fpr = max_miss = None
    else:
        member_t, nonmember_t = conformal_thresholds(neg, pos, max_fpr, max_miss)
        if member_t is None:
            notes.append(f"max-fpr {max_fpr:g} needs >= {rows_needed(max_fpr)} {on} non-members; these heads "
                         f"have {len(neg)} (attack {attack}), so no verdict can be 'member'")
        if nonmember_t is None:
            flag = "max-miss" if max_miss != max_fpr else "the miss budget (max-fpr)"
            notes.append(f"{flag} {max_miss:g} needs >= {rows_needed(max_miss)} {on} members; these heads "
                         f"have {len(pos)} (attack {attack}), so no verdict can be 'non-member'")
    fpr = float((neg >= member_t).mean()) if member_t is not None and len(neg) else None
    miss = float((pos < nonmember_t).mean()) if nonmember_t is not None and len(pos) else None
    return Decision(rule, attack, max_fpr, max_miss, member_t, nonmember_t, fpr, miss, int(len(neg)), int(len(pos)),
                    tuple(notes), on)


def validation_record(probs: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """What heads.json keeps per attack so any budget can be decided later: each class's sorted probabilities."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    return {"members": np.sort(p[y == 1]).tolist(), "nonmembers": np.sort(p[y == 0]).tolist()}
