"""Export a target, an embedder and a captioner into one folder the runtime loads.

Layout of ``audit export --out DIR``::

    DIR/manifest.json, DIR/export.json          the bundle: which components, made for which target
    DIR/target/     text_encoder.onnx unet_context.onnx unet.onnx vae_decoder.onnx vae_encoder.onnx tokenizer/
                    scheduler/ manifest.json export.json
    DIR/embedder/   image_encoder.onnx text_encoder.onnx processor/ manifest.json export.json
    DIR/captioner/  vision_encoder.onnx decoder_step.onnx processor/ manifest.json export.json

Each component folder is itself an export folder (``--embedder DIR/embedder`` works). Every graph is validated
against PyTorch right after export; then each component is checked end to end against its torch backend
(generated images, embeddings, greedy caption tokens), and both results are recorded in ``export.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from ..config import Config, atomic_folder, atomic_write_text
from ..errors import ArtifactError, UsageError
from ..manifest import make_manifest
from ..progress import progress
from . import specs
from .convert import OPSET, exact_fp32, export_spec, prepare_module, reference_outputs, validate_spec

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # layout version of export.json
PRECISIONS = ("fp32", "fp16")
# Generation settings of a BLIP text decoder that greedy decoding in the runtime does not reproduce.
_UNSUPPORTED_GENERATION = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                           "min_length": (None, 0), "min_new_tokens": (None, 0), "bad_words_ids": (None,),
                           "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                           "forced_bos_token_id": (None,), "forced_eos_token_id": (None,)}


@dataclasses.dataclass
class ExportConfig(Config):
    target: str = ""
    embedder: str = ""
    captioner: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    opset: int = OPSET
    allow_pickle: bool = False


def check_export_options(device: str, precision: str) -> None:
    """Fail before any work when the device/precision pair cannot be exported and validated here."""
    from ..runtime.session import RuntimeOptions, providers_for

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; valid precisions are {', '.join(PRECISIONS)}")
    providers_for(RuntimeOptions(device=device))  # unknown device / no CUDA provider: a clear error
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA GPU on this machine")
    elif precision == "fp16":
        raise UsageError("--precision fp16 is for GPU inference: export it with --device cuda (on the CPU, "
                         "onnxruntime runs fp16 graphs slower than fp32: 1.6x on the toy UNet)")


def _session_factory(device: str):
    from ..runtime.session import Graph, RuntimeOptions

    # Validate what the graph computes (not TensorRT's), in one session; without the arena, so that each call's
    # peak memory is its own (runtime.memory); nothing saved under $AUDIT_HOME (a graph being validated may be
    # refused, and saving a 3.4 GB UNet would add to the export's time and disk)
    options = RuntimeOptions(device=device, tensorrt=False, replicas=1, memory_arena=False, saved_graphs=False)
    return lambda path: Graph(path, options).session


def _export_graphs(spec_list, folder: Path, cfg: ExportConfig, bar=None) -> dict:
    """Export and validate each spec; a spec lets go of its model once exported and its PyTorch reference outputs
    made, before its graph loads, so where the specs hold the only references (``export_target(..., release=True)``)
    each torch component is freed as soon as it is done and never sits beside its own compiled graph."""
    graphs = {}
    factory = _session_factory(cfg.device)
    for spec in spec_list:
        if bar is not None:
            bar.set_postfix_str(f"{folder.name}/{spec.name}")
        module = prepare_module(spec, cfg.device, cfg.precision)
        record = export_spec(spec, folder, cfg.device, cfg.precision, cfg.opset, module)
        references = reference_outputs(spec, module, cfg.device, cfg.precision)
        del module  # before the graph loads: one copy of these weights at a time
        spec.model = None
        _release()
        graphs[spec.name] = validate_spec(spec, folder, record, factory, cfg.device, cfg.precision,
                                          references=references)
        del references
        log.info("%s/%s: max |onnx - torch| %.2e (tolerance atol %g, rtol %g)", folder.name, spec.name,
                 graphs[spec.name]["validation"]["max_abs_err"], record["tolerance"]["atol"],
                 record["tolerance"]["rtol"])
        if bar is not None:
            bar.update(1)
    return graphs


def _write_component(folder: Path, component: str, cfg: ExportConfig, target_identity: dict, identity: dict,
                     info: dict) -> None:
    info = {"format": EXPORT_FORMAT, "component": component, "identity": identity, **info}
    if component != "bundle":  # what the folder's identity is checked against when it loads (runtime.folder)
        from ..runtime.folder import export_content_hash

        info["content_sha256"] = export_content_hash(folder)
    atomic_write_text(folder / "export.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    manifest = make_manifest("export", cfg.to_dict(), target_identity, component=component, model=identity)
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# --- target --------------------------------------------------------------------------------------------------------

def _target_family(pipe) -> dict:
    """What the runtime must reproduce of a pipeline's __call__ (the two supported families differ in small ways)."""
    cls = type(pipe).__name__
    if cls == "StableDiffusionPipeline":
        if getattr(pipe.text_encoder.config, "use_attention_mask", False):
            raise UsageError("this StableDiffusionPipeline's text encoder uses an attention mask; export does not "
                             "support it (audit it on the torch path)")
        return {"pipeline": cls, "text_encoder": pipe.text_encoder, "vae": pipe.vae,
                "text_max_length": int(pipe.tokenizer.model_max_length),
                # SD guides when guidance > 1 and the UNet takes no guidance embedding (LCM-style UNets do).
                "cfg_rule": "greater_than_one" if pipe.unet.config.time_cond_proj_dim is None else "never",
                "latent_scale": "divide"}
    if cls == "LDMTextToImagePipeline":
        return {"pipeline": cls, "text_encoder": pipe.bert, "vae": pipe.vqvae, "text_max_length": 77,
                "cfg_rule": "not_one", "latent_scale": "multiply_reciprocal"}
    raise UsageError(f"cannot export a {cls}; export supports StableDiffusionPipeline and LDMTextToImagePipeline")


