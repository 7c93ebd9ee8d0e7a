"""The exported BLIP captioner on onnxruntime, behind the ``Captioner`` protocol.

Greedy decoding in numpy over a decoder-step graph with a KV cache, reproducing ``BlipForConditionalGeneration
.generate(do_sample=False, num_beams=1)``: start from BOS, append the argmax token, sequences that emitted EOS
continue with PAD, stop when all have finished or after ``max_new_tokens``. Finished sequences are dropped from the
step batch (their remaining tokens are PAD whatever the model says), so long batches get cheaper as they finish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..kernels import DEFAULT_IMPLS, ImageTransform, preprocess_images
from ..kernels.preprocess import _check_images
from .folder import ExportFolder
from .session import RuntimeOptions


class OnnxCaptioner:
    def __init__(self, path: str | Path, options: RuntimeOptions | None = None, batch_size: int = 128,
                 kernel_impl: str | None = None):
        from transformers import AutoTokenizer

        folder = ExportFolder(path).component_folder("captioner")
        self.folder = folder
        self.options = options or RuntimeOptions()
        s = folder.settings
        self._identity = folder.identity
        self.name = self._identity["name"]
        self.batch_size = batch_size
        self.kernel_impl = kernel_impl or DEFAULT_IMPLS["preprocess_images"]
        self.bos, self.eos, self.pad = int(s["bos_token_id"]), int(s["eos_token_id"]), int(s["pad_token_id"])
        self.max_positions = int(s["max_positions"])
        self.n_layers, self.n_heads, self.head_dim = int(s["n_layers"]), int(s["n_heads"]), int(s["head_dim"])
        self.transform = ImageTransform.from_dict(s["image_transform"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder.file(s["processor"]), local_files_only=True)
        self.vision = folder.load_graph("vision_encoder", self.options)
        self.step = folder.load_graph("decoder_step", self.options)

    def identity(self) -> dict:
        return dict(self._identity)

    def peak_bytes(self, n_images: int) -> tuple[int, str] | None:
        """(bytes, graph) of captioning ``n_images`` in one call: the vision encoder's outputs (the decoder's cross
        keys/values) stay alive through the decoding steps; None when the export has no measurements."""
        from .memory import graph_need

        rows = min(self.batch_size, n_images)
        graphs = self.folder.info.get("graphs", {})
        vision, step = graph_need(graphs.get("vision_encoder"), rows), graph_need(graphs.get("decoder_step"), rows)
        return None if vision is None or step is None else (vision + step, "captioner/vision_encoder+decoder_step")

    def caption(self, images: np.ndarray, max_new_tokens: int = 30) -> list[str]:
        ids = self.generate_ids(images, max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def generate_ids(self, images: np.ndarray, max_new_tokens: int = 30) -> list[list[int]]:
        """Token ids per image, BOS first, as ``generate()`` returns them (finished rows padded to the batch)."""
        if max_new_tokens < 1 or max_new_tokens + 1 > self.max_positions:
            raise UsageError(f"max_new_tokens must be between 1 and {self.max_positions - 1} for this captioner, "
                             f"got {max_new_tokens}")
        if len(images) == 0:
            return []
        images = _check_images(images)
        out: list[list[int]] = []
        for i in range(0, len(images), self.batch_size):
            out.extend(self._greedy(images[i : i + self.batch_size], max_new_tokens).tolist())
        return out

    def _greedy(self, images: np.ndarray, max_new_tokens: int) -> np.ndarray:
        px = preprocess_images(images, self.transform, self.kernel_impl)
        enc = self.vision.run(pixel_values=px)
        cross = {k: v for k, v in enc.items() if k.startswith("cross_")}
        n = len(images)
        tokens = np.full((n, 1), self.bos, np.int64)
        empty = np.zeros((n, self.n_heads, 0, self.head_dim), np.float32)
        past = {f"past_{kind}.{i}": empty for i in range(self.n_layers) for kind in ("key", "value")}
        alive = np.arange(n)  # rows still decoding; the cache and cross tensors hold only these rows
        for _ in range(max_new_tokens):
            outs = self.step.run(input_ids=tokens[alive, -1:], **past, **cross)
            chosen = outs["logits"].argmax(-1)  # first maximum on ties, as torch.argmax
            column = np.full(n, self.pad, np.int64)
            column[alive] = chosen
            tokens = np.concatenate([tokens, column[:, None]], axis=1)
            keep = chosen != self.eos
            if not keep.any():
                break
            past = {k.replace("present_", "past_"): v[keep] for k, v in outs.items() if k.startswith("present_")}
            if not keep.all():
                cross = {k: v[keep] for k, v in cross.items()}
            alive = alive[keep]
        return tokens
