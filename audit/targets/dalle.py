"""DALL-E mini / mega in PyTorch: BART text encoder, autoregressive decoder over VQGAN tokens, VQGAN detokenizer.

A port of min-dalle 0.4.11 (Brett Kuprel, MIT licence, https://github.com/kuprel/min-dalle), kept compatible with
its checkpoints: the modules and parameter names are the same, so its released state dicts (``encoder_mini.pt``,
``decoder_mini.pt``, ``detoker.pt`` in ``kuprel/min-dalle``) load unchanged. What differs from the original:

- no import-time side effects (min-dalle disables autograd and sets the thread count globally), no downloads;
- weights load from ``.safetensors`` files; the original ``.pt`` pickles only with ``allow_pickle=True``
  (``--allow-pickle``), through ``torch.load(weights_only=True)``, or once through ``convert_to_safetensors``;
- the sampler is seeded per image (a ``torch.Generator`` per image from ``audit.seeding.image_seeds``) instead
  of one global seed per batch, so an image does not depend on its batch;
- the decoder step takes and returns its key/value cache as a tensor (no in-place writes), the form an ONNX
  export of "decoder step with a KV cache" needs; the encoder takes any batch size;
- the token grid is a parameter (the real models use 16 x 16 = 256 tokens; tests use tiny grids), the
  detokenizer architecture is the real one whatever the grid;
- emoji are dropped rather than spelled out (min-dalle's ``emoji.demojize`` step needs another dependency).

Folder layout (that of ``kuprel/min-dalle``): ``vocab{s}.json``, ``merges{s}.txt``, ``encoder{s}.*``,
``decoder{s}.*``, ``detoker.*`` with ``s`` = ``_mini`` for mini and empty for mega, plus an optional
``dalle.json`` (``DalleConfig``) for non-standard sizes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..errors import ArtifactError, ModelNotFoundError, UnsafeWeightsError
from .base import PerImageSeeds
from ..hub import model_hash

log = logging.getLogger(__name__)

PAD_TOKEN = 1  # BART's <pad>; the encoder masks it out
DETOKENIZER_VOCAB = 2**14  # VQGAN f16 codebook: 16384 codes of 256 dims
DETOKENIZER_EMBED = 2**8
PATCH = 16  # pixels per image token side


@dataclasses.dataclass
class DalleConfig(Config):
    """Sizes of one DALL-E model and its sampling defaults (min-dalle's values for mini unless noted)."""

    variant: str = "mini"  # names the checkpoint files: encoder_mini.* for mini, encoder.* for mega
    layer_count: int = 12
    attention_head_count: int = 16
    embed_count: int = 1024
    glu_embed_count: int = 2730
    text_vocab_count: int = 50264
    image_vocab_count: int = 16384
    text_token_count: int = 64
    image_token_count: int = 256  # a square grid of tokens; 16 x 16 gives 256 x 256 pixels
    bos_token: int = 2**14 - 1  # min-dalle 0.4.11 starts every image with this token
    temperature: float = 1.0
    top_k: int = 256

    @property
    def suffix(self) -> str:
        return "_mini" if self.variant == "mini" else ""

    @property
    def grid(self) -> int:
        side = int(round(math.sqrt(self.image_token_count)))
        if side * side != self.image_token_count:
            raise ArtifactError(f"image_token_count {self.image_token_count} is not a square grid")
        return side


MINI = DalleConfig()
MEGA = DalleConfig(variant="mega", layer_count=24, attention_head_count=32, embed_count=2048, glu_embed_count=4096,
                   text_vocab_count=50272, image_vocab_count=16415)


# ----------------------------------------------------------------------------------------------------------------
# Text tokenizer (byte-pair encoding over BART's vocabulary, as min-dalle's TextTokenizer)


class TextTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[str]):
        self.token_from_subword = vocab
        pairs = [tuple(pair.split()) for pair in merges]
        self.rank_from_pair = dict(zip(pairs, range(len(pairs))))

    @classmethod
    def from_files(cls, vocab_path: Path, merges_path: Path) -> "TextTokenizer":
        vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
        merges = [ln for ln in lines if ln.strip() and not ln.startswith("#version")]
        return cls(vocab, merges)

    def tokenize(self, text: str) -> list[int]:
        sep, cls, unk = (self.token_from_subword[t] for t in ("</s>", "<s>", "<unk>"))
        text = text.lower().encode("ascii", errors="ignore").decode()
        tokens = [
            self.token_from_subword.get(subword, unk)
            for word in text.split(" ")
            if word
            for subword in self._bpe(word)
        ]
        return [cls] + tokens + [sep]

    def _bpe(self, word: str) -> list[str]:
        subwords = [chr(ord(" ") + 256)] + list(word)
        while len(subwords) > 1:
            pairs = list(zip(subwords[:-1], subwords[1:]))
            best = min(pairs, key=lambda p: self.rank_from_pair.get(p, math.inf))
            if best not in self.rank_from_pair:
                break
            i = pairs.index(best)  # the first occurrence only, as the original
            subwords = subwords[:i] + [subwords[i] + subwords[i + 1]] + subwords[i + 2 :]
        return subwords


