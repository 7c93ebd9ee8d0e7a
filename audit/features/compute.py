"""Per-query features over the backend protocols (generate, caption, embed; the denoiser): what every attack reads.

For each row with image ``x`` and caption ``c``, always: embedder embeddings of ``x`` and ``c`` and ``x`` as a small
pixel array (the blind baseline's and the reports' inputs). Black-box tier: ``n_gen`` images generated from ``c``
with content-derived seeds, a caption of each by the captioner, their image embeddings, the text embeddings of their
captions, and the generated images as small pixel arrays. Gray-box tier: each gray-box attack's error vector
(``features.graybox``) from the target's own VAE encoder and UNet. Variation tier: the distances of the target's
variations (img2img) of ``x`` to ``x`` and to each other (``features.variation``). With a reference model
(``--reference``, e.g. the base model a fine-tune started from), every black-box and gray-box feature is computed on
the reference too, with the very same seeds and noise (``features.reference``), and stored beside the target's under
``ref_`` names. Only ``targets.base`` protocols are used, so torch, ONNX and HTTP backends plug in unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ..config import Config
from ..errors import UsageError
from ..imagefolder import Row, load_row_image, read_imagefolder
from ..kernels.preprocess import resize_pixels
from ..manifest import make_manifest
from ..progress import progress
from ..tiers import BLACK_BOX, GRAY_BOX, VARIATION, parse_tier, tier_name
from . import graybox, variation
from .store import KIND, REF_PREFIX, TIER_KEYS, FeatureStore, FeatureWriter, empty_batch, store_tiers

log = logging.getLogger(__name__)

PIXEL_SIZE = 32
MISSING_CAPTION_MODES = ("no_caption", "captioner")


@dataclasses.dataclass
class FeaturesConfig(Config):
    """Everything that decides a row's features. Saved in the store's manifest; ``--resume`` must match it."""

    target: str = "toy"
    embedder: str = ""  # resolved to the target's default when empty
    captioner: str = ""
    n_gen: int = 2
    steps: int = 25
    guidance: float = 1.0  # 1.0 = no classifier-free guidance: what a black-box API user gets by default
    seed: int = 0
    batch_size: int = 8  # captions per generate call; rows are batched in this order, so it is part of the config
    pixel_size: int = PIXEL_SIZE
    caption_tokens: int = 30  # most new tokens of each caption the captioner writes
    missing_caption: str = "no_caption"  # "no_caption": the row fails; "captioner": caption the query image
    tier: str = BLACK_BOX  # --tier: black-box, gray-box or all
    # Gray-box: the timesteps (of the target's training schedule, 0-999 for SD) at which each attack's error is
    # read; SecMI's DDIM inversion takes one step per timestep, from 0.
    graybox_timesteps: tuple = graybox.DEFAULT_TIMESTEPS
    # Variation: the img2img strengths of the sweep and the variations (seeds) at each, over ``steps`` DDIM steps.
    var_strengths: tuple = variation.DEFAULT_STRENGTHS
    n_var: int = variation.DEFAULT_N_VAR
    clid_timesteps: tuple = graybox.CLID_TIMESTEPS  # CLiD reads its own timesteps (the paper's)
    reference: str = ""  # --reference: a model computed with the same seeds and noise ("" = none)

    @property
    def tiers(self) -> tuple[str, ...]:
        return parse_tier(self.tier)

    def validate(self) -> "FeaturesConfig":
        for name in ("n_gen", "steps", "batch_size", "caption_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.guidance < 0:
            raise UsageError(f"--guidance must be >= 0, got {self.guidance}")
        if self.pixel_size < 8:
            raise UsageError(f"pixel_size must be >= 8, got {self.pixel_size}")
        if self.missing_caption not in MISSING_CAPTION_MODES:
            raise UsageError(f"missing_caption must be one of {', '.join(MISSING_CAPTION_MODES)}, "
                             f"got {self.missing_caption!r}")
        if GRAY_BOX in self.tiers:
            self.graybox_timesteps = graybox.check_timesteps(self.graybox_timesteps)
            self.clid_timesteps = graybox.check_timesteps(self.clid_timesteps)
        if VARIATION in self.tiers:
            if self.n_var < 1:
                raise UsageError(f"--n-var must be >= 1, got {self.n_var}")
            self.var_strengths = variation.check_strengths(self.var_strengths, self.steps)
            if self.reference:
                raise UsageError("--reference applies to the black-box and gray-box tiers; the variation tier has "
                                 "no reference features yet: drop --reference or choose --tier black-box,gray-box")
        return self

    def for_store(self) -> dict:
        """The config as recorded in a store. Model specs are recorded as identities (name + weights hash) beside
        it, so ``toy`` and the bundled folder it names count as the same target. A black-box store records no
        gray-box settings, so its manifest is what it was before the gray-box tier (and older stores resume)."""
        d = self.to_dict()
        for key in ("target", "embedder", "captioner", "reference"):
            d.pop(key)
        d["tier"] = tier_name(self.tiers)
        if GRAY_BOX not in self.tiers:
            d.pop("graybox_timesteps")
            d.pop("clid_timesteps")
        if VARIATION not in self.tiers:
            d.pop("var_strengths")
            d.pop("n_var")
        if self.tiers == (BLACK_BOX,):
            d.pop("tier")
        return d

    def unet_evaluations(self) -> dict[str, int]:
        """UNet evaluations per query of each tier computed (guidance above 1 evaluates the UNet twice a step), the
        reference model's included: a reference doubles them."""
        out = {}
        models = 2 if self.reference else 1
        if BLACK_BOX in self.tiers:
            out[BLACK_BOX] = models * self.n_gen * self.steps * (2 if self.guidance > 1.0 else 1)
        if GRAY_BOX in self.tiers:
            out[GRAY_BOX] = models * graybox.unet_evaluations(tuple(graybox.DATASETS), len(self.graybox_timesteps),
                                                              len(self.clid_timesteps))
        if VARIATION in self.tiers:
            out[VARIATION] = variation.unet_evaluations(self.var_strengths, self.n_var, self.steps,
                                                        self.guidance > 1.0)
        return out

    @property
    def needs_caption(self) -> bool:
        """Whether a row needs a caption: the variation tier alone varies an uncaptioned image on the empty
        prompt."""
        return self.tiers != (VARIATION,)


