"""The toy world: procedural captioned scenes and tiny trained target / CLIP / BLIP models, bundled."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError

BUNDLE = Path(__file__).parent / "bundle"


def bundle_path(component: str) -> Path:
    """Folder of a bundled component: ``target``, ``base`` (the target before fine-tuning), ``clip`` or ``blip``."""
    path = BUNDLE / component
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path}: the bundled toy {component} is missing from this installation; rebuild it with "
            f"`audit toy build --out {BUNDLE}`"
        )
    return path
