"""The real embedders (OpenAI CLIP through transformers, open_clip models) and captioners (BLIP), and loading
any local or cached embedder/captioner folder by what it contains."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError
from ..registry import CAPTIONERS, EMBEDDERS
from ..hub import HubSource, is_hub_id

_TRANSFORMERS_INCLUDE = ("*.json", "*.txt", "*.safetensors")
_TRANSFORMERS_REQUIRED = ("config.json", "*processor_config.json")  # transformers 5 writes processor_config.json

CLIP_SOURCES = {
    "openai/clip-vit-large-patch14": "OpenAI CLIP ViT-L/14 (the paper's embedder), 768-d",
    "openai/clip-vit-base-patch32": "OpenAI CLIP ViT-B/32, 512-d",
}
OPEN_CLIP_NAMES = {
    "open_clip:ViT-B-32/laion2b_s34b_b79k": "open_clip ViT-B-32 trained on LAION-2B",
    "open_clip:ViT-L-14/laion2b_s32b_b82k": "open_clip ViT-L-14 trained on LAION-2B",
    "open_clip:ViT-H-14/laion2b_s32b_b79k": "open_clip ViT-H-14 trained on LAION-2B (SD 2.x's text tower)",
}
BLIP_SOURCES = {
    "blip-base": ("Salesforce/blip-image-captioning-base", "BLIP base captioner (the paper's captioner)"),
    "blip-large": ("Salesforce/blip-image-captioning-large", "BLIP large captioner"),
}
OPEN_CLIP_PREFIX = "open_clip:"


def _source(repo_id: str) -> HubSource:
    return HubSource(repo_id, include=_TRANSFORMERS_INCLUDE, required=_TRANSFORMERS_REQUIRED)


# ----------------------------------------------------------------------------------------------------------------
# folders and hub ids


def embedder_from_folder(path: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                         **kw):
    from .open_clip import OpenCLIPEmbedder, is_open_clip_folder

    path = Path(path)
    if is_open_clip_folder(path):
        return OpenCLIPEmbedder.from_folder(path, name=name, device=device, allow_pickle=allow_pickle, **kw)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not an embedder folder: expected a transformers CLIPModel (config.json) or "
                                 "an open_clip model (open_clip_config.json)")
    from .embedders import TransformersCLIPEmbedder

    return _wrap_load(path, lambda: TransformersCLIPEmbedder(path, name=name, device=device,
                                                             allow_pickle=allow_pickle, **kw))


def captioner_from_folder(path: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                          **kw):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: not a captioner folder: expected a transformers BLIP model (config.json)")
    from .captioners import TransformersBlipCaptioner

    return _wrap_load(path, lambda: TransformersBlipCaptioner(path, name=name, device=device,
                                                              allow_pickle=allow_pickle, **kw))


def _wrap_load(path: Path, load):
    try:
        return load()
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"{path}: could not load the model ({first})") from None


def embedder_from_hub(spec: str, device: str = "cpu", allow_pickle: bool = False, **kw):
    """``open_clip:ARCH/TAG`` (an open_clip pretrained tag) or a cached hub id ``org/name``."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        from .open_clip import OpenCLIPEmbedder

        rest = spec[len(OPEN_CLIP_PREFIX):]
        if rest.startswith("hf-hub:"):
            repo = rest[len("hf-hub:"):]
            return embedder_from_folder(HubSource(repo).resolve(), name=spec, device=device,
                                        allow_pickle=allow_pickle, **kw)
        arch, _, tag = rest.partition("/")
        if not arch or not tag:
            raise ModelNotFoundError(f"{spec}: expected open_clip:ARCH/TAG (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k) "
                                     "or open_clip:hf-hub:ORG/NAME")
        return OpenCLIPEmbedder.from_pretrained_tag(arch, tag, name=spec, device=device, allow_pickle=allow_pickle,
                                                    **kw)
    if not is_hub_id(spec):
        raise ModelNotFoundError(f"{spec}: neither a registered embedder, a folder, nor a hub id (org/name)")
    return embedder_from_folder(HubSource(spec).resolve(), name=spec, device=device, allow_pickle=allow_pickle, **kw)


def captioner_from_hub(repo_id: str, device: str = "cpu", allow_pickle: bool = False, **kw):
    if not is_hub_id(repo_id):
        raise ModelNotFoundError(f"{repo_id}: neither a registered captioner, a folder, nor a hub id (org/name)")
    return captioner_from_folder(HubSource(repo_id).resolve(), name=repo_id, device=device, allow_pickle=allow_pickle,
                                 **kw)


# ----------------------------------------------------------------------------------------------------------------
# registered names


def _hub_loader(repo_id: str, name: str, from_folder):
    source = _source(repo_id)

    def load(device: str = "cpu", allow_pickle: bool = False, **kw):
        return from_folder(source.resolve(), name=name, device=device, allow_pickle=allow_pickle, **kw)

    return load


def _open_clip_loader(name: str):
    def load(device: str = "cpu", allow_pickle: bool = False, **kw):
        return embedder_from_hub(name, device=device, allow_pickle=allow_pickle, **kw)

    return load


def _open_clip_source(name: str):
    def describe() -> str:
        from .open_clip import pretrained_source

        arch, _, tag = name[len(OPEN_CLIP_PREFIX):].partition("/")
        return pretrained_source(arch, tag)[1].describe()

    return describe


def register() -> None:
    for repo_id, description in CLIP_SOURCES.items():
        EMBEDDERS.register(repo_id, _hub_loader(repo_id, repo_id, embedder_from_folder), _source(repo_id).describe,
                           description, family="clip")
    for name, description in OPEN_CLIP_NAMES.items():
        EMBEDDERS.register(name, _open_clip_loader(name), _open_clip_source(name), description, family="open_clip")
    for name, (repo_id, description) in BLIP_SOURCES.items():
        CAPTIONERS.register(name, _hub_loader(repo_id, name, captioner_from_folder), _source(repo_id).describe,
                            description, family="blip")


register()
