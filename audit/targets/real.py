"""The real targets (the paper's LDM and DALL-E mini, Stable Diffusion) and loading any local or cached folder.

Registered names resolve to the local Hugging Face cache (``hub.py``); a folder or a cached hub id is loaded by
what it contains, not by how it is spelled: ``model_index.json`` -> diffusers (SD or LDM), min-dalle's
checkpoint files -> DALL-E.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError
from ..registry import TARGETS
from ..hub import HubSource, audit_cache_dir, is_hub_id

_SD_INCLUDE = ("*.json", "*.txt", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
               "vae/diffusion_pytorch_model.safetensors")
_SD_REQUIRED = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer/*")
_LDM_REQUIRED = ("model_index.json", "unet/config.json", "vqvae/config.json", "bert/config.json", "tokenizer/*")

DIFFUSION_SOURCES: dict[str, tuple[HubSource, str]] = {
    "ldm": (HubSource("CompVis/ldm-text2im-large-256", required=_LDM_REQUIRED),
            "the paper's LDM (CompVis text-to-image, LAION-400M), 256 px, through diffusers' LDMTextToImagePipeline"),
    "sd-1.4": (HubSource("CompVis/stable-diffusion-v1-4", include=_SD_INCLUDE, required=_SD_REQUIRED),
               "Stable Diffusion 1.4 (LAION-2B en / laion-aesthetics), 512 px"),
    "sd-1.5": (HubSource("stable-diffusion-v1-5/stable-diffusion-v1-5", include=_SD_INCLUDE, required=_SD_REQUIRED),
               "Stable Diffusion 1.5, 512 px"),
    "sd-2.1": (HubSource("stabilityai/stable-diffusion-2-1", include=_SD_INCLUDE, required=_SD_REQUIRED),
               "Stable Diffusion 2.1 (v-prediction), 768 px"),
}

DALLE_MINI = HubSource("kuprel/min-dalle", files=("config.json", "vocab_mini.json", "merges_mini.txt",
                                                  "encoder_mini.pt", "decoder_mini.pt", "detoker.pt"),
                       required=("vocab_mini.json", "merges_mini.txt", "encoder_mini.*", "decoder_mini.*", "detoker.*"))


def dalle_converted_dir() -> Path:
    """Where ``python -m audit.targets.dalle`` writes the safetensors conversion the ``dalle-mini`` name uses."""
    return audit_cache_dir() / "dalle-mini"


# ----------------------------------------------------------------------------------------------------------------
# folders and hub ids


def is_dalle_folder(path: str | Path) -> bool:
    """min-dalle's checkpoint files (weights as .safetensors or .pt): a detokenizer and a mini or mega encoder."""
    path = Path(path)
    has = lambda stem: any((path / f"{stem}{ext}").is_file() for ext in (".safetensors", ".pt"))  # noqa: E731
    return has("detoker") and (has("encoder_mini") or has("encoder"))


def target_family(path: str | Path) -> str:
    path = Path(path)
    if (path / "model_index.json").is_file():
        return "diffusers"
    if is_dalle_folder(path):
        return "dalle"
    raise ModelNotFoundError(
        f"{path}: not a target folder: expected a diffusers pipeline (model_index.json), DALL-E mini checkpoints "
        f"(encoder_mini.*, decoder_mini.*, detoker.*) or an `audit export` folder"
    )


def target_from_folder(path: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                       **kw):
    if target_family(path) == "dalle":
        from . import dalle

        return dalle.DalleGenerator(path, name=name, device=device, allow_pickle=allow_pickle, **kw)
    from .diffusion import DiffusersGenerator

    return DiffusersGenerator.from_folder(path, name=name, device=device, allow_pickle=allow_pickle, **kw)


def target_from_hub(repo_id: str, device: str = "cpu", allow_pickle: bool = False, **kw):
    if not is_hub_id(repo_id):
        raise ModelNotFoundError(f"{repo_id}: neither a registered target, a folder, nor a hub id (org/name)")
    return target_from_folder(HubSource(repo_id).resolve(), name=repo_id, device=device, allow_pickle=allow_pickle,
                              **kw)


# ----------------------------------------------------------------------------------------------------------------
# registered names


def _diffusion_loader(name: str):
    source = DIFFUSION_SOURCES[name][0]

    def load(device: str = "cpu", allow_pickle: bool = False, **kw):
        from .diffusion import DiffusersGenerator

        return DiffusersGenerator.from_folder(source.resolve(), name=name, device=device, allow_pickle=allow_pickle,
                                              **kw)

    return load


def _dalle_mini(device: str = "cpu", allow_pickle: bool = False, **kw):
    from . import dalle

    converted = dalle_converted_dir()
    folder = converted if is_dalle_folder(converted) else DALLE_MINI.resolve()
    return dalle.DalleGenerator(folder, name="dalle-mini", device=device, allow_pickle=allow_pickle, **kw)


def _dalle_mini_source() -> str:
    converted = dalle_converted_dir()
    if is_dalle_folder(converted):
        return f"converted: {converted}"
    path = DALLE_MINI.local_path()
    convert = f"python -m audit.targets.dalle {path or '<snapshot>'} {converted}"
    if path is not None:
        return f"cache: {path} (pickles: convert with `{convert}` or pass --allow-pickle)"
    return f"not cached: {DALLE_MINI.fetch_command()}, then `{convert}`"


def register() -> None:
    for name, (source, description) in DIFFUSION_SOURCES.items():
        family = "ldm" if name == "ldm" else "diffusion"
        TARGETS.register(name, _diffusion_loader(name), source.describe, description, family=family)
    TARGETS.register("dalle-mini", _dalle_mini, _dalle_mini_source,
                     "the paper's DALL-E mini (BART encoder/decoder over VQGAN tokens; min-dalle's PyTorch port), "
                     "256 px",
                     family="dalle")


register()
