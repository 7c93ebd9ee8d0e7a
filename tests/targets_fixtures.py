"""Fixtures for the target tests: tiny models of each real family, and a Hugging Face cache that holds them
under the real repo ids, so the registered names (``ldm``, ``sd-1.5``, ``dalle-mini``, ``blip-base``, ...)
resolve and load through exactly the code paths real weights take."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def put_in_hub_cache(cache: Path, repo_id: str, src: Path) -> Path:
    """Lay ``src`` out as ``hf download`` does: models--org--name/{refs/main, snapshots/<commit>/...}.

    Files are symlinked like the cache's own blob links; the commit is derived from the repo id.
    """
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    for path in sorted(Path(src).rglob("*")):
        if path.is_file():
            dest = snapshot / path.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), dest)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_families(tiny_world, tmp_path_factory):
    """Tiny LDM, DALL-E mini and open_clip folders (plus the session's tiny SD, CLIP and BLIP)."""
    from audit.testing import tiny

    out = tmp_path_factory.mktemp("families")
    return {
        "ldm": tiny.build_tiny_ldm(out),
        "dalle": tiny.build_tiny_dalle(out),
        "open_clip": tiny.build_tiny_open_clip(out),
        "sd": tiny_world["target"],
        "clip": tiny_world["clip"],
        "blip": tiny_world["blip"],
    }


HUB_LAYOUT = {
    "CompVis/ldm-text2im-large-256": "ldm",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd",
    "kuprel/min-dalle": "dalle",
    "openai/clip-vit-large-patch14": "clip",
    "Salesforce/blip-image-captioning-base": "blip",
    "tiny-org/tiny-open-clip": "open_clip",
}


@pytest.fixture
def hub_cache(tiny_families, tmp_path, monkeypatch):
    """An HF cache (and an empty audit home) holding the tiny families under the real repo ids."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    for repo_id, key in HUB_LAYOUT.items():
        put_in_hub_cache(cache, repo_id, tiny_families[key])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "audit_home"))
    return cache


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while these modules run: on a shared 2-core machine a second thread made tiny-model
    generation ~40x slower under contention (0.2 s -> 9 s per image), and one is plenty for tiny models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
