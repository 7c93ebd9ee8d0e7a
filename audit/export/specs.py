"""Export specs, one small class per graph, in the style of optimum's ``OnnxConfig``.

A spec names the graph's inputs and outputs with their dynamic axes, builds the ``nn.Module`` that is exported
(a thin wrapper fixing what the runtime needs: normalised CLIP features, a decoder step with an explicit KV cache),
gives example inputs for tracing and validation inputs of other sizes (so the dynamic axes are exercised), and the
tolerance the graph must meet against PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Axes = dict[int, str]


def _features(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor.
    return getattr(out, "pooler_output", out)


class ExportSpec:
    """One ONNX graph. Subclasses set ``name``, ``inputs``/``outputs`` (ordered: name -> dynamic axes) and
    tolerances."""

    name: str = ""
    inputs: dict[str, Axes] = {}
    outputs: dict[str, Axes] = {}
    atol: float = 1e-4
    rtol: float = 1e-3
    max_batch = 4096

    def __init__(self, model: nn.Module):
        self.model = model

    def module(self) -> nn.Module:
        """The module whose ``forward(*inputs)`` (positional, in ``inputs`` order) is exported."""
        raise NotImplementedError

    def example_inputs(self, batch: int = 2, **kw: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def validation_inputs(self) -> list[dict[str, torch.Tensor]]:
        """Batches of sizes other than the example's (1 and 3), so the dynamic batch axis is checked."""
        return [self.example_inputs(1), self.example_inputs(3)]

    def dim_bounds(self) -> dict[str, tuple[int, int]]:
        """(min, max) of each named dynamic dimension."""
        return {"batch": (1, self.max_batch)}

    def tolerance(self, precision: str) -> dict[str, float]:
        if precision == "fp16":
            return {"atol": max(self.atol, 1e-2), "rtol": max(self.rtol, 1e-2)}
        return {"atol": self.atol, "rtol": self.rtol}


class _Seeded:
    """Deterministic example tensors (export and validation must not depend on global RNG state)."""

    def __init__(self, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.g)


# --- diffusion target ----------------------------------------------------------------------------------------------

class _TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        # StableDiffusionPipeline.encode_prompt without clip_skip: the last hidden state, no attention mask.
        return self.text_encoder(input_ids)[0]


class TextEncoderSpec(ExportSpec):
    name = "text_encoder"
    inputs = {"input_ids": {0: "batch"}}
    outputs = {"last_hidden_state": {0: "batch"}}

    def __init__(self, text_encoder, max_length: int, vocab_size: int):
        super().__init__(text_encoder)
        self.max_length, self.vocab_size = max_length, vocab_size

    def module(self):
        return _TextEncoder(self.model)

    def example_inputs(self, batch=2, seed=0):
        return {"input_ids": _Seeded(seed + batch).randint(0, self.vocab_size, batch, self.max_length)}


def _geglu_as_two_gemms(self, hidden_states, *args, **kwargs):
    """diffusers' GEGLU (one Linear to 2n, chunk, value * gelu(gate)) as two 2-D Linears: onnxruntime then runs
    each as one Gemm with its bias, where the 3-D MatMul + Add + Split took 9% of the toy UNet step."""
    w, b = self.proj.weight, self.proj.bias
    n = w.shape[0] // 2
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    value = F.linear(flat, w[:n], None if b is None else b[:n])
    gate = F.linear(flat, w[n:], None if b is None else b[n:])
    return (value * F.gelu(gate)).reshape(*hidden_states.shape[:-1], n)


# --- attention as one fused op ------------------------------------------------------------------------------------
#
# Exported as MatMul -> Softmax -> MatMul, an attention holds its whole [batch, heads, queries, keys] score matrix
# (and the softmax of it) in memory: at SD's 64x64 latents 4096 x 4096 per head, 2.1 GB per matrix at batch 4,
# where PyTorch's fused scaled_dot_product_attention never materialises it. The export form of each plain
# attention is therefore one ``com.microsoft.MultiHeadAttention`` node: onnxruntime's CPU kernel for it (float, no
# mask, no past) is a tiled flash attention sized to the L2 cache (contrib_ops/cpu/bert/multihead_attention.cc),
# and its CUDA kernel picks flash / memory-efficient attention too. Measured at one 64x64 self-attention of SD
# (batch 1, 8 heads of 40, 2 threads): 650 vs 909 ms and 0.3 vs 1.4 GB peak RSS. onnxruntime's standard ONNX
# ``Attention`` (opset 23) still materialises the matrix on the CPU in 1.32 (910 ms, 1.35 GB).