@dataclasses.dataclass
class Models:
    """The three models a feature computation queries."""

    generator: object
    embedder: object
    captioner: object
    _denoiser: object = None
    reference: object = None  # a second Generator computed with the same seeds and noise (--reference)
    _ref_denoiser: object = None

    def denoiser(self):
        """The target's gray-box access (loaded once), or a one-line error for targets without local weights."""
        if self._denoiser is None:
            self._denoiser = _checked_denoiser(self.generator)
        return self._denoiser

    def ref_denoiser(self):
        """The reference's gray-box access (loaded once)."""
        if self._ref_denoiser is None:
            self._ref_denoiser = _checked_denoiser(self.reference)
        return self._ref_denoiser

    def for_reference(self) -> "Models":
        """The reference in the target's place, with the same embedder and captioner."""
        return Models(self.reference, self.embedder, self.captioner,
                        self.ref_denoiser() if self._ref_denoiser is not None else None)

    @classmethod
    def load(cls, target: str, embedder: str | None = None, captioner: str | None = None, device: str = "cpu",
             allow_pickle: bool = False, graybox: bool = False, reference: str | None = None) -> "Models":
        """The three models (and the ``reference`` model); with ``graybox`` the gray-box access of the target (and
        reference) too, checked before the embedder and captioner load (a target without one fails first, in one
        line). A reference that does not fit the target is refused before anything is computed."""
        from ..targets.builtin import default_models, load_captioner, load_embedder, load_target
        from ..targets.denoiser import check_graybox_spec, denoiser_for
        from .reference import check_reference_fits

        if graybox:
            check_graybox_spec(target)
            if reference:
                check_graybox_spec(reference)
        default_e, default_c = default_models(target)
        generator = load_target(target, device=device, allow_pickle=allow_pickle)
        denoiser = denoiser_for(generator) if graybox else None
        ref = load_target(reference, device=device, allow_pickle=allow_pickle) if reference else None
        ref_denoiser = denoiser_for(ref) if graybox and ref is not None else None
        if ref is not None:
            check_reference_fits(generator, ref, denoiser, ref_denoiser)
        return cls(
            generator,
            load_embedder(embedder or default_e, device=device, allow_pickle=allow_pickle),
            load_captioner(captioner or default_c, device=device, allow_pickle=allow_pickle),
            denoiser, ref, ref_denoiser,
        )

    def varier(self):
        """The target's image-variation access, or a one-line error for targets without one (DALL-E mini)."""
        from ..targets.variation import varier_for

        return varier_for(self.generator)

    def identities(self) -> dict:
        out = {"target": self.generator.identity(), "embedder": self.embedder.identity(),
               "captioner": self.captioner.identity()}
        if self.reference is not None:
            out["reference"] = self.reference.identity()
        return out


