"""The two access tiers every attack belongs to, and the ``--tier`` option that selects which features to compute.

- ``black-box``: the target is queried only as caption -> generated images (the paper's attacks I-IV).
- ``gray-box``: the auditor holds the weights of a diffusion target and reads its denoising error on the query
  image itself (the denoising loss, PIA, SecMI).
"""

from __future__ import annotations

from .errors import UsageError

BLACK_BOX = "black-box"
GRAY_BOX = "gray-box"
TIERS = (BLACK_BOX, GRAY_BOX)
TIER_OPTIONS = (*TIERS, "all")


def parse_tier(spec: str) -> tuple[str, ...]:
    """``--tier`` value -> the tiers it selects, in TIERS order: ``all`` is both."""
    value = str(spec).strip().lower()
    if value == "all":
        return TIERS
    if value not in TIERS:
        raise UsageError(f"unknown tier {spec!r}; valid tiers are {', '.join(TIER_OPTIONS)}")
    return (value,)


def tier_name(tiers: tuple[str, ...] | list[str]) -> str:
    """The ``--tier`` value that selects exactly ``tiers``."""
    tiers = tuple(t for t in TIERS if t in tiers)
    return "all" if tiers == TIERS else tiers[0]