def _exportable_target(generator) -> tuple:
    """(pipeline, family settings), or a one-line error saying why this target cannot be exported."""
    from ..runtime.scheduler import check_scheduler_config

    from ..targets.dalle import DalleGenerator

    if isinstance(generator, DalleGenerator):  # the torch modules; an already exported DALL-E has graphs instead
        return None, {"pipeline": "dalle"}
    pipe = getattr(generator, "pipe", None)
    if pipe is None:
        raise UsageError(f"target {generator.name!r} is neither a local diffusers pipeline nor a DALL-E model in "
                         "PyTorch; only those can be exported (an export folder is compiled already)")
    if type(pipe.scheduler).__name__ != "DDIMScheduler":
        raise UsageError(f"target {generator.name!r} samples with {type(pipe.scheduler).__name__}; the runtime "
                         "reproduces DDIM only (audit this target on the torch path)")
    fam = _target_family(pipe)
    check_scheduler_config(dict(pipe.scheduler.config, _class_name="DDIMScheduler"), f"{generator.name} scheduler")
    return pipe, fam


def _exportable_embedder(embedder) -> tuple:
    model, processor = getattr(embedder, "model", None), getattr(embedder, "processor", None)
    if model is None or type(model).__name__ != "CLIPModel" or processor is None:
        raise UsageError(f"embedder {embedder.name!r} is not a transformers CLIPModel; only those can be exported")
    return model, processor


def _exportable_captioner(captioner) -> tuple:
    model, processor = getattr(captioner, "model", None), getattr(captioner, "processor", None)
    if model is None or type(model).__name__ != "BlipForConditionalGeneration" or processor is None:
        raise UsageError(f"captioner {captioner.name!r} is not a transformers BlipForConditionalGeneration; only "
                         "those can be exported")
    return model, processor, _generation_settings(model)


def _latent_size(generator, pipe, fam: dict) -> int:
    scale = 8 if fam["pipeline"] == "LDMTextToImagePipeline" else int(getattr(pipe, "vae_scale_factor", 8))
    return int(generator.resolution) // scale