@torch.library.custom_op("audit::fused_attention", mutates_args=())
def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
                    scale: float) -> torch.Tensor:
    """Multi-head attention over [B, S, D] projections (no mask): [B, S_q, D_v]."""
    b, s, _ = query.shape
    q, k, v = (x.view(b, x.shape[1], heads, -1).transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, s, value.shape[-1])


@fused_attention.register_fake
def _(query, key, value, heads, scale):
    return query.new_empty(query.shape[0], query.shape[1], value.shape[-1])


@functools.cache
def _multi_head_attention_op():
    """onnxruntime's contrib op as onnxscript calls it. The onnx package holds no schema for contrib ops, so the
    part of ``com.microsoft.MultiHeadAttention``'s schema used here (query, key, value in; output out) is stated."""
    import onnx
    import onnxscript

    schema = onnx.defs.OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[onnx.defs.OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")],
        outputs=[onnx.defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[onnx.defs.OpSchema.Attribute("num_heads", onnx.defs.OpSchema.AttrType.INT, "heads"),
                    onnx.defs.OpSchema.Attribute("scale", onnx.defs.OpSchema.AttrType.FLOAT, "score scale")])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)


def _fused_attention_onnx(query, key, value, heads: int, scale: float):
    return _multi_head_attention_op()(query, key, value, num_heads=heads, scale=scale)


# What the exporter writes for audit's own ops (``torch.onnx.export(custom_translation_table=...)``).
ONNX_TRANSLATIONS = {torch.ops.audit.fused_attention.default: _fused_attention_onnx}


