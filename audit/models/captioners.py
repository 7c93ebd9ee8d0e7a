"""BLIP captioners through transformers (``BlipForConditionalGeneration`` folders), greedy decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..hub import check_weights_safe, model_hash


class TransformersBlipCaptioner:
    def __init__(self, path: str | Path, name: str | None = None, device: str = "cpu", batch_size: int = 128,
                 allow_pickle: bool = False):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self._path = Path(path)
        check_weights_safe(self._path, allow_pickle)
        # safetensors only; with --allow-pickle prefer them and fall back to pickles.
        self.model = BlipForConditionalGeneration.from_pretrained(
            path, use_safetensors=True if not allow_pickle else None, local_files_only=True)
        self.model.to(device).eval()
        self.processor = BlipProcessor.from_pretrained(path, local_files_only=True)
        self.name = name or self._path.name
        self.device = device
        self.batch_size = batch_size
        self._hash = model_hash(self._path)

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    @torch.no_grad()
    def caption(self, images: np.ndarray, max_new_tokens: int = 30) -> list[str]:
        out: list[str] = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=list(images[i : i + self.batch_size]), return_tensors="pt").pixel_values
            px = px.to(self.device, self.model.dtype)  # a model cast to fp16 takes fp16 pixels
            ids = self.model.generate(pixel_values=px, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
            out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out