def target_specs(generator) -> list:
    """The graphs of an exportable target: text encoder, UNet (as a context graph computing the cross-attention
    keys/values once plus a step taking them, where its attention allows), VAE decoder and the VAE encoder the
    gray-box attacks read; DALL-E's three."""
    pipe, fam = _exportable_target(generator)
    if fam["pipeline"] == "dalle":
        c = generator.config
        return [specs.DalleEncoderSpec(generator.encoder, c), specs.DalleDecoderStepSpec(generator.decoder, c),
                specs.DalleDetokenizerSpec(generator.detokenizer, c)]
    latent = _latent_size(generator, pipe, fam)
    text = fam["text_encoder"]
    text_dim = int(text.config.hidden_size if hasattr(text.config, "hidden_size") else text.config.d_model)
    length, steps = fam["text_max_length"], pipe.scheduler.config.num_train_timesteps
    if specs.cross_attentions(pipe.unet):
        unet = [specs.UNetContextSpec(pipe.unet, length, text_dim),
                specs.UNetStepSpec(pipe.unet, latent, length, text_dim, steps)]
    else:
        unet = [specs.UNetSpec(pipe.unet, latent, length, text_dim, steps)]
    return [specs.TextEncoderSpec(text, length, len(pipe.tokenizer)), *unet,
            specs.VaeDecoderSpec(fam["vae"], latent, reciprocal=fam["latent_scale"] == "multiply_reciprocal"),
            specs.VaeEncoderSpec(fam["vae"], int(generator.resolution))]


def export_target(generator, folder: Path, cfg: ExportConfig, bar=None, release: bool = False) -> dict:
    """Export a target's graphs into ``folder``. With ``release`` a diffusers target's torch modules are handed to
    the specs and freed one by one as their graphs are validated (export peak memory: one component at a time, not
    the whole pipeline plus a graph); the generator cannot generate afterwards."""
    pipe, fam = _exportable_target(generator)
    if fam["pipeline"] == "dalle":
        return export_dalle_target(generator, folder, cfg, bar)
    folder.mkdir(parents=True)
    latent = _latent_size(generator, pipe, fam)
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_config(folder / "scheduler")
    settings = {"pipeline": fam["pipeline"], "resolution": int(generator.resolution), "latent_size": latent,
                "latent_channels": int(pipe.unet.config.in_channels), "text_max_length": fam["text_max_length"],
                "cfg_rule": fam["cfg_rule"], "tokenizer": "tokenizer",
                "scheduler": "scheduler/scheduler_config.json"}
    identity = generator.identity()
    spec_list = target_specs(generator)
    del fam  # it holds the text encoder and the VAE; from here on only the specs do
    for name in ("text_encoder", "bert", "unet", "vae", "vqvae") if release else ():  # the specs hold the rest
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    graphs = _export_graphs(spec_list, folder, cfg, bar)
    _write_component(folder, "target", cfg, identity, identity,
                     {"family": "diffusion", "graphs": graphs, "settings": settings})
    return identity


def export_dalle_target(generator, folder: Path, cfg: ExportConfig, bar=None) -> dict:
    """Encoder, decoder step (KV cache in and out) and VQGAN detokenizer of a ``DalleGenerator``, with its
    tokenizer files and config: ``audit.runtime.OnnxDalleGenerator`` samples with them as the torch path does."""
    from ..targets import dalle

    c = generator.config
    folder.mkdir(parents=True)
    graphs = _export_graphs(target_specs(generator), folder, cfg, bar)
    (folder / "tokenizer").mkdir()
    for name in dalle.tokenizer_files(c):
        shutil.copyfile(generator._path / name, folder / "tokenizer" / name)
    c.save(folder / "tokenizer" / "dalle.json")
    settings = {"pipeline": "dalle", "resolution": int(generator.resolution), "tokenizer": "tokenizer",
                "temperature": generator.temperature, "top_k": generator.top_k}
    identity = generator.identity()
    _write_component(folder, "target", cfg, identity, identity,
                     {"family": "dalle", "graphs": graphs, "settings": settings})
    return identity


# --- embedder ------------------------------------------------------------------------------------------------------

def embedder_specs(embedder) -> list:
    model, processor = _exportable_embedder(embedder)
    tok = processor.tokenizer
    return [specs.ClipImageSpec(model), specs.ClipTextSpec(model, int(tok.eos_token_id), int(tok.pad_token_id or 0))]


