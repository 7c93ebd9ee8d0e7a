"""Auxiliary data for the bundled toy target: known members and non-members, from the same distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from . import BUNDLE, scenes
from .build import load_world_config


def aux_indices(world_dir: Path, n_members: int, n_nonmembers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded choice of member and non-member scene indices of a built world."""
    cfg = load_world_config(world_dir)
    if n_members > cfg.n_members or n_nonmembers > cfg.n_nonmembers:
        raise UsageError(
            f"the toy world in {world_dir} has {cfg.n_members} members and {cfg.n_nonmembers} non-members; "
            f"asked for {n_members} and {n_nonmembers}"
        )
    rng = np.random.default_rng(seed)
    return rng.permutation(cfg.n_members)[:n_members], rng.permutation(cfg.n_nonmembers)[:n_nonmembers]


def split_rows(world_dir: Path, split: str, indices) -> tuple[np.ndarray, list[str]]:
    cfg = load_world_config(world_dir)
    chosen = [scenes.sample_scene(cfg.seed, split, int(i)) for i in indices]
    images = np.stack([scenes.render(s) for s in chosen]) if chosen else np.zeros((0, 32, 32, 3), np.uint8)
    return images, [s.caption for s in chosen]


def write_aux_folder(out: Path, n_members: int, n_nonmembers: int, seed: int = 0, world_dir: Path = BUNDLE,
                     exclude_members=(), exclude_nonmembers=()) -> Path:
    """An ImageFolder with a ``member`` column, rows in a seeded shuffled order under neutral file names."""
    cfg = load_world_config(world_dir)
    rng = np.random.default_rng(seed)
    m_pool = [i for i in rng.permutation(cfg.n_members) if i not in set(exclude_members)]
    n_pool = [i for i in rng.permutation(cfg.n_nonmembers) if i not in set(exclude_nonmembers)]
    if n_members > len(m_pool) or n_nonmembers > len(n_pool):
        raise UsageError(
            f"the toy world in {world_dir} has {len(m_pool)} members and {len(n_pool)} non-members available; "
            f"asked for {n_members} and {n_nonmembers}"
        )
    m_img, m_cap = split_rows(world_dir, "members", m_pool[:n_members])
    n_img, n_cap = split_rows(world_dir, "nonmembers", n_pool[:n_nonmembers])
    images = np.concatenate([m_img, n_img])
    captions = m_cap + n_cap
    labels = [True] * n_members + [False] * n_nonmembers
    order = rng.permutation(len(captions))  # file names must not give membership away
    return scenes.write_imagefolder(Path(out), images[order], [captions[i] for i in order],
                                    [labels[i] for i in order])
