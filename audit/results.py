"""Typed results of the API's operations (``featurize``, ``scan``, ``train``, ``evaluate``; ``check`` returns a
``Verdict``). The CLI formats them, and ``to_dict()`` is the JSON that ``--json`` prints (the same keys in the
same order); ``from_dict`` reads it back. Keys a result does not declare are kept in ``extra``, after the others."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

R = TypeVar("R", bound="Result")


def _optional():
    """A key present only when set (None: absent from ``to_dict()``)."""
    return dataclasses.field(default=None, metadata={"optional": True})


@dataclasses.dataclass
class Result:
    """Base of the typed results; each subclass declares its keys as fields, in the order of its JSON."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out.update(value)
            elif not (f.metadata.get("optional") and value is None):
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})


@dataclasses.dataclass
class FeaturesSummary(Result):
    """``audit features``: the store written, its rows' statuses, how long, with which models and tiers."""

    out: str
    rows: int
    ok: int
    status: dict[str, int]  # rows per status (ok, unreadable, no_caption, ...)
    seconds: float  # featurising, models loaded
    target: dict[str, Any]  # identities: name, hash, ...
    embedder: dict[str, Any]
    captioner: dict[str, Any]
    tiers: list[str]
    unet_evaluations_per_query: dict[str, int]
    first_batch_seconds: float | None
    ray: dict[str, Any] | None = _optional()  # the cluster's run, when on Ray
    reference: dict[str, Any] | None = _optional()  # the reference model's identity (--reference)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ScanSummary(Result):
    """``audit scan``: the results file, verdict counts, and the models, heads and rule that gave them."""

    out: str
    rows: int
    counts: dict[str, int]  # member / non-member / inconclusive always, statuses when they occur
    seconds: float
    target: dict[str, Any]
    heads: str
    attack: str
    tier: str
    decision: dict[str, Any]  # the verdict rule (``attacks.decision.Decision.to_dict``)
    features: dict[str, Any]
    ray: dict[str, Any] | None = _optional()
    report: str | None = _optional()  # the HTML report, when asked for
    heads_source: dict[str, Any] | None = _optional()  # where the heads came from (``attacks.heads.provenance``)
    evidence: dict[str, Any] | None = _optional()  # --evidence: the log, the scan's job id, records added
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def members(self) -> int:
        return self.counts.get("member", 0)


@dataclasses.dataclass
class TrainResult(Result):
    """``audit train``: where the heads were written (and registered), and their heads.json."""

    heads: str
    registered: str | None
    info: dict[str, Any]  # heads.json: attacks with validation metrics and thresholds, split, blind baseline
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvaluateResult(Result):
    """``audit evaluate``: per-attack metrics on the heads' test split (``attacks``, the blind baseline under
    ``blind``) with bootstrap CIs, and what the verdicts at the budget do there."""

    attacks: dict[str, dict[str, Any]]
    default_attack: str
    decision: dict[str, Any]
    n_test: int
    n_test_members: int
    n_test_nonmembers: int
    store: str
    heads: str
    target: dict[str, Any]
    blind_baseline: dict[str, Any] | None
    bootstrap: dict[str, Any]
    warnings: list[str]
    plot: str | None = _optional()
    report: str | None = _optional()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