def export_embedder(embedder, folder: Path, cfg: ExportConfig, target_identity: dict, bar=None) -> dict:
    from ..kernels.preprocess import ImageTransform

    model, processor = _exportable_embedder(embedder)
    folder.mkdir(parents=True)
    graphs = _export_graphs(embedder_specs(embedder), folder, cfg, bar)
    processor.save_pretrained(folder / "processor")
    transform = ImageTransform.from_processor_config(processor.image_processor.to_dict(), f"{embedder.name} processor")
    settings = {"dim": int(embedder.dim), "processor": "processor", "image_transform": transform.to_dict()}
    identity = embedder.identity()
    _write_component(folder, "embedder", cfg, target_identity, identity,
                     {"family": "clip", "graphs": graphs, "settings": settings})
    return identity


# --- captioner -----------------------------------------------------------------------------------------------------

def _generation_settings(blip) -> dict:
    gc = blip.text_decoder.generation_config
    bad = {k: getattr(gc, k, None) for k, ok in _UNSUPPORTED_GENERATION.items() if getattr(gc, k, None) not in ok}
    if bad:
        raise UsageError(f"captioner generation settings {bad} are not reproduced by the runtime's greedy decoding")
    tc = blip.config.text_config
    return {"bos_token_id": int(tc.bos_token_id), "eos_token_id": int(tc.sep_token_id),
            "pad_token_id": int(tc.pad_token_id), "max_positions": int(tc.max_position_embeddings),
            "n_layers": int(tc.num_hidden_layers), "n_heads": int(tc.num_attention_heads),
            "head_dim": int(tc.hidden_size) // int(tc.num_attention_heads)}


def captioner_specs(captioner) -> list:
    model = _exportable_captioner(captioner)[0]
    return [specs.BlipVisionSpec(model), specs.BlipDecoderStepSpec(model)]


def export_captioner(captioner, folder: Path, cfg: ExportConfig, target_identity: dict, bar=None) -> dict:
    from ..kernels.preprocess import ImageTransform

    model, processor, generation = _exportable_captioner(captioner)
    folder.mkdir(parents=True)
    graphs = _export_graphs(captioner_specs(captioner), folder, cfg, bar)
    processor.save_pretrained(folder / "processor")
    transform = ImageTransform.from_processor_config(processor.image_processor.to_dict(),
                                                     f"{captioner.name} processor")
    settings = {**generation, "processor": "processor", "image_transform": transform.to_dict()}
    identity = captioner.identity()
    _write_component(folder, "captioner", cfg, target_identity, identity,
                     {"family": "blip", "graphs": graphs, "settings": settings})
    return identity


# --- end-to-end checks ---------------------------------------------------------------------------------------------

def _probe_images(resolution: int, n: int = 3) -> np.ndarray:
    """Deterministic images with structure (a gradient, a disc, noise) for the end-to-end checks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
    out = []
    for i in range(n):
        disc = ((xx - 0.3 - 0.2 * i) ** 2 + (yy - 0.5) ** 2 < 0.05)[..., None] * np.array([200, 40, 90 + 40 * i])
        base = np.stack([xx * 255, yy * 255, (1 - xx) * 128], -1)
        out.append(np.clip(base * (1 - disc.any(-1, keepdims=True)) + disc + rng.normal(0, 12, base.shape), 0, 255))
    return np.asarray(out, np.uint8)


# What the end-to-end checks demand: fp32 graphs reproduce the torch path; fp16 ones only approximate it (greedy
# captions may flip at near-ties), so for them the numbers are recorded and only gross disagreement fails.
_PROBE_CAPTION = "a red circle on a blue background"
_END_TO_END = {"fp32": {"image_max": 8, "image_mean": 0.5, "embedding": 1e-3, "captions_equal": True,
                        "graybox_rel": 1e-2},
               "fp16": {"image_max": 255, "image_mean": 3.0, "embedding": 3e-2, "captions_equal": False,
                        "graybox_rel": 0.5}}


def torch_target_probes(generator) -> dict:
    """What the end-to-end check compares the compiled target with, made on the torch path before the export lets
    its modules go: the probe caption's images (seed 0, 2 steps), the probe images (structured ones and the
    generated one) and, for a target with gray-box access, its error vectors on them."""
    from ..features.graybox import DEFAULT_TIMESTEPS, graybox_errors

    torch_img = generator.generate([_PROBE_CAPTION], 1, 0, 2)
    images = np.concatenate([_probe_images(generator.resolution), torch_img[:, 0]])
    probes = {"torch_img": torch_img, "images": images, "graybox": None}
    if callable(getattr(generator, "denoiser", None)):
        probes["graybox"], _ = graybox_errors(_small_batches(generator.denoiser()), images,
                                              [_PROBE_CAPTION] * len(images), DEFAULT_TIMESTEPS, 0)
    return probes


def _small_batches(denoiser):
    """The end-to-end check is about values, not throughput: 4 UNet rows a call (the default 64 took SD-1.5's
    export to its peak, ~5 GiB above the compiled graphs)."""
    denoiser.batch_size = min(denoiser.batch_size, 4)
    return denoiser


def _check_graybox(folder: Path, compiled, probes: dict, limits: dict) -> dict:
    """The gray-box attacks' error vectors through the compiled graphs against the torch path's."""
    from ..features.graybox import DEFAULT_TIMESTEPS, graybox_errors

    images, theirs = probes["images"], probes["graybox"]
    ours, _ = graybox_errors(_small_batches(compiled.denoiser()), images, [_PROBE_CAPTION] * len(images),
                             DEFAULT_TIMESTEPS, 0)
    rel = max(float(np.max(np.abs(ours[k] - theirs[k]) / np.maximum(np.abs(theirs[k]), 1e-12))) for k in ours)
    if rel > limits["graybox_rel"]:
        raise ArtifactError(f"{folder / 'target'}: gray-box errors differ from the torch path's by up to {rel:.2g} "
                            f"(relative; tolerance {limits['graybox_rel']})")
    return {"timesteps": list(DEFAULT_TIMESTEPS), "n_images": len(images), "max_rel_error": rel}


def check_target_end_to_end(folder: Path, probes: dict, device: str, precision: str = "fp32") -> dict:
    """The exported target's images of ``_PROBE_CAPTION`` (seed 0, 2 steps), and its gray-box errors, against the
    torch path's ``probes`` (``torch_target_probes``)."""
    from ..runtime import onnx_generator
    from ..runtime.session import RuntimeOptions

    limits = _END_TO_END[precision]
    g = onnx_generator(folder / "target", RuntimeOptions(device=device, tensorrt=False, saved_graphs=False))
    onnx_img = g.generate([_PROBE_CAPTION], 1, 0, 2)
    torch_img = probes["torch_img"]
    diff = np.abs(torch_img.astype(np.int16) - onnx_img.astype(np.int16))
    check = {"steps": 2, "max_abs_uint8": int(diff.max()), "mean_abs_uint8": float(diff.mean())}
    if diff.max() > limits["image_max"] or diff.mean() > limits["image_mean"]:
        raise ArtifactError(f"{folder / 'target'}: generated images differ from the torch path by up to "
                            f"{int(diff.max())} levels (mean {diff.mean():.2f})")
    if probes["graybox"] is not None:
        check["graybox"] = _check_graybox(folder, g, probes, limits)
    return check