def _checked_denoiser(generator):
    from ..runtime.memory import fit_graybox_rows
    from ..targets.denoiser import denoiser_for

    denoiser = denoiser_for(generator)
    fit_graybox_rows(denoiser)
    return denoiser


def _by_shape(images: Sequence[np.ndarray], fn: Callable[[np.ndarray], object]) -> list:
    """Apply a batched model call to images of mixed sizes: one call per distinct shape, results in input order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[im.shape].append(i)
    out: list = [None] * len(images)
    for idx in groups.values():
        results = fn(np.stack([images[i] for i in idx]))
        for i, r in zip(idx, results):
            out[i] = r
    return out


def _generate(rows: Sequence[Row], ok: list[int], models: Models, cfg: FeaturesConfig) -> np.ndarray:
    """Images [len(ok), n_gen, ...] for the rows ``ok``; a row whose prompt the target refused (an HTTP service's
    content filter) becomes ``generation_refused`` and is left out. Any other failure propagates: the run stops
    with what it committed and ``--resume`` continues once the target is back."""
    from ..targets.http import GenerationFailed

    captions = [rows[i].caption for i in ok]
    try:
        return np.asarray(models.generator.generate(captions, cfg.n_gen, cfg.seed, cfg.steps, cfg.guidance))
    except GenerationFailed as exc:
        if not exc.refused or set(exc.errors) != exc.refused:
            raise
        for j in sorted(exc.refused):
            rows[ok[j]].fail("generation_refused", f"{rows[ok[j]].path}: the target refused its caption "
                                                   f"({exc.errors[j]})")
        return np.asarray(exc.images)[[j for j in range(len(ok)) if j not in exc.refused]]


def featurize_rows(rows: Sequence[Row], models: Models, cfg: FeaturesConfig,
                   images: dict[int, np.ndarray] | None = None,
                   graybox_attacks: Sequence[str] = tuple(graybox.DATASETS)) -> dict[str, np.ndarray]:
    """Features of a batch of rows, one output row per input row; failed rows are zeros with status and error.

    ``rows`` are updated in place: a row whose image cannot be read becomes ``unreadable`` (or ``too_large``); a row
    without a caption becomes ``no_caption`` or, with ``cfg.missing_caption == "captioner"``, gets the captioner's caption of its
    image (``caption_source = "captioner"``). ``images`` may hold already decoded images by row position.
    ``graybox_attacks``: the gray-box error vectors to compute (the others stay zero); a store computes all.
    """
    g, p = cfg.n_gen, cfg.pixel_size
    tiers = cfg.tiers
    reference = models.reference is not None
    out = empty_batch(len(rows), g, p, models.embedder.dim, tiers, len(cfg.graybox_timesteps),
                      len(cfg.var_strengths), cfg.n_var, reference, len(cfg.clid_timesteps))
    queries: dict[int, np.ndarray] = {}
    for i, row in enumerate(rows):
        if not row.ok:
            continue
        if row.caption is None and cfg.missing_caption == "no_caption" and cfg.needs_caption:
            row.fail("no_caption", f"{row.path}: no caption (no text in metadata.jsonl and no non-empty .txt file)")
            continue
        image = images[i] if images and i in images else load_row_image(row)
        if image is not None:
            queries[i] = image
    def caption(images: np.ndarray) -> list[str]:
        return models.captioner.caption(images, max_new_tokens=cfg.caption_tokens)

    uncaptioned = [i for i in queries if rows[i].caption is None] if cfg.needs_caption else []
    if uncaptioned:
        for i, text in zip(uncaptioned, _by_shape([queries[i] for i in uncaptioned], caption)):
            text = " ".join(str(text).split())
            if text:
                rows[i].caption, rows[i].caption_source = text, "captioner"
            else:
                rows[i].fail("no_caption", f"{rows[i].path}: the captioner wrote an empty caption")
                queries.pop(i)

    ok = sorted(queries)
    if BLACK_BOX in tiers:
        _black_box(rows, ok, queries, models, cfg, caption, out)
        if reference:
            # The same captions and per-image seeds on the reference; its images captioned and embedded by the
            # same models (a row the reference refuses fails as a whole).
            ref = empty_batch(len(rows), g, p, models.embedder.dim, (BLACK_BOX,))
            _black_box(rows, [i for i in ok if rows[i].ok], queries, models.for_reference(), cfg, caption, ref)
            for key in TIER_KEYS[BLACK_BOX]:
                out[REF_PREFIX + key] = ref[key]
    else:
        _query_side(rows, ok, queries, models, cfg, out)
    ok = [i for i in ok if rows[i].ok]
    if GRAY_BOX in tiers and ok and graybox_attacks:
        d = models.denoiser()
        pixels = np.stack([resize_pixels(queries[i], d.resolution) for i in ok])
        captions = [rows[i].caption for i in ok]
        latents = d.encode_images(pixels)
        denoisers = [("", d)] + ([(REF_PREFIX, models.ref_denoiser())] if reference else [])
        for prefix, model in denoisers:
            # The reference shares the target's VAE (checked when it loaded): the same latents, the same noise.
            errors, _ = graybox.graybox_errors(model, pixels, captions, cfg.graybox_timesteps, cfg.seed,
                                               graybox_attacks, cfg.clid_timesteps, latents)
            for key, value in errors.items():
                out[prefix + key][ok] = value
    if VARIATION in tiers and ok:
        _variations(rows, ok, queries, models, cfg, out)

    for i, row in enumerate(rows):
        out["ids"][i] = row.id
        out["status"][i] = row.status
        out["error"][i] = row.error or ""
        out["caption"][i] = row.caption or ""
        out["caption_source"][i] = row.caption_source or ""
        out["member"][i] = -1 if row.member is None else int(bool(row.member))
    return out


def _black_box(rows: Sequence[Row], ok: list[int], queries: dict[int, np.ndarray], models: Models,
               cfg: FeaturesConfig, caption: Callable, out: dict[str, np.ndarray]) -> None:
    """The black-box tier's features (and the query side) of the rows ``ok``, into ``out``."""
    g, p = cfg.n_gen, cfg.pixel_size
    gen = _generate(rows, ok, models, cfg) if ok else None
    ok = [i for i in ok if rows[i].ok]
    if not ok:
        return
    captions = [rows[i].caption for i in ok]
    if gen.shape[:2] != (len(ok), g) or gen.dtype != np.uint8:
        raise RuntimeError(f"generator returned {gen.dtype} {gen.shape}, expected uint8 [{len(ok)}, {g}, H, W, 3]")
    flat = gen.reshape(-1, *gen.shape[2:])
    gen_captions = [" ".join(str(t).split()) for t in caption(flat)]
    # One embed call per distinct image size: query and generated images together when they match.
    img_emb = np.asarray(_by_shape([queries[i] for i in ok] + list(flat), models.embedder.embed_images),
                         dtype=np.float32)
    txt_emb = np.asarray(models.embedder.embed_texts(captions + gen_captions), dtype=np.float32)
    n = len(ok)
    out["query_img_emb"][ok] = img_emb[:n]
    out["gen_img_emb"][ok] = img_emb[n:].reshape(n, g, -1)
    out["caption_emb"][ok] = txt_emb[:n]
    out["gen_caption_emb"][ok] = txt_emb[n:].reshape(n, g, -1)
    out["gen_captions"][ok] = np.asarray(gen_captions, dtype=object).reshape(n, g)
    out["query_pixels"][ok] = np.stack([resize_pixels(queries[i], p) for i in ok])
    out["gen_pixels"][ok] = np.stack([resize_pixels(im, p) for im in flat]).reshape(n, g, p, p, 3)


