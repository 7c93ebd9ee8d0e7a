"""CLIP embedders through transformers (``CLIPModel`` folders: the toy CLIP and OpenAI CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..hub import check_weights_safe, model_hash


def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor.
    return getattr(out, "pooler_output", out)


class TransformersCLIPEmbedder:
    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu", batch_size: int = 256,
                 allow_pickle: bool = False):
        from transformers import CLIPModel, CLIPProcessor

        self._path = Path(path)
        check_weights_safe(self._path, allow_pickle)
        # safetensors only; with --allow-pickle prefer them and fall back to pickles.
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True if not allow_pickle else None,
                                               local_files_only=True)
        self.model.to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.name = name or self._path.name
        self.device = device
        self.batch_size = batch_size
        self.dim = int(self.model.config.projection_dim)
        self._hash = model_hash(self._path)

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=list(images[i : i + self.batch_size]), return_tensors="pt").pixel_values
            px = px.to(self.device, self.model.dtype)  # a model cast to fp16 takes fp16 pixels
            out.append(F.normalize(_features(self.model.get_image_features(pixel_values=px)).float(), dim=-1))
        return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                           return_tensors="pt").to(self.device)
            out.append(F.normalize(_features(self.model.get_text_features(**tok)), dim=-1))
        return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
