"""The exported CLIP embedder on onnxruntime, behind the ``Embedder`` protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..kernels import DEFAULT_IMPLS, ImageTransform, preprocess_images
from ..kernels.preprocess import _check_images
from .folder import ExportFolder
from .session import RuntimeOptions


class OnnxEmbedder:
    def __init__(self, path: str | Path, options: RuntimeOptions | None = None, batch_size: int = 256,
                 kernel_impl: str | None = None):
        from transformers import AutoTokenizer

        folder = ExportFolder(path).component_folder("embedder")
        self.folder = folder
        self.options = options or RuntimeOptions()
        s = folder.settings
        self._identity = folder.identity
        self.name = self._identity["name"]
        self.dim = int(s["dim"])
        self.batch_size = batch_size
        self.kernel_impl = kernel_impl or DEFAULT_IMPLS["preprocess_images"]
        self.transform = ImageTransform.from_dict(s["image_transform"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder.file(s["processor"]), local_files_only=True)
        self.image_encoder = folder.load_graph("image_encoder", self.options)
        self.text_encoder = folder.load_graph("text_encoder", self.options)

    def identity(self) -> dict:
        return dict(self._identity)

    def peak_bytes(self, n_images: int) -> tuple[int, str] | None:
        """(bytes, graph) of embedding ``n_images`` images or texts in one call; None without measurements."""
        from .memory import largest_need

        rows = min(self.batch_size, n_images)
        found = largest_need(self.folder.info.get("graphs", {}), {"image_encoder": rows, "text_encoder": rows})
        return None if found is None else (found[0], f"embedder/{found[1]}")

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        images = _check_images(images)
        out = [self.image_encoder.run(pixel_values=preprocess_images(images[i : i + self.batch_size], self.transform,
                                                                     self.kernel_impl))["image_embeds"]
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            # As the torch embedder: pad to the longest in the batch, truncate to the model's length.
            tok = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True, return_tensors="np")
            out.append(self.text_encoder.run(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                       ["text_embeds"])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)
