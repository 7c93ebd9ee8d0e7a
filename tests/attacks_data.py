"""Feature batches with a planted membership signal, and a writer of them into a real feature store.

The signal is planted the way the paper's intuitions say it shows up: generated images (pixels and embeddings) and
the captions of generated images sit closer to the query / caption for members. The query side (query image
embedding, caption embedding and their cosine) carries no signal unless ``blind_signal`` is set, so the blind
baseline has nothing to learn.
"""

from __future__ import annotations

import numpy as np

N_GEN, DIM, PIX = 2, 8, 8


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_batch(n_members: int = 40, n_nonmembers: int = 40, seed: int = 0, signal: bool = True,
                  blind_signal: bool = False, strength: float = 1.0) -> dict[str, np.ndarray]:
    """``strength`` in (0, 1] scales how much closer members' generated images sit (1: far apart classes)."""
    rng = np.random.default_rng(seed)
    n = n_members + n_nonmembers
    member = np.array([1] * n_members + [0] * n_nonmembers, np.int8)
    perm = rng.permutation(n)  # interleave classes so row order says nothing
    member = member[perm]
    m = member.astype(bool)
    q = rng.normal(size=(n, DIM))
    if blind_signal:
        q[m, 0] += 2.5  # members' query images differ in distribution from non-members'
    q = _unit(q)
    c = _unit(q + 0.3 * rng.normal(size=(n, DIM)))
    spread = np.where(m, 2.0 - 1.75 * strength, 2.0)[:, None, None] if signal else np.full((n, 1, 1), 0.9)
    g = _unit(q[:, None] + spread * rng.normal(size=(n, N_GEN, DIM)))
    t = _unit(c[:, None] + spread * rng.normal(size=(n, N_GEN, DIM)))
    # Smooth query pixels (2x2 blocks); generated = query + noise, much less noise for members.
    base = rng.integers(40, 216, size=(n, PIX // 2, PIX // 2, 3))
    qp = np.repeat(np.repeat(base, 2, axis=1), 2, axis=2).astype(np.float64)
    if blind_signal:
        qp[m] += 30
    noise = (np.where(m, 50.0 - 44.0 * strength, 50.0) if signal else np.full(n, 25.0))[:, None, None, None, None]
    gp = qp[:, None] + noise * rng.normal(size=(n, N_GEN, PIX, PIX, 3))
    return {
        "ids": np.array([f"img{i:04d}.png" for i in range(n)]),
        "member": member,
        "status": np.array(["ok"] * n),
        "error": np.array([""] * n),
        "caption": np.array([f"caption {i}" for i in range(n)]),
        "caption_source": np.array(["metadata"] * n),
        "gen_captions": np.array([[f"gen {i} {j}" for j in range(N_GEN)] for i in range(n)]),
        "query_pixels": np.clip(qp, 0, 255).astype(np.uint8),
        "gen_pixels": np.clip(gp, 0, 255).astype(np.uint8),
        "query_img_emb": q,
        "gen_img_emb": g,
        "caption_emb": c,
        "gen_caption_emb": t,
    }


TARGET = {"name": "planted", "hash": "0123456789abcdef"}
EMBEDDER = {"name": "planted-clip", "hash": "1111111111111111"}
CAPTIONER = {"name": "planted-blip", "hash": "2222222222222222"}


def store_manifest(n_rows: int, target: dict = TARGET) -> dict:
    from audit.manifest import make_manifest

    cfg = {"target": target["name"], "n_gen": N_GEN, "steps": 2, "seed": 0, "pixel_size": PIX}
    return make_manifest("features", cfg, target, embedder=EMBEDDER, captioner=CAPTIONER, n_rows=n_rows)


def write_store(batch: dict[str, np.ndarray], path, target: dict = TARGET):
    """Write ``batch`` through the feature store's own writer (the format ``audit features`` produces)."""
    from audit.features.store import FeatureWriter

    n = len(batch["ids"])
    writer = FeatureWriter.create(path, store_manifest(n, target), N_GEN, PIX, DIM)
    writer.append({k: v for k, v in batch.items()})
    return path
