"""open_clip embedders (LAION and other open_clip checkpoints) behind the ``Embedder`` protocol.

Two sources, both local: a folder in open_clip's hf-hub layout (``open_clip_config.json`` + weights; a cached
``hf-hub:`` repo is such a folder), or a built-in architecture with a pretrained tag (``ViT-B-32`` +
``laion2b_s34b_b79k``) whose weights file is looked up in the Hugging Face cache. Never downloads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelNotFoundError, UnknownNameError, UnsafeWeightsError
from ..hub import HubSource, check_weights_safe, hub_cache_dir, model_hash

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "open_clip_model.safetensors"
PICKLE_WEIGHTS = "open_clip_pytorch_model.bin"


def is_open_clip_folder(path: str | Path) -> bool:
    return (Path(path) / "open_clip_config.json").is_file()


def pretrained_source(arch: str, tag: str) -> tuple[dict, HubSource, str]:
    """(open_clip's pretrained config, the hub repo holding the weights, the weights file name) of arch/tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            raise UnknownNameError(f"open_clip: unknown architecture {arch!r}; see open_clip.list_models()")
        raise UnknownNameError(f"open_clip: {arch} has no pretrained tag {tag!r}; its tags are: {', '.join(tags)}")
    if not cfg.get("hf_hub"):
        raise ModelNotFoundError(f"open_clip:{arch}/{tag}: weights are only published at a URL ({cfg.get('url')}); "
                                 "download them and pass the folder in open_clip's hf-hub layout")
    repo_id, filename = cfg["hf_hub"].rstrip("/"), ""
    if cfg["hf_hub"].count("/") > 1 and not cfg["hf_hub"].endswith("/"):
        repo_id, filename = cfg["hf_hub"].rsplit("/", 1)
    safe = filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else (filename or SAFE_WEIGHTS)
    return cfg, HubSource(repo_id, files=(safe,), required=(safe,)), filename or PICKLE_WEIGHTS


def resolve_pretrained(arch: str, tag: str, allow_pickle: bool) -> tuple[dict, Path, str]:
    """(pretrained cfg, local weights file, identity hash) from the HF cache; a one-line error otherwise."""
    from huggingface_hub import try_to_load_from_cache

    cfg, source, pickle_name = pretrained_source(arch, tag)
    for name in (source.files[0], pickle_name):
        hit = try_to_load_from_cache(source.repo_id, name, cache_dir=hub_cache_dir())
        if isinstance(hit, str):
            path = Path(hit)
            if path.suffix != ".safetensors" and not allow_pickle:
                raise UnsafeWeightsError(
                    f"{path}: only pickle weights of {source.repo_id} are cached; pass --allow-pickle if you trust "
                    f"them, or fetch the safetensors file with `{source.fetch_command()}`")
            return cfg, path, model_hash(path.parent, f"{source.repo_id}/{name}")
    raise ModelNotFoundError(
        f"{source.repo_id}: open_clip:{arch}/{tag} weights are not in the local Hugging Face cache "
        f"({hub_cache_dir()}) and audit never downloads; fetch them with `{source.fetch_command()}`")


class OpenCLIPEmbedder:
    def __init__(self, model, preprocess, tokenizer, name: str, identity_hash: str, device: str = "cpu",
                 batch_size: int = 256):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.batch_size = batch_size
        self.dim = int(getattr(model.visual, "output_dim", 0) or model.text_projection.shape[1])
        self._hash = identity_hash

    @classmethod
    def from_folder(cls, path: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                    batch_size: int = 256) -> "OpenCLIPEmbedder":
        import open_clip

        path = Path(path)
        check_weights_safe(path, allow_pickle)
        spec = f"local-dir:{path}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(spec, weights_only=True)
            tokenizer = open_clip.get_tokenizer(spec)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"{path}: could not load the open_clip model ({first})") from None
        return cls(model, preprocess, tokenizer, name or path.name, model_hash(path), device, batch_size)

    @classmethod
    def from_pretrained_tag(cls, arch: str, tag: str, name: str | None = None, device: str = "cpu",
                            allow_pickle: bool = False, batch_size: int = 256) -> "OpenCLIPEmbedder":
        import open_clip

        cfg, weights, identity_hash = resolve_pretrained(arch, tag, allow_pickle)
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(weights), weights_only=True, force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"), image_std=cfg.get("std"), image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"))
        return cls(model, preprocess, open_clip.get_tokenizer(arch), name or f"open_clip:{arch}/{tag}", identity_hash,
                   device, batch_size)

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[i : i + self.batch_size]])
            out.append(F.normalize(self.model.encode_image(px.to(self.device)).float(), dim=-1))
        return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tok).float(), dim=-1))
        return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
