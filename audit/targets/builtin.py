"""Built-in registrations and the loaders that turn a spec into a backend object."""

from __future__ import annotations

from ..config import check_device
from ..errors import UsageError
from ..registry import CAPTIONERS, EMBEDDERS, TARGETS, parse_model_ref
from ..toy import BUNDLE, bundle_path
# The real targets (here) and embedders and captioners (models/) register on import; they resolve to the local HF
# cache.
from ..models import real as _real_models
from . import real as _real


def _toy_target(device: str = "cpu", allow_pickle: bool = False, **kw):
    from .diffusion import DiffusersGenerator  # torch and diffusers: loaded only when a target is

    return DiffusersGenerator.from_folder(bundle_path("target"), name="toy", device=device, allow_pickle=allow_pickle,
                                          **kw)


def _toy_base(device: str = "cpu", allow_pickle: bool = False, **kw):
    from .diffusion import DiffusersGenerator

    return DiffusersGenerator.from_folder(bundle_path("base"), name="toy-base", device=device,
                                          allow_pickle=allow_pickle, **kw)


def _toy_clip(device: str = "cpu", allow_pickle: bool = False, **kw):
    from ..models.embedders import TransformersCLIPEmbedder  # torch and transformers, as above

    return TransformersCLIPEmbedder(bundle_path("clip"), name="toy-clip", device=device, allow_pickle=allow_pickle, **kw)


def _toy_blip(device: str = "cpu", allow_pickle: bool = False, **kw):
    from ..models.captioners import TransformersBlipCaptioner  # torch and transformers, as above

    return TransformersBlipCaptioner(bundle_path("blip"), name="toy-blip", device=device, allow_pickle=allow_pickle,
                                     **kw)


TARGETS.register("toy", _toy_target, f"bundled: {BUNDLE / 'target'}", "tiny latent diffusion model fine-tuned on the "
                 "toy world's members", family="diffusion", embedder="toy-clip", captioner="toy-blip")
TARGETS.register("toy-base", _toy_base, f"bundled: {BUNDLE / 'base'}", "the toy target before fine-tuning: "
                 "pre-trained on the public split only (the reference for --reference)", family="diffusion",
                 embedder="toy-clip", captioner="toy-blip")
EMBEDDERS.register("toy-clip", _toy_clip, f"bundled: {BUNDLE / 'clip'}", "tiny CLIP trained on the toy world's public split")
CAPTIONERS.register("toy-blip", _toy_blip, f"bundled: {BUNDLE / 'blip'}", "tiny BLIP trained on the toy world's public split")

# Defaults for targets that name none: the real models the paper used.
DEFAULT_EMBEDDER = "openai/clip-vit-large-patch14"
DEFAULT_CAPTIONER = "blip-base"


def load_target(spec: str, device: str = "cpu", allow_pickle: bool = False, **kw):
    """Spec (name, folder, export folder, URL) -> a ``Generator``."""
    check_device(device)
    ref = parse_model_ref(spec, TARGETS)
    if ref.kind == "registered":
        return TARGETS.get(ref.value).loader(device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "folder":
        return _real.target_from_folder(ref.value, device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "hub":
        return _real.target_from_hub(ref.value, device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "http":
        from .http import HTTPGenerator

        return HTTPGenerator(ref.value, **kw)
    if ref.kind == "export":
        from ..runtime import RuntimeOptions, onnx_generator  # onnxruntime: only for export folders

        return onnx_generator(ref.value, RuntimeOptions(device=device), **kw)
    raise UsageError(f"{spec}: {ref.kind} targets are not supported yet")


def load_embedder(spec: str, device: str = "cpu", allow_pickle: bool = False, **kw):
    check_device(device)
    ref = parse_model_ref(spec, EMBEDDERS)
    if ref.kind == "registered":
        return EMBEDDERS.get(ref.value).loader(device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "folder":
        return _real_models.embedder_from_folder(ref.value, device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "hub":
        return _real_models.embedder_from_hub(ref.value, device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "export":
        from ..runtime import OnnxEmbedder, RuntimeOptions  # onnxruntime: only for export folders

        return OnnxEmbedder(ref.value, RuntimeOptions(device=device), **kw)
    raise UsageError(f"{spec}: {ref.kind} embedders are not supported yet")


def load_captioner(spec: str, device: str = "cpu", allow_pickle: bool = False, **kw):
    check_device(device)
    ref = parse_model_ref(spec, CAPTIONERS)
    if ref.kind == "registered":
        return CAPTIONERS.get(ref.value).loader(device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "folder":
        return _real_models.captioner_from_folder(ref.value, device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "hub":
        return _real_models.captioner_from_hub(ref.value, device=device, allow_pickle=allow_pickle, **kw)
    if ref.kind == "export":
        from ..runtime import OnnxCaptioner, RuntimeOptions  # onnxruntime: only for export folders

        return OnnxCaptioner(ref.value, RuntimeOptions(device=device), **kw)
    raise UsageError(f"{spec}: {ref.kind} captioners are not supported yet")


def default_models(target_spec: str) -> tuple[str, str]:
    """(embedder, captioner) that go with a target: the toy ones for toy targets, the real CLIP/BLIP otherwise."""
    ref = parse_model_ref(target_spec, TARGETS) if not str(target_spec).startswith(("http://", "https://")) else None
    if ref is not None and ref.kind == "registered":
        d = TARGETS.get(ref.value).defaults
        return d.get("embedder", DEFAULT_EMBEDDER), d.get("captioner", DEFAULT_CAPTIONER)
    if ref is not None and ref.kind == "export":
        # An `audit export` bundle carries the compiled embedder and captioner exported with its target.
        from ..runtime.folder import bundled_models

        embedder, captioner = bundled_models(ref.value)
        return embedder or DEFAULT_EMBEDDER, captioner or DEFAULT_CAPTIONER
    return DEFAULT_EMBEDDER, DEFAULT_CAPTIONER