def _fusable(attn) -> bool:
    """A diffusers ``Attention`` that is plain scaled dot-product attention (what AttnProcessor/AttnProcessor2_0
    compute, with the default scale): its export form is one fused op. Others are exported as they are."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    head_dim = attn.to_q.out_features // attn.heads
    extras = (attn.spatial_norm, attn.norm_q, attn.norm_k, attn.norm_cross, getattr(attn, "add_k_proj", None))
    return (type(attn.processor) in (AttnProcessor, AttnProcessor2_0) and all(x is None for x in extras)
            and math.isclose(attn.scale, head_dim**-0.5, rel_tol=1e-6))


class _FusedAttention:
    """diffusers' AttnProcessor2_0 without the mask and norm options ``_fusable`` excludes, its core one op."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        if attention_mask is not None:
            raise ValueError("the fused attention export form takes no attention mask")
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        head_dim = attn.to_q.out_features // attn.heads
        out = fused_attention(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads,
                              head_dim**-0.5)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def _export_forms(model):
    """The model (a UNet or an autoencoder) with the export forms of its GEGLUs and plain attentions, for the
    duration of one forward. Attentions already given another processor (``_CrossKV``) keep it."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    gegl = [m for m in model.modules() if type(m) is GEGLU]
    attns = [m for m in model.modules() if isinstance(m, Attention) and _fusable(m)]
    saved = [m.processor for m in attns]
    for m in gegl:
        m.forward = types.MethodType(_geglu_as_two_gemms, m)
    for m in attns:
        m.processor = _FusedAttention()
    try:
        yield
    finally:
        for m in gegl:
            del m.forward
        for m, p in zip(attns, saved):
            m.processor = p


class _UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        with _export_forms(self.unet):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetSpec(ExportSpec):
    """Per-sample timestep vector, so one call can denoise a batch whatever each image's step."""

    name = "unet"
    inputs = {"sample": {0: "batch"}, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"}}
    outputs = {"noise_pred": {0: "batch"}}

    def __init__(self, unet, latent_size: int, text_length: int, text_dim: int, train_steps: int = 1000):
        super().__init__(unet)
        self.latent_size, self.text_length, self.text_dim = latent_size, text_length, text_dim
        self.train_steps = train_steps
        self.channels = int(unet.config.in_channels)

    def module(self):
        return _UNet(self.model)

    def example_inputs(self, batch=2, seed=0):
        r = _Seeded(seed + batch)
        s = self.latent_size
        return {"sample": r.randn(batch, self.channels, s, s), "timestep": r.randint(0, self.train_steps, batch),
                "encoder_hidden_states": r.randn(batch, self.text_length, self.text_dim)}


# --- the UNet with its cross-attention keys/values computed once per image, not once per step --------------------
#
# The text conditioning is the same at every denoising step, so each cross-attention's key and value projections
# (and their reshapes into heads) need not run again at each step: ``unet_context`` computes them once, already in
# the layout the step multiplies with (K^T scaled by 1/sqrt(head_dim), V by heads), and the ``unet`` step takes
# them as inputs. The toy UNet spends ~7% of each step there. TensorRT's Stable Diffusion pipelines do the same.

def cross_attentions(unet) -> list | None:
    """The UNet's cross-attention modules when all are plain scaled dot-product attention over projected text
    (Stable Diffusion and LDM UNets), else None: the UNet is then exported whole."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    mods = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    for m in mods:
        head_dim = m.to_k.out_features // m.heads
        extras = (m.norm_cross, m.group_norm, m.spatial_norm, m.norm_q, m.norm_k, getattr(m, "add_k_proj", None))
        if (any(x is not None for x in extras) or m.residual_connection or m.rescale_output_factor != 1.0
                or type(m.processor) not in (AttnProcessor, AttnProcessor2_0)
                or not math.isclose(m.scale, head_dim**-0.5, rel_tol=1e-6)):
            return None
    return mods or None


class _CrossKV:
    """An attention processor over given keys (K^T, pre-scaled) and values: diffusers' arithmetic otherwise."""

    def __init__(self, key_t: torch.Tensor, value: torch.Tensor):
        self.key_t, self.value = key_t, value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        b, t, _ = hidden_states.shape
        q = attn.to_q(hidden_states).view(b, t, attn.heads, -1).transpose(1, 2)
        h = torch.matmul(torch.softmax(torch.matmul(q, self.key_t), dim=-1), self.value)
        return attn.to_out[1](attn.to_out[0](h.transpose(1, 2).reshape(b, t, -1)))


class _UNetContext(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.mods = nn.ModuleList(cross_attentions(unet))

    def forward(self, encoder_hidden_states):
        b, n, _ = encoder_hidden_states.shape
        out = []
        for m in self.mods:
            k = m.to_k(encoder_hidden_states).view(b, n, m.heads, -1)
            v = m.to_v(encoder_hidden_states).view(b, n, m.heads, -1)
            out += [k.permute(0, 2, 3, 1) * m.scale, v.transpose(1, 2)]
        return tuple(out)


class _UNetStep(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.mods = cross_attentions(unet)  # a plain list: the modules are registered under self.unet

    def forward(self, sample, timestep, *cross):
        saved = [m.processor for m in self.mods]
        try:
            for i, m in enumerate(self.mods):
                m.processor = _CrossKV(cross[2 * i], cross[2 * i + 1])
            # The processors ignore encoder_hidden_states; the blocks only need a tensor of the right batch.
            unused = sample.new_zeros(sample.shape[0], 1, self.unet.config.cross_attention_dim)
            with _export_forms(self.unet):
                return self.unet(sample, timestep, encoder_hidden_states=unused, return_dict=False)[0]
        finally:
            for m, p in zip(self.mods, saved):
                m.processor = p


def _cross_names(unet) -> list[str]:
    return [f"cross_{kind}.{i}" for i in range(len(cross_attentions(unet))) for kind in ("key", "value")]


class UNetContextSpec(ExportSpec):
    name = "unet_context"

    def __init__(self, unet, text_length: int, text_dim: int):
        super().__init__(unet)
        self.text_length, self.text_dim = text_length, text_dim
        self.inputs = {"encoder_hidden_states": {0: "batch"}}
        self.outputs = {name: {0: "batch"} for name in _cross_names(unet)}

    def module(self):
        return _UNetContext(self.model)

    def example_inputs(self, batch=2, seed=0):
        return {"encoder_hidden_states": _Seeded(seed + batch).randn(batch, self.text_length, self.text_dim)}


class UNetStepSpec(UNetSpec):
    """The UNet over precomputed cross-attention keys/values (from ``unet_context``)."""

    def __init__(self, unet, latent_size: int, text_length: int, text_dim: int, train_steps: int = 1000):
        super().__init__(unet, latent_size, text_length, text_dim, train_steps)
        self.inputs = {"sample": {0: "batch"}, "timestep": {0: "batch"},
                       **{name: {0: "batch"} for name in _cross_names(unet)}}

    def module(self):
        return _UNetStep(self.model)

    def example_inputs(self, batch=2, seed=0):
        feeds = super().example_inputs(batch, seed)
        with torch.no_grad():  # the context graph's outputs for random text states, on the model's device/dtype
            cross = _UNetContext(self.model)(feeds.pop("encoder_hidden_states").to(next(self.model.parameters())))
        return {**feeds, **dict(zip(_cross_names(self.model), cross))}


class _VaeDecoder(nn.Module):
    def __init__(self, vae, reciprocal: bool):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.reciprocal = reciprocal

    def forward(self, latents):
        # As the pipelines do it (SD divides by the scaling factor, LDM multiplies by its reciprocal), then the
        # image processor's denormalise to [0, 1].
        latents = (1 / self.scale) * latents if self.reciprocal else latents / self.scale
        with _export_forms(self.vae):
            image = self.vae.decode(latents, return_dict=False)[0]
        return (image * 0.5 + 0.5).clamp(0, 1)


class VaeDecoderSpec(ExportSpec):
    name = "vae_decoder"
    inputs = {"latents": {0: "batch"}}
    outputs = {"images": {0: "batch"}}
    atol = 1e-3  # images in [0, 1]; a uint8 level is 4e-3

    def __init__(self, vae, latent_size: int, reciprocal: bool = False):
        super().__init__(vae)
        self.latent_size, self.reciprocal = latent_size, reciprocal
        self.channels = int(vae.config.latent_channels)

    def module(self):
        return _VaeDecoder(self.model, self.reciprocal)

    def example_inputs(self, batch=2, seed=0):
        return {"latents": _Seeded(seed + batch).randn(batch, self.channels, self.latent_size, self.latent_size)}


class VaeEncoderSpec(ExportSpec):
    """Images in [0, 1] -> latents (posterior mean x scaling factor): the gray-box attacks' image encoder."""

    name = "vae_encoder"
    inputs = {"images": {0: "batch"}}
    outputs = {"latents": {0: "batch"}}

    def __init__(self, vae, resolution: int):
        super().__init__(vae)
        self.resolution = resolution

    def module(self):
        from ..targets.denoiser import VaeEncoder

        return VaeEncoder(self.model)

    def example_inputs(self, batch=2, seed=0):
        r = self.resolution
        return {"images": torch.rand(batch, 3, r, r, generator=_Seeded(seed + batch).g)}


# --- CLIP embedder -------------------------------------------------------------------------------------------------

class _ClipImage(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        return F.normalize(_features(self.clip.get_image_features(pixel_values=pixel_values)), dim=-1)


class ClipImageSpec(ExportSpec):
    name = "image_encoder"
    inputs = {"pixel_values": {0: "batch"}}
    outputs = {"image_embeds": {0: "batch"}}

    def __init__(self, clip):
        super().__init__(clip)
        self.size = int(clip.config.vision_config.image_size)

    def module(self):
        return _ClipImage(self.model)

    def example_inputs(self, batch=2, seed=0):
        return {"pixel_values": _Seeded(seed + batch).randn(batch, 3, self.size, self.size)}


class _ClipText(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids, attention_mask):
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(_features(out), dim=-1)


class ClipTextSpec(ExportSpec):
    name = "text_encoder"
    inputs = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    outputs = {"text_embeds": {0: "batch"}}

    def __init__(self, clip, eos_token_id: int, pad_token_id: int):
        super().__init__(clip)
        self.max_length = int(clip.config.text_config.max_position_embeddings)
        self.vocab_size = int(clip.config.text_config.vocab_size)
        self.eos, self.pad = eos_token_id, pad_token_id

    def module(self):
        return _ClipText(self.model)

    def dim_bounds(self):
        return {"batch": (1, self.max_batch), "sequence": (2, self.max_length)}

    def example_inputs(self, batch=2, seed=0, length=None):
        # Padded batches as the tokenizer makes them: row i has (length - i) real tokens ending in EOS.
        length = length or min(7, self.max_length)
        r = _Seeded(seed + batch)
        ids = r.randint(0, self.vocab_size, batch, length)
        mask = torch.ones(batch, length, dtype=torch.int64)
        for i in range(batch):
            n = max(2, length - i)
            ids[i, n - 1] = self.eos
            ids[i, n:] = self.pad
            mask[i, n:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def validation_inputs(self):
        return [self.example_inputs(1, length=3), self.example_inputs(3, length=min(11, self.max_length))]


# --- BLIP captioner ------------------------------------------------------------------------------------------------

def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def _attend(q, k, v, head_dim: int) -> torch.Tensor:
    # The arithmetic of transformers' BlipTextSelfAttention (matmul, scale, softmax, matmul) in the same order.
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
    b, _, t, _ = ctx.shape
    return ctx.permute(0, 2, 1, 3).contiguous().view(b, t, -1)


class _BlipVision(nn.Module):
    """Vision encoder plus each decoder layer's cross-attention keys/values, computed once per image."""

    def __init__(self, blip):
        super().__init__()
        self.vision = blip.vision_model
        self.layers = blip.text_decoder.bert.encoder.layer
        self.n_heads = blip.config.text_config.num_attention_heads

    def forward(self, pixel_values):
        embeds = self.vision(pixel_values=pixel_values)[0]
        cross = []
        for layer in self.layers:
            att = layer.crossattention.self
            cross += [_heads(att.key(embeds), self.n_heads), _heads(att.value(embeds), self.n_heads)]
        return (embeds, *cross)


class BlipVisionSpec(ExportSpec):
    name = "vision_encoder"

    def __init__(self, blip):
        super().__init__(blip)
        self.size = int(blip.config.vision_config.image_size)
        n = blip.config.text_config.num_hidden_layers
        self.inputs = {"pixel_values": {0: "batch"}}
        self.outputs = {"image_embeds": {0: "batch"}}
        for i in range(n):
            self.outputs[f"cross_key.{i}"] = {0: "batch"}
            self.outputs[f"cross_value.{i}"] = {0: "batch"}

    def module(self):
        return _BlipVision(self.model)

    def example_inputs(self, batch=2, seed=0):
        return {"pixel_values": _Seeded(seed + batch).randn(batch, 3, self.size, self.size)}


class _BlipDecoderStep(nn.Module):
    """One greedy-decoding step of BLIP's text decoder for one new token per sequence, with a KV cache.

    Re-states ``BlipTextLMHeadModel.forward`` over its own submodules (same weights, same arithmetic) with the
    cache as explicit tensors, which exports cleanly where transformers' ``Cache`` objects do not. With one new
    token, the causal mask over the cache is all-visible, so no mask is needed.
    """

    def __init__(self, blip):
        super().__init__()
        decoder = blip.text_decoder
        self.embeddings = decoder.bert.embeddings
        self.layers = decoder.bert.encoder.layer
        self.head = decoder.cls
        cfg = blip.config.text_config
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def forward(self, input_ids, *caches):
        n = len(self.layers)
        past, cross = caches[: 2 * n], caches[2 * n :]
        start = past[0].shape[2]
        emb = self.embeddings
        positions = emb.position_ids[:, start : start + input_ids.shape[1]]
        h = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))
        present = []
        for i, layer in enumerate(self.layers):
            att = layer.attention.self
            q = _heads(att.query(h), self.n_heads)
            k = torch.cat([past[2 * i], _heads(att.key(h), self.n_heads)], dim=2)
            v = torch.cat([past[2 * i + 1], _heads(att.value(h), self.n_heads)], dim=2)
            present += [k, v]
            h = layer.attention.output(_attend(q, k, v, self.head_dim), h)
            xatt = layer.crossattention.self
            ctx = _attend(_heads(xatt.query(h), self.n_heads), cross[2 * i], cross[2 * i + 1], self.head_dim)
            h = layer.crossattention.output(ctx, h)
            h = layer.output(layer.intermediate(h), h)
        return (self.head(h)[:, -1, :], *present)


class BlipDecoderStepSpec(ExportSpec):
    name = "decoder_step"
    atol = 1e-3  # logits; what must hold exactly is the greedy tokens, checked against generate()

    def __init__(self, blip):
        super().__init__(blip)
        cfg = blip.config.text_config
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.n_heads
        self.vocab_size = int(cfg.vocab_size)
        self.max_positions = int(cfg.max_position_embeddings)
        vc = blip.config.vision_config
        self.image_tokens = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1
        self.inputs = {"input_ids": {0: "batch"}}
        for i in range(self.n_layers):
            self.inputs[f"past_key.{i}"] = {0: "batch", 2: "past"}
            self.inputs[f"past_value.{i}"] = {0: "batch", 2: "past"}
        for i in range(self.n_layers):
            self.inputs[f"cross_key.{i}"] = {0: "batch"}
            self.inputs[f"cross_value.{i}"] = {0: "batch"}
        self.outputs = {"logits": {0: "batch"}}
        for i in range(self.n_layers):
            self.outputs[f"present_key.{i}"] = {0: "batch", 2: "past+1"}
            self.outputs[f"present_value.{i}"] = {0: "batch", 2: "past+1"}

    def module(self):
        return _BlipDecoderStep(self.model)

    def dim_bounds(self):
        # The graph also runs with an empty cache (past = 0) for the first token; tracing needs an example >= 2.
        return {"batch": (1, self.max_batch), "past": (0, self.max_positions - 1)}

    def example_inputs(self, batch=2, seed=0, past=3):
        r = _Seeded(seed + batch + past)
        feeds = {"input_ids": r.randint(0, self.vocab_size, batch, 1)}
        for i in range(self.n_layers):
            feeds[f"past_key.{i}"] = r.randn(batch, self.n_heads, past, self.head_dim)
            feeds[f"past_value.{i}"] = r.randn(batch, self.n_heads, past, self.head_dim)
        for i in range(self.n_layers):
            feeds[f"cross_key.{i}"] = r.randn(batch, self.n_heads, self.image_tokens, self.head_dim)
            feeds[f"cross_value.{i}"] = r.randn(batch, self.n_heads, self.image_tokens, self.head_dim)
        return feeds

    def validation_inputs(self):
        return [self.example_inputs(1, past=0), self.example_inputs(3, past=5)]


# --- DALL-E target -------------------------------------------------------------------------------------------------
# The port in audit.targets.dalle was written for this: the decoder step takes and returns its KV cache as one tensor.

class _DalleSpec(ExportSpec):
    """One of the port's modules, exported as it is; ``config`` (a ``DalleConfig``) sizes the example inputs."""

    def __init__(self, model: nn.Module, config):
        super().__init__(model)
        self.config = config

    def module(self):
        return self.model


class DalleEncoderSpec(_DalleSpec):
    name = "encoder"
    inputs = {"text_tokens": {0: "batch"}}
    outputs = {"encoder_state": {0: "batch"}}

    def example_inputs(self, batch=2, seed=0):
        c = self.config
        tokens = _Seeded(seed + batch).randint(3, c.text_vocab_count, batch, c.text_token_count)
        tokens[:, c.text_token_count // 2 :] = 1  # padded tail, as real captions have: the mask path is exercised
        return {"text_tokens": tokens}


class DalleDecoderStepSpec(_DalleSpec):
    """One sampling step: previous token and position in, logits and the updated KV cache out."""

    name = "decoder_step"
    inputs = {"prev_tokens": {0: "batch"}, "position": {}, "encoder_state": {0: "batch"},
              "attention_mask": {0: "batch"}, "kv_cache": {2: "batch"}}
    outputs = {"logits": {0: "batch"}, "kv_cache_out": {2: "batch"}}
    atol = 1e-3  # logits; what must hold is the sampled tokens, checked end to end against the torch path

    def example_inputs(self, batch=2, seed=0, position=1):
        c = self.config
        r = _Seeded(seed + batch + position)
        mask = torch.ones(batch, 1, 1, c.text_token_count, dtype=torch.bool)
        mask[:, ..., c.text_token_count // 2 :] = False
        return {"prev_tokens": r.randint(0, c.image_vocab_count + 1, batch),
                "position": torch.tensor(position, dtype=torch.long),
                "encoder_state": r.randn(batch, c.text_token_count, c.embed_count),
                "attention_mask": mask,
                "kv_cache": r.randn(c.layer_count, 2, batch, c.image_token_count, c.embed_count)}

    def validation_inputs(self):
        return [self.example_inputs(1, position=0), self.example_inputs(3, position=self.config.image_token_count - 1)]


class DalleDetokenizerSpec(_DalleSpec):
    name = "detokenizer"
    inputs = {"tokens": {0: "batch"}}
    outputs = {"pixels": {0: "batch"}}
    atol = 1e-2  # pixels in [0, 255]; rounded to uint8 afterwards

    def example_inputs(self, batch=2, seed=0):
        return {"tokens": _Seeded(seed + batch).randint(0, self.model.vocab_count, batch,
                                                        self.config.image_token_count)}
