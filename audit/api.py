"""The Python API. The CLI is a thin layer over these functions; pipelines call them in-process."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError


def list_models() -> list[dict]:
    """Registered targets, embedders and captioners with where each loads from."""
    from .registry import CAPTIONERS, EMBEDDERS, TARGETS
    from . import targets  # noqa: F401  (registers the built-ins)

    rows = []
    for kind, reg in (("target", TARGETS), ("embedder", EMBEDDERS), ("captioner", CAPTIONERS)):
        for e in reg.entries():
            rows.append({"kind": kind, "name": e.name, "source": e.source, "family": e.family,
                         "description": e.description})
    return rows


def build_toy_world(out: str | Path, quick: bool = False, seed: int = 0, device: str = "cpu") -> dict:
    """Rebuild the toy world from a seed (see ``audit.toy.build``)."""
    from .toy.build import ToyBuildConfig, build_world

    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; valid devices are cpu, cuda")
    cfg = ToyBuildConfig.quick(seed) if quick else ToyBuildConfig(seed=seed)
    return build_world(Path(out), cfg, device)


def toy_aux_data(out: str | Path, n_members: int = 200, n_nonmembers: int = 200, seed: int = 0) -> Path:
    """An auxiliary ImageFolder for the bundled toy target."""
    from .toy import bundle_path
    from .toy.data import write_aux_folder

    if n_members < 0 or n_nonmembers < 0:
        raise UsageError("--n-members and --n-nonmembers must be >= 0")
    return write_aux_folder(Path(out), n_members, n_nonmembers, seed, world_dir=bundle_path("target").parent)