# ----------------------------------------------------------------------------------------------------------------
# BART encoder / decoder (parameter names as min-dalle)


class GLU(nn.Module):
    def __init__(self, count_in_out: int, count_middle: int):
        super().__init__()
        self.gelu = nn.GELU()
        self.ln0 = nn.LayerNorm(count_in_out)
        self.ln1 = nn.LayerNorm(count_middle)
        self.fc0 = nn.Linear(count_in_out, count_middle, bias=False)
        self.fc1 = nn.Linear(count_in_out, count_middle, bias=False)
        self.fc2 = nn.Linear(count_middle, count_in_out, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.ln0(z)
        w = self.gelu(self.fc0(z))
        v = self.fc1(z)
        return self.fc2(self.ln1(w * v))


class AttentionBase(nn.Module):
    def __init__(self, head_count: int, embed_count: int):
        super().__init__()
        self.head_count = head_count
        self.embed_count = embed_count
        self.k_proj = nn.Linear(embed_count, embed_count, bias=False)
        self.v_proj = nn.Linear(embed_count, embed_count, bias=False)
        self.q_proj = nn.Linear(embed_count, embed_count, bias=False)
        self.out_proj = nn.Linear(embed_count, embed_count, bias=False)

    def attend(self, keys, values, queries, attention_mask) -> torch.Tensor:
        keys = keys.reshape(keys.shape[:2] + (self.head_count, -1))
        values = values.reshape(values.shape[:2] + (self.head_count, -1))
        queries = queries.reshape(queries.shape[:2] + (self.head_count, -1))
        queries = queries / queries.shape[-1] ** 0.5
        bias = (1 - attention_mask.to(queries.dtype)) * -1e12
        weights = torch.einsum("bqhc,bkhc->bhqk", queries, keys) + bias
        weights = torch.softmax(weights, -1)
        out = torch.einsum("bhqk,bkhc->bqhc", weights, values)
        return self.out_proj(out.reshape(out.shape[:2] + (self.embed_count,)))


class EncoderSelfAttention(AttentionBase):
    def forward(self, encoder_state, attention_mask):
        return self.attend(self.k_proj(encoder_state), self.v_proj(encoder_state), self.q_proj(encoder_state),
                           attention_mask)


class EncoderLayer(nn.Module):
    def __init__(self, embed_count: int, head_count: int, glu_embed_count: int):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(embed_count)
        self.self_attn = EncoderSelfAttention(head_count, embed_count)
        self.self_attn_layer_norm = nn.LayerNorm(embed_count)
        self.glu = GLU(embed_count, glu_embed_count)

    def forward(self, encoder_state, attention_mask):
        residual = encoder_state
        encoder_state = self.pre_self_attn_layer_norm(encoder_state)
        encoder_state = self.self_attn(encoder_state, attention_mask)
        encoder_state = residual + self.self_attn_layer_norm(encoder_state)
        return encoder_state + self.glu(encoder_state)


class DalleBartEncoder(nn.Module):
    def __init__(self, layer_count: int, embed_count: int, attention_head_count: int, text_vocab_count: int,
                 text_token_count: int, glu_embed_count: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(text_vocab_count, embed_count)
        self.embed_positions = nn.Embedding(text_token_count, embed_count)
        self.layers = nn.ModuleList(
            [EncoderLayer(embed_count, attention_head_count, glu_embed_count) for _ in range(layer_count)]
        )
        self.layernorm_embedding = nn.LayerNorm(embed_count)
        self.final_ln = nn.LayerNorm(embed_count)
        self.register_buffer("token_indices", torch.arange(text_token_count), persistent=False)

    def forward(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens long [B, text_token_count] -> encoder state [B, text_token_count, E]."""
        attention_mask = text_tokens.not_equal(PAD_TOKEN)[:, None, None, :]
        state = self.embed_tokens(text_tokens) + self.embed_positions(self.token_indices)[None]
        state = self.layernorm_embedding(state)
        for layer in self.layers:
            state = layer(state, attention_mask)
        return self.final_ln(state)


class DecoderCrossAttention(AttentionBase):
    def forward(self, decoder_state, encoder_state, attention_mask):
        return self.attend(self.k_proj(encoder_state), self.v_proj(encoder_state), self.q_proj(decoder_state),
                           attention_mask)


class DecoderSelfAttention(AttentionBase):
    def forward(self, decoder_state, kv_cache, self_attn_mask, slot):
        """kv_cache [2, B, T, E]; ``slot`` [1, T, 1] marks the current position, written without in-place ops."""
        keys = torch.where(slot, self.k_proj(decoder_state), kv_cache[0])
        values = torch.where(slot, self.v_proj(decoder_state), kv_cache[1])
        out = self.attend(keys, values, self.q_proj(decoder_state), self_attn_mask)
        return out, torch.stack([keys, values])


class DecoderLayer(nn.Module):
    def __init__(self, head_count: int, embed_count: int, glu_embed_count: int):
        super().__init__()
        self.pre_self_attn_layer_norm = nn.LayerNorm(embed_count)
        self.self_attn = DecoderSelfAttention(head_count, embed_count)
        self.self_attn_layer_norm = nn.LayerNorm(embed_count)
        self.pre_encoder_attn_layer_norm = nn.LayerNorm(embed_count)
        self.encoder_attn = DecoderCrossAttention(head_count, embed_count)
        self.encoder_attn_layer_norm = nn.LayerNorm(embed_count)
        self.glu = GLU(embed_count, glu_embed_count)

    def forward(self, decoder_state, encoder_state, kv_cache, attention_mask, self_attn_mask, slot):
        residual = decoder_state
        state = self.pre_self_attn_layer_norm(decoder_state)
        state, kv_cache = self.self_attn(state, kv_cache, self_attn_mask, slot)
        state = residual + self.self_attn_layer_norm(state)
        residual = state
        state = self.pre_encoder_attn_layer_norm(state)
        state = self.encoder_attn(state, encoder_state, attention_mask)
        state = residual + self.encoder_attn_layer_norm(state)
        return state + self.glu(state), kv_cache


class DalleBartDecoder(nn.Module):
    def __init__(self, image_vocab_count: int, embed_count: int, attention_head_count: int, glu_embed_count: int,
                 layer_count: int, image_token_count: int = 256):
        super().__init__()
        self.layer_count = layer_count
        self.embed_count = embed_count
        self.image_token_count = image_token_count
        self.embed_tokens = nn.Embedding(image_vocab_count + 1, embed_count)
        # min-dalle's table has 256 rows whatever the grid; keep it so real checkpoints load.
        self.embed_positions = nn.Embedding(max(image_token_count, 256), embed_count)
        self.layers = nn.ModuleList(
            [DecoderLayer(attention_head_count, embed_count, glu_embed_count) for _ in range(layer_count)]
        )
        self.layernorm_embedding = nn.LayerNorm(embed_count)
        self.final_ln = nn.LayerNorm(embed_count)
        self.lm_head = nn.Linear(embed_count, image_vocab_count + 1, bias=False)
        self.register_buffer("token_indices", torch.arange(image_token_count), persistent=False)

    def empty_cache(self, batch: int, dtype=torch.float32) -> torch.Tensor:
        device = self.lm_head.weight.device
        return torch.zeros(self.layer_count, 2, batch, self.image_token_count, self.embed_count, dtype=dtype,
                           device=device)

    def forward(self, prev_tokens, position, encoder_state, attention_mask, kv_cache):
        """One decoding step.

        prev_tokens long [B] (the token at ``position``), position long scalar tensor, encoder_state [B, S, E],
        attention_mask bool [B, 1, 1, S], kv_cache [L, 2, B, T, E] -> (logits [B, V + 1], new kv_cache).
        """
        position = position.reshape(())
        state = self.embed_tokens(prev_tokens[:, None]) + self.embed_positions(position.reshape(1))[None]
        state = self.layernorm_embedding(state)
        self_attn_mask = (self.token_indices <= position)[None, None, None, :]
        slot = (self.token_indices == position)[None, :, None]
        caches = []
        for i, layer in enumerate(self.layers):
            state, layer_cache = layer(state, encoder_state, kv_cache[i], attention_mask, self_attn_mask, slot)
            caches.append(layer_cache)
        logits = self.lm_head(self.final_ln(state))
        return logits[:, 0], torch.stack(caches)


# ----------------------------------------------------------------------------------------------------------------
# VQGAN detokenizer (the real f16 / 16384-code architecture, fixed)


class ResnetBlock(nn.Module):
    def __init__(self, log2_count_in: int, log2_count_out: int):
        super().__init__()
        m, n = 2**log2_count_in, 2**log2_count_out
        self.is_middle = m == n
        self.norm1 = nn.GroupNorm(2**5, m)
        self.conv1 = nn.Conv2d(m, n, 3, padding=1)
        self.norm2 = nn.GroupNorm(2**5, n)
        self.conv2 = nn.Conv2d(n, n, 3, padding=1)
        if not self.is_middle:
            self.nin_shortcut = nn.Conv2d(m, n, 1)

    def forward(self, x):
        h = self.norm1(x)
        h = self.conv1(h * torch.sigmoid(h))
        h = self.norm2(h)
        h = self.conv2(h * torch.sigmoid(h))
        if not self.is_middle:
            x = self.nin_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        n = 2**9
        self.norm = nn.GroupNorm(2**5, n)
        self.q = nn.Conv2d(n, n, 1)
        self.k = nn.Conv2d(n, n, 1)
        self.v = nn.Conv2d(n, n, 1)
        self.proj_out = nn.Conv2d(n, n, 1)

    def forward(self, x):
        n, m, side = 2**9, x.shape[0], x.shape[-1]
        h = self.norm(x)
        k = self.k(h).reshape(m, n, -1)
        v = self.v(h).reshape(m, n, -1)
        q = self.q(h).reshape(m, n, -1).permute(0, 2, 1)
        w = torch.softmax(torch.bmm(q, k) / n**0.5, dim=2).permute(0, 2, 1)
        h = torch.bmm(v, w).reshape(m, n, side, side)
        return x + self.proj_out(h)


class MiddleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_1 = ResnetBlock(9, 9)
        self.attn_1 = AttentionBlock()
        self.block_2 = ResnetBlock(9, 9)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Upsample(nn.Module):
    def __init__(self, log2_count: int):
        super().__init__()
        n = 2**log2_count
        self.upsample = nn.UpsamplingNearest2d(scale_factor=2)
        self.conv = nn.Conv2d(n, n, 3, padding=1)

    def forward(self, x):
        return self.conv(self.upsample(x))


class UpsampleBlock(nn.Module):
    def __init__(self, log2_count_in: int, log2_count_out: int, has_attention: bool, has_upsample: bool):
        super().__init__()
        self.has_attention = has_attention
        self.has_upsample = has_upsample
        self.block = nn.ModuleList([
            ResnetBlock(log2_count_in, log2_count_out),
            ResnetBlock(log2_count_out, log2_count_out),
            ResnetBlock(log2_count_out, log2_count_out),
        ])
        if has_attention:
            self.attn = nn.ModuleList([AttentionBlock(), AttentionBlock(), AttentionBlock()])
        if has_upsample:
            self.upsample = Upsample(log2_count_out)

    def forward(self, h):
        for j in range(3):
            h = self.block[j](h)
            if self.has_attention:
                h = self.attn[j](h)
        return self.upsample(h) if self.has_upsample else h


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(2**8, 2**9, 3, padding=1)
        self.mid = MiddleLayer()
        self.up = nn.ModuleList([
            UpsampleBlock(7, 7, False, False),
            UpsampleBlock(8, 7, False, True),
            UpsampleBlock(8, 8, False, True),
            UpsampleBlock(9, 8, False, True),
            UpsampleBlock(9, 9, True, True),
        ])
        self.norm_out = nn.GroupNorm(2**5, 2**7)
        self.conv_out = nn.Conv2d(2**7, 3, 3, padding=1)

    def forward(self, z):
        z = self.mid(self.conv_in(z))
        for i in reversed(range(5)):
            z = self.up[i](z)
        z = self.norm_out(z)
        return self.conv_out(z * torch.sigmoid(z))


class VQGanDetokenizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.vocab_count = DETOKENIZER_VOCAB
        self.embedding = nn.Embedding(DETOKENIZER_VOCAB, DETOKENIZER_EMBED)
        self.post_quant_conv = nn.Conv2d(DETOKENIZER_EMBED, DETOKENIZER_EMBED, 1)
        self.decoder = Decoder()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens long [B, side * side] -> float pixels in [0, 255], [B, 16 side, 16 side, 3]."""
        side = int(round(math.sqrt(tokens.shape[1])))
        z = self.embedding(tokens).view(tokens.shape[0], side, side, DETOKENIZER_EMBED)
        z = self.decoder(self.post_quant_conv(z.permute(0, 3, 1, 2).contiguous()))
        return z.permute(0, 2, 3, 1).clip(0.0, 1.0) * 255


# ----------------------------------------------------------------------------------------------------------------
# Files


def weight_stems(config: DalleConfig) -> dict[str, str]:
    return {"encoder": f"encoder{config.suffix}", "decoder": f"decoder{config.suffix}", "detokenizer": "detoker"}


def read_config(folder: Path) -> DalleConfig:
    if (folder / "dalle.json").is_file():
        return DalleConfig.load(folder / "dalle.json")
    if any((folder / f"encoder_mini{ext}").is_file() for ext in (".safetensors", ".pt")):
        return dataclasses.replace(MINI)
    if any((folder / f"encoder{ext}").is_file() for ext in (".safetensors", ".pt")):
        return dataclasses.replace(MEGA)
    raise ModelNotFoundError(f"{folder}: not a DALL-E folder (no encoder_mini.* or encoder.* weights, no dalle.json)")


def _load_state(folder: Path, stem: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safe, pickle = folder / f"{stem}.safetensors", folder / f"{stem}.pt"
    if safe.is_file():
        from safetensors.torch import load_file

        return load_file(str(safe))
    if pickle.is_file():
        if not allow_pickle:
            raise UnsafeWeightsError(
                f"{pickle}: pickle weights (no {safe.name}); pass --allow-pickle if you trust the file, or convert "
                f"once with `python -m audit.targets.dalle {folder} OUT_DIR`"
            )
        # weights_only: a restricted unpickler that rebuilds tensors and refuses arbitrary objects.
        return torch.load(str(pickle), map_location="cpu", weights_only=True)
    raise ModelNotFoundError(f"{folder}: missing {safe.name} (or {pickle.name})")


def _load_into(module: nn.Module, state: dict, where: Path) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise ArtifactError(f"{where}: weights do not fit this DALL-E config ({detail})") from None
    if result.missing_keys:
        missing = result.missing_keys
        raise ArtifactError(f"{where}: weights lack {len(missing)} parameter(s), e.g. {missing[0]}")
    if result.unexpected_keys:
        log.debug("%s: ignoring %d unexpected keys", where, len(result.unexpected_keys))


def build_modules(config: DalleConfig) -> tuple[DalleBartEncoder, DalleBartDecoder, VQGanDetokenizer]:
    encoder = DalleBartEncoder(config.layer_count, config.embed_count, config.attention_head_count,
                               config.text_vocab_count, config.text_token_count, config.glu_embed_count)
    decoder = DalleBartDecoder(config.image_vocab_count, config.embed_count, config.attention_head_count,
                               config.glu_embed_count, config.layer_count, config.image_token_count)
    return encoder, decoder, VQGanDetokenizer()


def save_dalle(folder: str | Path, config: DalleConfig, encoder: nn.Module, decoder: nn.Module,
               detokenizer: nn.Module, vocab: dict[str, int], merges: list[str]) -> Path:
    """Write a DALL-E folder in min-dalle's layout, weights as safetensors, sizes in dalle.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stems = weight_stems(config)
    for key, module in (("encoder", encoder), ("decoder", decoder), ("detokenizer", detokenizer)):
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(folder / f"{stems[key]}.safetensors"))
    (folder / f"vocab{config.suffix}.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / f"merges{config.suffix}.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config.save(folder / "dalle.json")
    return folder


def convert_to_safetensors(src: str | Path, out: str | Path) -> Path:
    """Convert min-dalle's ``.pt`` checkpoints in ``src`` to a safetensors folder ``out`` (the user's explicit step).

    The pickles are read with ``torch.load(weights_only=True)``, which rebuilds tensors only.
    """
    src, out = Path(src), Path(out)
    config = read_config(src)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    for stem in weight_stems(config).values():
        state = _load_state(src, stem, allow_pickle=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{stem}.safetensors"))
    for name in (f"vocab{config.suffix}.json", f"merges{config.suffix}.txt"):
        if not (src / name).is_file():
            raise ModelNotFoundError(f"{src}: missing {name}")
        shutil.copyfile(src / name, out / name)
    config.save(out / "dalle.json")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The Generator


class DalleSampler(PerImageSeeds):
    """Caption -> images: encode the caption once, sample image tokens (top-k, per-image seed), detokenize.

    ``guidance`` is min-dalle's ``supercondition_factor`` (the same formula as classifier-free guidance:
    uncond + g (cond - uncond)); at 1.0 the unconditioned half of the batch is skipped. ``steps`` has no
    meaning for an autoregressive model (it always samples the whole token grid) and is ignored.

    The sampling loop is shared by the PyTorch model (``DalleGenerator``) and the exported graphs
    (``audit.runtime.OnnxDalleGenerator``); a backend supplies ``_encode_rows``, ``_empty_cache``, ``_step`` and
    ``_detokenize``. Tokens are drawn by torch from one ``torch.Generator`` per image on both, so the same seed
    gives the same tokens wherever the logits agree.
    """

    family = "dalle"
    config: DalleConfig
    tokenizer: TextTokenizer
    temperature: float
    top_k: int
    batch_size: int
    resolution: int
    name: str
    _hash: str

    def identity(self) -> dict:
        return {"name": self.name, "hash": self._hash}

    def text_tokens(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioned, unconditioned) token rows, long [N, text_token_count], laid out as min-dalle does."""
        n = self.config.text_token_count
        cond = np.full((len(prompts), n), PAD_TOKEN, dtype=np.int64)
        uncond = np.full((len(prompts), n), PAD_TOKEN, dtype=np.int64)
        for i, prompt in enumerate(prompts):
            tokens = self.tokenizer.tokenize(prompt)[:n]
            cond[i, : len(tokens)] = tokens
            uncond[i, :2] = [tokens[0], tokens[-1]]
        return torch.from_numpy(cond), torch.from_numpy(uncond)

    @torch.no_grad()
    def generate_with_seeds(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 0,
                            guidance: float = 1.0) -> np.ndarray:
        """uint8 [len(prompts), H, W, 3]: image i from prompts[i], its tokens sampled with seeds[i]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.sample_tokens(prompts[i : i + self.batch_size], seeds[i : i + self.batch_size], guidance)
            pixels = self._detokenize(tokens)
            out.append(torch.round(pixels).clamp(0, 255).to(torch.uint8).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.resolution, self.resolution, 3), np.uint8)

    def encode(self, prompts: Sequence[str], guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder state and cross-attention mask, each distinct prompt encoded once; rows = [cond; uncond]."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts])
        cond, uncond = self.text_tokens(unique)
        rows = torch.cat([cond, uncond]) if guided else cond
        state = self._encode_rows(rows)
        take = torch.cat([index, index + len(unique)]) if guided else index
        return state[take.to(state.device)], rows.not_equal(PAD_TOKEN)[take][:, None, None, :].to(state.device)

    def sample_tokens(self, prompts: Sequence[str], seeds: Sequence[int], guidance: float = 1.0) -> torch.Tensor:
        """Image tokens long [B, image_token_count] by top-k sampling, one torch.Generator per image."""
        guided = guidance != 1.0
        b = len(prompts)
        encoder_state, attention_mask = self.encode(prompts, guided)
        kv_cache = self._empty_cache(encoder_state.shape[0], encoder_state.dtype)
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        tokens = torch.full((b, self.config.image_token_count + 1), self.config.bos_token, dtype=torch.long)
        for i in range(self.config.image_token_count):
            prev = tokens[:, i].repeat(2 if guided else 1)
            logits, kv_cache = self._step(prev, i, encoder_state, attention_mask, kv_cache)
            logits = logits[:, :DETOKENIZER_VOCAB].float().cpu()
            if guided:
                # rows [:b] are conditioned, [b:] unconditioned: min-dalle's supercondition formula
                logits = logits[b:] * (1 - guidance) + logits[:b] * guidance
            tokens[:, i + 1] = self._sample(logits, gens)
        return tokens[:, 1:]

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        k = min(self.top_k, logits.shape[1])
        kth = torch.topk(logits, k, dim=1).values[:, -1:]
        weights = torch.exp((logits - logits.max(dim=1, keepdim=True).values) / self.temperature)
        weights = weights * (logits >= kth).to(weights.dtype)
        return torch.cat([torch.multinomial(weights[j], 1, generator=g) for j, g in enumerate(gens)])

    # -- backend ---------------------------------------------------------------------------------------------

    def _encode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _empty_cache(self, rows: int, dtype: torch.dtype):
        raise NotImplementedError

    def _step(self, prev: torch.Tensor, position: int, encoder_state, attention_mask, kv_cache):
        raise NotImplementedError

    def _detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def tokenizer_files(config: DalleConfig) -> tuple[str, str]:
    return f"vocab{config.suffix}.json", f"merges{config.suffix}.txt"


def read_tokenizer(folder: Path, config: DalleConfig) -> TextTokenizer:
    vocab, merges = tokenizer_files(config)
    for name in (vocab, merges):
        if not (folder / name).is_file():
            raise ModelNotFoundError(f"{folder}: missing {name}")
    return TextTokenizer.from_files(folder / vocab, folder / merges)


class DalleGenerator(DalleSampler):
    """The PyTorch model (min-dalle's architecture) behind the ``Generator`` protocol."""

    def __init__(self, folder: str | Path, name: str | None = None, device: str = "cpu", allow_pickle: bool = False,
                 batch_size: int = 8, temperature: float | None = None, top_k: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"{folder}: no such folder")
        self.config = read_config(folder)
        self.temperature = self.config.temperature if temperature is None else float(temperature)
        self.top_k = self.config.top_k if top_k is None else int(top_k)
        c = self.config
        self.tokenizer = read_tokenizer(folder, c)
        self.encoder, self.decoder, self.detokenizer = build_modules(c)
        stems = weight_stems(c)
        for key, module in (("encoder", self.encoder), ("decoder", self.decoder), ("detokenizer", self.detokenizer)):
            _load_into(module, _load_state(folder, stems[key], allow_pickle), folder / stems[key])
            module.to(device).eval()
        self.name = name or folder.name
        self.device = device
        self.batch_size = batch_size
        self.resolution = c.grid * PATCH
        self._path = folder
        self._hash = model_hash(folder)

    def _encode_rows(self, rows):
        return self.encoder(rows.to(self.device))

    def _empty_cache(self, rows, dtype):
        return self.decoder.empty_cache(rows, dtype)

    def _step(self, prev, position, encoder_state, attention_mask, kv_cache):
        return self.decoder(prev.to(self.device), torch.tensor(position, device=self.device), encoder_state,
                            attention_mask, kv_cache)

    def _detokenize(self, tokens):
        return self.detokenizer(tokens.to(self.device))


def main(argv: list[str] | None = None) -> int:
    """``python -m audit.targets.dalle SRC OUT``: convert min-dalle .pt checkpoints to a safetensors folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m audit.targets.dalle SRC_DIR OUT_DIR  (converts min-dalle .pt weights to "
              "safetensors; SRC_DIR from `hf download kuprel/min-dalle ...`)", file=sys.stderr)
        return 2
    from ..errors import AuditError

    try:
        out = convert_to_safetensors(args[0], args[1])
    except AuditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {out}; use it with --target {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
