"""The typed result of scoring one image: what `check --json` prints and each line of a scan holds."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

MEMBER, NON_MEMBER, INCONCLUSIVE = "member", "non-member", "inconclusive"
VERDICTS = (MEMBER, NON_MEMBER, INCONCLUSIVE)


@dataclasses.dataclass
class Verdict:
    """Was this image (with this caption) in the target's training data, according to the heads?

    ``verdict`` is ``member``, ``non-member`` or ``inconclusive`` by the chosen ``attack``'s probability (the
    heads' default, attack IV when trained) and the rule in ``decision`` (``audit.attacks.decision``): by default
    ``member`` when ``probability >= threshold``, the split-conformal threshold at which at most ``max_fpr`` of
    unseen non-members would be called members, ``non-member`` below the threshold at which at most ``max_miss``
    of members would be missed, ``inconclusive`` between; ``threshold`` is None when the budget cannot be resolved
    with the heads' validation rows (``decision["notes"]`` and ``warnings`` say so). None when the row could not
    be scored (``status`` says why, ``error`` is a one-line message). ``scores`` holds every attack's ``score``
    (the head's raw logit), ``probability`` (calibrated on validation data), ``threshold`` and
    ``nonmember_threshold`` (the same rule fitted for that attack), ``verdict`` and ``tier``. ``tier`` is the
    chosen attack's access tier (``black-box`` or ``gray-box``).
    """

    image: str
    target: str
    status: str = "ok"
    caption: str | None = None
    caption_source: str | None = None  # metadata, txt, argument, or captioner (the caption was written for it)
    verdict: str | None = None
    probability: float | None = None
    threshold: float | None = None
    attack: str | None = None
    tier: str | None = None  # access tier of ``attack``
    scores: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # rule, max_fpr, max_miss, member/nonmember thresholds, validation FPR and miss rate, their resolutions,
    # member_resolvable / nonmember_resolvable, notes (see audit.attacks.decision.Decision.to_dict)
    decision: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    heads: str | None = None  # the heads folder whose ONNX heads scored this image
    # where those heads came from: source (given / registered / bundled), registered (when) and registered_from,
    # store, calibrated_on, folds, n_calibration (audit.attacks.heads.provenance)
    heads_source: dict[str, Any] | None = None
    id: str | None = None  # row id inside a scanned folder (the key `scan --resume` skips on)

    @property
    def is_member(self) -> bool:
        return self.verdict == MEMBER

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        # allow_nan=False: NaN is not JSON; a non-finite number here would be a bug, better loud than silent.
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Verdict":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
