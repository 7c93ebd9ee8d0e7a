"""Feature stores of the study, each made once and cached under a hash of everything that decides its content.

A ``StoreSpec`` names the data folder, the models (by spec, plus the config of any model trained here), the
feature settings, and how the target is queried: directly, through a defence, or by replaying the images of
another store. Replay serves a store's generated images back through the ``Generator`` protocol, so ablations
that change only what happens after generation (the embedder, an output defence) do not pay for generation again.
It is exact when the store's pixels are the target's own images (pixel size = target resolution, checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import Config
from ..errors import ArtifactError, UsageError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StoreSpec(Config):
    name: str = ""  # human-readable label, part of the file name only
    data: str = ""  # ImageFolder path
    target: str = "toy"
    embedder: str = "toy-clip"
    captioner: str = "toy-blip"
    n_gen: int = 2
    steps: int = 20
    seed: int = 0
    batch_size: int = 32
    missing_caption: str = "no_caption"
    defence: str = "none"
    replay: str = ""  # path of the store whose generated images are served instead of querying the target
    tier: str = "black-box"  # `audit features --tier`
    graybox_timesteps: tuple = ()  # gray-box stores: the timesteps each attack's error is read at
    var_strengths: tuple = ()  # variation stores: `--var-strengths`
    n_var: int = 0  # variation stores: `--n-var`
    reference: str = ""  # `--reference`: the same features on this model, with the same seeds and noise
    # Configs of models trained by the experiment (their folders are named by these hashes), so a changed
    # recipe never reuses an old model's store.
    provenance: dict = dataclasses.field(default_factory=dict)

    def key(self) -> str:
        d = self.to_dict()
        d.pop("name")
        if d["tier"] == "black-box":
            # Black-box stores keep the keys they had before the gray-box tier, so cached ones stay valid.
            d.pop("tier")
            d.pop("graybox_timesteps")
        # Fields added later leave the keys of stores that do not use them unchanged.
        for field in ("var_strengths", "n_var", "reference"):
            if not d[field]:  # each default is empty or 0
                d.pop(field)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def path(self, workdir: Path) -> Path:
        return Path(workdir) / "stores" / f"{self.name}-{self.key()}.h5"


class ReplayGenerator:
    """The generated images of a finished feature store, served as a ``Generator`` with the original target's
    identity. Only the settings the store was made with are accepted (n_gen up to the store's)."""

    def __init__(self, store_path: str | Path):
        from ..features.store import FeatureStore

        fs = FeatureStore.open(store_path)
        if not fs.complete:
            raise ArtifactError(f"{store_path}: cannot replay an incomplete feature store")
        self.path = Path(store_path)
        self.manifest = fs.manifest
        self.config = fs.manifest["config"]
        batch = fs.read(ok_only=True, keys=("caption", "gen_pixels"))
        self._images = {str(c): g for c, g in zip(batch["caption"], batch["gen_pixels"])}
        self.n_gen = fs.n_gen
        self.resolution = fs.pixel_size
        self.name = fs.manifest["target"]["name"]

    def identity(self) -> dict:
        return dict(self.manifest["target"])

    def check_exact(self, target_resolution: int) -> None:
        if target_resolution != self.resolution:
            raise ArtifactError(f"{self.path}: stores {self.resolution}px pixels of a {target_resolution}px target; "
                                "replaying them would not reproduce the target's images")

    def generate(self, captions: Sequence[str], n_gen: int, seed: int, steps: int, guidance: float = 1.0) -> np.ndarray:
        want = {"seed": seed, "steps": steps, "guidance": guidance}
        got = {k: self.config[k] for k in want}
        if want != got or n_gen > self.n_gen:
            raise UsageError(f"{self.path}: replay holds n_gen {self.n_gen} with {got}; asked for n_gen {n_gen} "
                             f"with {want}")
        try:
            return np.stack([self._images[str(c)][:n_gen] for c in captions])
        except KeyError as exc:
            raise UsageError(f"{self.path}: no generated images for caption {exc.args[0]!r}") from None


def _threads() -> None:
    import torch

    torch.set_num_threads(1)


def build_store(spec: dict, workdir: str) -> dict:
    """Make (or finish) the store of ``spec``; returns its summary. Runs in a worker process."""
    from ..defences import DefendedGenerator, parse_defence
    from ..features.compute import FeaturesConfig, Models
    from ..targets.builtin import load_captioner, load_embedder, load_target

    from ..features.store import FeatureStore
    from ..tiers import GRAY_BOX

    _threads()
    s = StoreSpec.from_dict(spec)
    out = s.path(Path(workdir))
    if out.exists() and FeatureStore.open(out).complete:
        # Named by the hash of its spec, so a finished store is this spec's store: nothing to load or compute.
        return {"path": str(out), "rows": FeatureStore.open(out).n_rows, "cached": True}
    extra = {"graybox_timesteps": tuple(s.graybox_timesteps)} if s.graybox_timesteps else {}
    if s.var_strengths:
        extra["var_strengths"] = tuple(s.var_strengths)
    if s.n_var:
        extra["n_var"] = int(s.n_var)
    cfg = FeaturesConfig(target=s.target, embedder=s.embedder, captioner=s.captioner, n_gen=s.n_gen, steps=s.steps,
                         seed=s.seed, batch_size=s.batch_size, missing_caption=s.missing_caption, tier=s.tier,
                         reference=s.reference, **extra).validate()
    if s.reference:
        if s.replay or s.defence != "none":
            raise UsageError(f"store {s.name}: a reference store queries both models itself (no replay or defence)")
        # Models.load checks that the reference fits the target before anything is computed.
        models = Models.load(s.target, s.embedder, s.captioner, graybox=GRAY_BOX in cfg.tiers,
                             reference=s.reference)
        return _compute(s, out, models, cfg)
    if s.replay:
        generator = ReplayGenerator(s.replay)
        generator.check_exact(load_target(s.target).resolution)
    else:
        generator = load_target(s.target)
    if s.defence != "none":
        generator = DefendedGenerator(generator, parse_defence(s.defence))
    models = Models(generator, load_embedder(s.embedder), load_captioner(s.captioner))
    return _compute(s, out, models, cfg)


def _compute(s: StoreSpec, out: Path, models, cfg) -> dict:
    from ..features.compute import compute_store

    summary = compute_store(s.data, out, models, cfg, resume=out.exists(), quiet=True)
    if summary["ok"] < summary["rows"]:
        raise ArtifactError(f"{out}: {summary['rows'] - summary['ok']} rows failed ({summary['status']})")
    return {"path": str(out), "rows": summary["rows"], "status": summary["status"]}


def read_store(path: str | Path, n_gen: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The ok rows of a store, with only the first ``n_gen`` generated images of each row (image j of a caption
    has the same seed whatever n_gen was asked, so a prefix is exactly what a smaller n_gen would have made)."""
    from ..features.store import FeatureStore

    fs = FeatureStore.open(path)
    batch = fs.read(ok_only=True)
    if n_gen is not None and fs.n_gen:
        if n_gen > fs.n_gen:
            raise UsageError(f"{path}: holds {fs.n_gen} generated images per row, asked for {n_gen}")
        for key in ("gen_pixels", "gen_img_emb", "gen_caption_emb", "gen_captions"):
            batch[key] = np.ascontiguousarray(batch[key][:, :n_gen])
    return batch, fs.manifest
