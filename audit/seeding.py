"""Every random choice takes a seed. Seeds for generated images depend on content, not on batch layout."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (unlike hash(), the same in every process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_seeds(seed: int, caption: str, n_gen: int) -> list[int]:
    """Seeds of the ``n_gen`` images generated for one caption.

    They depend on the run seed, the caption and the image index only: the same query gets the same generated
    images whatever its file name, its batch, or whether the run was resumed.
    """
    return [derive_seed("gen", seed, caption, j) for j in range(n_gen)]


def query_seed(seed: int, caption: str, pixels: bytes, purpose: str) -> int:
    """Seed of the noise a gray-box attack draws for one query image: it depends on the run seed, the caption and
    the image's pixels (as the target sees them) only, so a query gets the same noise in any batch or file name."""
    return derive_seed("graybox", purpose, seed, caption, hashlib.sha256(pixels).hexdigest())


def variation_seeds(seed: int, prompt: str, pixels_digest: str, n_var: int) -> list[int]:
    """Seeds of the ``n_var`` variations of one query image (the same at every strength of a sweep): they depend on
    the run seed, the prompt, the digest of the image's pixels as the target takes them and the index only."""
    return [derive_seed("variation", seed, prompt, pixels_digest, j) for j in range(n_var)]