def _variations(rows: Sequence[Row], ok: list[int], queries: dict[int, np.ndarray], models: Models,
                cfg: FeaturesConfig, out: dict[str, np.ndarray]) -> None:
    """The variation tier's features of the rows ``ok``, into ``out``. A row a variation of which the target
    refused (an HTTP service's filter) becomes ``generation_refused`` and the others are computed again (an HTTP
    target answers them from its cache); any other failure propagates, as in ``_generate``."""
    from ..targets.http import GenerationFailed

    while ok:
        try:
            feats = variation.variation_features(models.varier(), models.embedder, [queries[i] for i in ok],
                                                 [rows[i].caption or "" for i in ok], cfg.var_strengths, cfg.n_var,
                                                 cfg.steps, cfg.seed, cfg.guidance)
        except GenerationFailed as exc:
            if not exc.refused or set(exc.errors) != exc.refused:
                raise
            for j in sorted(exc.refused):
                row = rows[ok[j // cfg.n_var]]
                if row.ok:
                    row.fail("generation_refused", f"{row.path}: the target refused a variation of it "
                                                   f"({exc.errors[j]})")
            ok = [i for i in ok if rows[i].ok]
            continue
        for key, value in feats.items():
            out[key][ok] = value
        return


def _query_side(rows: Sequence[Row], ok: list[int], queries: dict[int, np.ndarray], models: Models,
                cfg: FeaturesConfig, out: dict[str, np.ndarray]) -> None:
    """Without the black-box tier: only the query-side features (the blind baseline's) of the rows ``ok``."""
    if not ok:
        return
    out["query_img_emb"][ok] = np.asarray(_by_shape([queries[i] for i in ok], models.embedder.embed_images),
                                          dtype=np.float32)
    out["caption_emb"][ok] = np.asarray(models.embedder.embed_texts([rows[i].caption or "" for i in ok]),
                                        np.float32)
    out["query_pixels"][ok] = np.stack([resize_pixels(queries[i], cfg.pixel_size) for i in ok])


def rows_hash(rows: Sequence[Row]) -> str:
    """Identity of the input rows (ids, captions, labels, statuses): a resumed run must see the same data."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.id, r.caption, r.member, r.status], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def batch_slices(n_rows: int, batch_size: int, start: int = 0) -> list[tuple[int, int]]:
    """The batches of a run as (start, stop) row ranges: fixed slices of the row order (batch k holds rows
    k*batch_size up to (k+1)*batch_size), from ``start`` on; a ``start`` inside a slice begins with its rest.

    Every path that computes rows (one machine, a resumed run, a cluster's workers) forms these same batches: a
    row's outputs depend on its batch only through float rounding (a batched matmul sums in another order), so
    the same batches give the same bits."""
    bounds = [start, *range((start // batch_size + 1) * batch_size, n_rows, batch_size), n_rows]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if a < b]


def read_rows(data: str | Path, cfg: FeaturesConfig) -> list[Row]:
    """The rows a feature store holds, in its order: rows without a caption fail unless the captioner writes one."""
    return read_imagefolder(data, require_caption=cfg.missing_caption == "no_caption" and cfg.needs_caption)


def store_manifest(cfg: FeaturesConfig, identities: dict, rows: Sequence[Row], data: str | Path) -> dict:
    """The manifest of the store ``cfg`` makes from ``rows`` with the models of ``identities``
    (``Models.identities()``); ``--resume`` compares it with the stored one."""
    extra = {"reference": identities["reference"]} if identities.get("reference") else {}
    return make_manifest(KIND, cfg.for_store(), identities["target"], embedder=identities["embedder"],
                         captioner=identities["captioner"], n_rows=len(rows), rows_hash=rows_hash(rows),
                         data=str(Path(data).resolve()), tiers=list(cfg.tiers),
                         unet_evaluations_per_query=cfg.unet_evaluations(), **extra)


def open_store(out: Path, manifest: dict, cfg: FeaturesConfig, dim: int, resume: bool) -> FeatureWriter:
    """The writer of a new store, or of the store a resumed run continues (refused when made differently)."""
    if resume and out.exists():
        writer = FeatureWriter.resume(out, manifest)
        if writer.n_committed:
            log.info("%s: resuming after %d of %d rows", out, writer.n_committed, writer.n_rows)
        return writer
    variation_tier = VARIATION in cfg.tiers
    return FeatureWriter.create(out, manifest, cfg.n_gen, cfg.pixel_size, dim, chunk_rows=cfg.batch_size,
                                n_timesteps=len(cfg.graybox_timesteps),
                                n_strengths=len(cfg.var_strengths) if variation_tier else 0,
                                n_var=cfg.n_var if variation_tier else 0, n_clid=len(cfg.clid_timesteps))


def store_summary(out: Path, manifest: dict, seconds: float, first_batch_seconds: float | None = None) -> dict:
    """What ``audit features`` reports about a finished store (``seconds``: featurising, models loaded; and until
    the first batch was committed, None when this run committed none)."""
    counts = FeatureStore.open(out).status_counts()
    summary = {"out": str(out), "rows": manifest["n_rows"], "ok": counts.get("ok", 0), "status": counts,
               "seconds": round(seconds, 2), "target": manifest["target"], "embedder": manifest["embedder"],
               "captioner": manifest["captioner"], "reference": manifest.get("reference"),
               "tiers": list(store_tiers(manifest)),
               "unet_evaluations_per_query": manifest.get("unet_evaluations_per_query", {}),
               "first_batch_seconds": None if first_batch_seconds is None else round(first_batch_seconds, 2)}
    log.info("features: %s", summary)
    return summary


def resolve_batch_size(models: Models, cfg: FeaturesConfig, resuming: str | Path | None = None) -> int:
    """``--batch-size auto``: the batch size a store being resumed was begun with, else the largest that fits."""
    from ..runtime.memory import auto_batch_size

    if resuming is not None and Path(resuming).exists():
        recorded = FeatureStore.open(resuming).manifest.get("config", {}).get("batch_size")
        if recorded:
            return int(recorded)
    chosen = auto_batch_size(models, cfg.n_gen, cfg.guidance)
    log.info("--batch-size auto: %d captions per batch", chosen)
    return chosen


def compute_store(data: str | Path, out: str | Path, models: Models, cfg: FeaturesConfig, resume: bool = False,
                  quiet: bool = False, on_batch: Callable[[int], None] | None = None) -> dict:
    """Featurise every row of an ImageFolder into the store at ``out``; returns a summary.

    ``on_batch(n_committed)`` is called after each committed batch (progress hooks; tests use it to interrupt).
    """
    from ..runtime.memory import check_batch_fits

    cfg.validate()
    out = Path(out)
    if bool(cfg.reference) != (models.reference is not None):
        raise UsageError("the features config and the loaded models disagree on the reference model")
    if GRAY_BOX in cfg.tiers:
        # A target without gray-box access fails here, in one line, before any row is read.
        d = models.denoiser()
        graybox.check_timesteps(cfg.graybox_timesteps, len(d.alphas_cumprod))
        graybox.check_timesteps(cfg.clid_timesteps, len(d.alphas_cumprod))
    if VARIATION in cfg.tiers:
        models.varier()  # a target without variation access fails here too
    rows = read_rows(data, cfg)
    if BLACK_BOX in cfg.tiers:  # before any row is computed: the batch that will run (at most the row count)
        check_batch_fits(models, max(1, min(cfg.batch_size, len(rows))), cfg.n_gen, cfg.guidance)
    manifest = store_manifest(cfg, models.identities(), rows, data)
    writer = open_store(out, manifest, cfg, models.embedder.dim, resume)
    start_time, first = time.perf_counter(), None
    with progress(total=len(rows), desc="features", unit="row", quiet=quiet, initial=writer.n_committed) as bar:
        for start, stop in batch_slices(len(rows), cfg.batch_size, writer.n_committed):
            writer.append(featurize_rows(rows[start:stop], models, cfg))
            first = first or time.perf_counter() - start_time
            bar.update(stop - start)
            if on_batch is not None:
                on_batch(writer.n_committed)
    return store_summary(out, writer.manifest, time.perf_counter() - start_time, first)
