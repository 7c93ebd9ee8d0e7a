"""The three access tiers every attack belongs to, and the ``--tier`` option that selects which features to compute.

- ``black-box``: the target is queried only as caption -> generated images (the paper's attacks I-IV).
- ``gray-box``: the auditor holds the weights of a diffusion target and reads its denoising error on the query
  image itself (the denoising loss, PIA, SecMI).
- ``variation``: the target is queried as image -> variations (img2img at a strength; ReDiffuse, Bohacek & Farid):
  a member comes back closer to itself, and more alike across seeds, than a non-member.
"""

from __future__ import annotations

from .errors import UsageError

BLACK_BOX = "black-box"
GRAY_BOX = "gray-box"
VARIATION = "variation"
TIERS = (BLACK_BOX, GRAY_BOX, VARIATION)
TIER_OPTIONS = (*TIERS, "all")


def parse_tier(spec: str) -> tuple[str, ...]:
    """``--tier`` value -> the tiers it selects, in TIERS order: ``all`` is every tier; a comma-separated list
    (``black-box,variation``) selects those."""
    value = str(spec).strip().lower()
    if value == "all":
        return TIERS
    values = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in values if v not in TIERS]
    if unknown or not values:
        raise UsageError(f"unknown tier {spec!r}; valid tiers are {', '.join(TIER_OPTIONS)} (or a comma-separated "
                         "list of tiers)")
    return tuple(t for t in TIERS if t in values)


def tier_name(tiers: tuple[str, ...] | list[str]) -> str:
    """The ``--tier`` value that selects exactly ``tiers``."""
    tiers = tuple(t for t in TIERS if t in tiers)
    return "all" if tiers == TIERS else ",".join(tiers)
