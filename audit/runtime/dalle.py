"""The exported DALL-E target on onnxruntime: the torch path's sampling loop over three graphs.

``audit.targets.dalle.DalleSampler`` owns tokenisation, the per-image ``torch.Generator`` top-k sampling and the
supercondition mix; this backend only swaps the encoder, the decoder step (KV cache in, updated cache out) and the
VQGAN detokenizer for their graphs. Each distinct caption is encoded once per batch, as on the torch path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..targets.dalle import PATCH, DalleConfig, DalleSampler, read_tokenizer
from .folder import ExportFolder
from .session import RuntimeOptions


class OnnxDalleGenerator(DalleSampler):
    def __init__(self, path: str | Path, options: RuntimeOptions | None = None, batch_size: int = 8,
                 temperature: float | None = None, top_k: int | None = None):
        folder = ExportFolder(path).component_folder("target")
        self.folder = folder
        self.options = options or RuntimeOptions()
        s = folder.settings
        tok = folder.file(s["tokenizer"])
        self.config = DalleConfig.load(tok / "dalle.json")
        self.tokenizer = read_tokenizer(tok, self.config)
        self.temperature = float(s["temperature"] if temperature is None else temperature)
        self.top_k = int(s["top_k"] if top_k is None else top_k)
        ident = folder.identity
        self.name, self._hash = ident["name"], ident["hash"]
        self.batch_size = batch_size
        self.resolution = self.config.grid * PATCH
        self.encoder = folder.load_graph("encoder", self.options)
        self.decoder = folder.load_graph("decoder_step", self.options)
        self.detokenizer = folder.load_graph("detokenizer", self.options)

    def _encode_rows(self, rows):
        return torch.from_numpy(self.encoder.run(text_tokens=rows.numpy())["encoder_state"])

    def _empty_cache(self, rows, dtype):
        c = self.config
        return np.zeros((c.layer_count, 2, rows, c.image_token_count, c.embed_count), np.float32)

    def _step(self, prev, position, encoder_state, attention_mask, kv_cache):
        out = self.decoder.run(prev_tokens=prev.numpy(), position=np.asarray(position, np.int64),
                               encoder_state=encoder_state.numpy(), attention_mask=attention_mask.numpy(),
                               kv_cache=kv_cache)
        return torch.from_numpy(out["logits"]), out["kv_cache_out"]

    def _detokenize(self, tokens):
        return torch.from_numpy(self.detokenizer.run(tokens=tokens.numpy())["pixels"])