def check_models_end_to_end(folder: Path, images: np.ndarray, embedder, captioner, device: str,
                            precision: str = "fp32") -> dict:
    """The exported embedder's embeddings and captioner's greedy captions of ``images`` against the torch path's;
    one compiled component is loaded at a time."""
    from ..runtime import OnnxCaptioner, OnnxEmbedder
    from ..runtime.session import RuntimeOptions

    limits = _END_TO_END[precision]
    opts = RuntimeOptions(device=device, tensorrt=False, saved_graphs=False)
    checks = {}
    if embedder is not None:
        e = OnnxEmbedder(folder / "embedder", opts)
        texts = [_PROBE_CAPTION, "two green squares", ""]
        err_i = float(np.abs(e.embed_images(images) - embedder.embed_images(images)).max())
        err_t = float(np.abs(e.embed_texts(texts) - embedder.embed_texts(texts)).max())
        del e
        checks["embedder"] = {"max_abs_image": err_i, "max_abs_text": err_t}
        if max(err_i, err_t) > limits["embedding"]:
            raise ArtifactError(f"{folder / 'embedder'}: embeddings differ from the torch path by "
                                f"{max(err_i, err_t):.3g}")
    if captioner is not None:
        c = OnnxCaptioner(folder / "captioner", opts)
        ours, theirs = c.caption(images, max_new_tokens=12), captioner.caption(images, max_new_tokens=12)
        del c
        checks["captioner"] = {"captions_equal": ours == theirs, "n_images": len(images), "max_new_tokens": 12}
        if ours != theirs:
            if limits["captions_equal"]:
                raise ArtifactError(f"{folder / 'captioner'}: greedy captions differ from generate(): {ours} vs "
                                    f"{theirs}")
            log.warning("%s: %s captions differ from the torch path's on %d of %d probe images", folder, precision,
                        sum(a != b for a, b in zip(ours, theirs)), len(ours))
    return checks


