"""Heads trained on the tiny seeded target, made once per test session and shared by the files that need them."""

from __future__ import annotations

from pathlib import Path

_MADE: dict[str, dict] = {}

# The feature settings the heads are trained with; check/scan reuse them from heads.json.
FEATURES = dict(n_gen=1, steps=2, seed=5, batch_size=8, caption_tokens=6)


def tiny_heads(tiny_world: dict, root: Path) -> dict:
    """{"heads": folder, "opts": CLI model options, "kw": api model options}; trained on 6 toy scenes."""
    key = str(tiny_world["target"])
    if key not in _MADE:
        from audit import api
        from audit.toy import scenes

        images, captions = scenes.scene_images(1, "members", 6)
        aux = scenes.write_imagefolder(root / "aux", images, captions, [True, False] * 3)
        kw = dict(embedder=str(tiny_world["clip"]), captioner=str(tiny_world["blip"]))
        api.featurize(key, aux, root / "store.h5", quiet=True, **kw, **FEATURES)
        api.train(root / "store.h5", root / "heads", attacks="II-S,IV", epochs=3, register=False, folds=0)
        _MADE[key] = {"heads": root / "heads", "store": root / "store.h5", "kw": {"target": key, **kw},
                      "opts": ["--target", key, "--embedder", kw["embedder"], "--captioner", kw["captioner"],
                               "--heads", str(root / "heads")]}
    return _MADE[key]