# --- the bundle ----------------------------------------------------------------------------------------------------

def _release() -> None:
    """Free what was let go: unreachable objects, then glibc's cached free heap (what validation freed would
    otherwise stay resident under the compiled models loaded next)."""
    from ..runtime.memory import release_free_heap

    gc.collect()
    release_free_heap()


def export_all(cfg: ExportConfig, out: str | Path, quiet: bool = False) -> dict:
    """Export target + embedder + captioner into ``out``; returns the bundle's export.json content. A progress
    bar counts the graphs (off with ``quiet`` or when stderr is not a terminal)."""
    from ..targets import default_models, load_captioner, load_embedder, load_target

    check_export_options(cfg.device, cfg.precision)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: already exists and is not an empty folder; choose another --out or delete it")
    emb_spec, cap_spec = default_models(cfg.target)
    cfg = dataclasses.replace(cfg, embedder=cfg.embedder or emb_spec, captioner=cfg.captioner or cap_spec)
    start = time.perf_counter()
    load = {"device": cfg.device, "allow_pickle": cfg.allow_pickle}
    generator = load_target(cfg.target, **load)
    embedder, captioner = load_embedder(cfg.embedder, **load), load_captioner(cfg.captioner, **load)
    # Everything that can be refused is refused before minutes of tracing.
    n_graphs = sum(len(f(m)) for f, m in ((target_specs, generator), (embedder_specs, embedder),
                                         (captioner_specs, captioner)))
    # Only one model is held at a time from here on (at SD's size the embedder and captioner are 2.6 GB and the
    # target 4.2 GB, beside the compiled graphs being validated): the two are loaded again when their turn comes.
    del embedder, captioner
    # Built in a sibling folder and renamed at the end: an interrupted export never looks like a finished one.
    with atomic_folder(out) as tmp:
        with exact_fp32(), progress(total=n_graphs + 1, desc="export", unit="step", quiet=quiet) as bar:
            bar.set_postfix_str("end-to-end check: target, PyTorch")
            # Made first: export_target frees each torch module once its graphs are validated.
            torch_probes = torch_target_probes(generator)
            target_id = export_target(generator, tmp / "target", cfg, bar, release=True)
            bar.set_postfix_str("end-to-end check: target")
            del generator  # before the compiled target loads
            _release()
            target_check = check_target_end_to_end(tmp, torch_probes, cfg.device, cfg.precision)
            probes = torch_probes["images"]
            embedder = load_embedder(cfg.embedder, **load)
            ids = {"target": target_id, "embedder": export_embedder(embedder, tmp / "embedder", cfg, target_id, bar)}
            emb_check = check_models_end_to_end(tmp, probes, embedder, None, cfg.device, cfg.precision)
            del embedder
            _release()
            captioner = load_captioner(cfg.captioner, **load)
            ids["captioner"] = export_captioner(captioner, tmp / "captioner", cfg, target_id, bar)
            bar.set_postfix_str("end-to-end check")
            checks = {"target": target_check, **emb_check,
                      **check_models_end_to_end(tmp, probes, None, captioner, cfg.device, cfg.precision)}
            bar.update(1)
        info = {"components": {k: {"path": k, "identity": v} for k, v in ids.items()},
                "end_to_end": checks, "export_seconds": round(time.perf_counter() - start, 1)}
        _write_component(tmp, "bundle", cfg, target_id, target_id, info)
    return {"format": EXPORT_FORMAT, "component": "bundle", **info}
