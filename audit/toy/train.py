"""Trainers for the toy world's models, and the measurements the README reports about them.

The recipe is one measured to make membership real on a tiny latent diffusion model: train the VAE on
public images, pre-train text encoder + UNet on public captioned images, then fine-tune both on the members
long enough that the undescribed detail of each member (stripe phase, colour jitter) is reproduced from its
caption.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _normalise(images: np.ndarray, mean, std, device) -> torch.Tensor:
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _batches(n: int, batch: int, steps: int, gen: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch, n),), generator=gen)


def _optim(params, lr: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


def _step(loss, opt, sched, params):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, seed: int, device) -> float:
    """Reconstruction + a small KL term; then set ``scaling_factor`` so latents have unit variance."""
    vae.to(device).train()
    x_all = to_tensor(images, device)
    gen = torch.Generator().manual_seed(seed)
    params = list(vae.parameters())
    opt, sched = _optim(params, lr, steps)
    loss = torch.zeros(())
    for i, idx in enumerate(_batches(len(x_all), batch, steps, gen)):
        x = x_all[idx.to(device)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=None)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        _step(loss, opt, sched, params)
        if i % 200 == 0:
            log.info("vae step %d/%d loss %.4f", i, steps, loss.item())
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std().item()))
    return float(loss.item())


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, so training samples latents without re-running the encoder."""
    vae.to(device).eval()
    x_all = to_tensor(images, device)
    means, stds = [], []
    for i in range(0, len(x_all), 256):
        dist = vae.encode(x_all[i : i + 256]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    # Pad to model_max_length exactly as StableDiffusionPipeline.encode_prompt does at inference.
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def train_denoiser(pipe, latents, captions: list[str], steps: int, batch: int, lr: float, seed: int, device,
                   caption_dropout: float = 0.0, phase: str = "unet", t_min: int = 0) -> float:
    """Epsilon-prediction loss on text encoder + UNet together, timesteps drawn from [t_min, T).

    A ``t_min`` > 0 trains only the noisier steps, where the image is mostly gone and the caption has to say which
    one it was: what makes a small target memorise its members by caption in few steps (the quick build)."""
    mean, std = latents
    unet, text_encoder, sched_noise = pipe.unet.to(device), pipe.text_encoder.to(device), pipe.scheduler
    unet.train()
    text_encoder.train()
    ids_all = tokenize(pipe.tokenizer, captions, device)
    empty = tokenize(pipe.tokenizer, [""], device)
    scale = pipe.vae.config.scaling_factor
    alphas = sched_noise.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator(device=device).manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt, sched = _optim(params, lr, steps)
    loss = torch.zeros(())
    for i, idx in enumerate(_batches(len(mean), batch, steps, gen)):
        idx = idx.to(device)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=dgen, device=device)) * scale
        ids = ids_all[idx]
        if caption_dropout > 0:
            drop = torch.rand(len(idx), generator=dgen, device=device) < caption_dropout
            ids = torch.where(drop[:, None], empty.expand_as(ids), ids)
        noise = torch.randn(z0.shape, generator=dgen, device=device)
        t = torch.randint(t_min, len(alphas), (len(idx),), generator=dgen, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        _step(loss, opt, sched, params)
        if i % 250 == 0:
            log.info("%s step %d/%d loss %.4f", phase, i, steps, loss.item())
    unet.eval()
    text_encoder.eval()
    return float(loss.item())


def train_clip(model, processor, images: np.ndarray, captions: list[str], steps: int, batch: int, lr: float,
               seed: int, device) -> float:
    model.to(device).train()
    ip = processor.image_processor
    px_all = _normalise(images, ip.image_mean, ip.image_std, device)
    tok = processor.tokenizer(captions, padding=True, return_tensors="pt")
    ids_all, mask_all = tok.input_ids.to(device), tok.attention_mask.to(device)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    opt, sched = _optim(params, lr, steps)
    loss = torch.zeros(())
    for i, idx in enumerate(_batches(len(px_all), batch, steps, gen)):
        idx = idx.to(device)
        # Identical captions in a batch would be false negatives; the caption space makes them rare.
        out = model(input_ids=ids_all[idx], attention_mask=mask_all[idx], pixel_values=px_all[idx], return_loss=True)
        loss = out.loss
        _step(loss, opt, sched, params)
        if i % 250 == 0:
            log.info("clip step %d/%d loss %.4f", i, steps, loss.item())
    model.eval()
    return float(loss.item())


def _blip_labels(processor, captions: list[str], device):
    tok = processor.tokenizer(captions, padding=True, return_tensors="pt")
    ids = tok.input_ids.clone()
    ids[:, 0] = processor.tokenizer.bos_token_id  # BLIP decodes from [DEC], not [CLS]
    labels = ids.masked_fill(tok.attention_mask == 0, -100)
    return ids.to(device), tok.attention_mask.to(device), labels.to(device)


def train_blip(model, processor, images: np.ndarray, captions: list[str], steps: int, batch: int, lr: float,
               seed: int, device) -> float:
    model.to(device).train()
    ip = processor.image_processor
    px_all = _normalise(images, ip.image_mean, ip.image_std, device)
    ids_all, mask_all, labels_all = _blip_labels(processor, captions, device)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    opt, sched = _optim(params, lr, steps)
    loss = torch.zeros(())
    for i, idx in enumerate(_batches(len(px_all), batch, steps, gen)):
        idx = idx.to(device)
        out = model(pixel_values=px_all[idx], input_ids=ids_all[idx], attention_mask=mask_all[idx],
                    labels=labels_all[idx])
        loss = out.loss
        _step(loss, opt, sched, params)
        if i % 250 == 0:
            log.info("blip step %d/%d loss %.4f", i, steps, loss.item())
    model.eval()
    return float(loss.item())


# ---------------------------------------------------------------- measurements


@torch.no_grad()
def generate(pipe, captions: list[str], seed: int, steps: int, device, batch: int = 128) -> np.ndarray:
    """One image per caption, seeded per row (row i always gets seed + i, whatever the batch)."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for s in range(0, len(captions), batch):
        chunk = captions[s : s + batch]
        gens = [torch.Generator(device=device).manual_seed(seed + s + j) for j in range(len(chunk))]
        imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=1.0, generator=gens, output_type="np",
                    height=res, width=res).images
        out.append(np.clip(np.round(imgs * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def membership_gap(pipe, members, nonmembers, seed: int, steps: int, device) -> dict:
    """Pixel MSE between each real image and one image generated from its caption; AUC of that single score."""
    from sklearn.metrics import roc_auc_score

    def mse(images, captions):
        gen = generate(pipe, captions, seed, steps, device)
        return ((gen.astype(np.float32) - images.astype(np.float32)) / 255.0).__pow__(2).mean(axis=(1, 2, 3))

    m, n = mse(*members), mse(*nonmembers)
    labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
    return {
        "member_mse_mean": float(m.mean()),
        "nonmember_mse_mean": float(n.mean()),
        "auc": float(roc_auc_score(labels, -np.r_[m, n])),
        "n_members": len(m),
        "n_nonmembers": len(n),
        "denoising_steps": steps,
    }


@torch.no_grad()
def clip_retrieval_top1(model, processor, images: np.ndarray, captions: list[str], device) -> float:
    """Text -> image retrieval top-1 among the given held-out images."""
    model.to(device).eval()
    ip = processor.image_processor
    px = _normalise(images, ip.image_mean, ip.image_std, device)
    tok = processor.tokenizer(captions, padding=True, return_tensors="pt").to(device)
    img = model.get_image_features(pixel_values=px)
    txt = model.get_text_features(**tok)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    sim = F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).T
    return float((sim.argmax(dim=1).cpu() == torch.arange(len(captions))).float().mean())


@torch.no_grad()
def blip_token_accuracy(model, processor, images: np.ndarray, captions: list[str], device) -> float:
    """Teacher-forced next-token accuracy on held-out captions (padding excluded)."""
    model.to(device).eval()
    ip = processor.image_processor
    px = _normalise(images, ip.image_mean, ip.image_std, device)
    ids, mask, labels = _blip_labels(processor, captions, device)
    logits = model(pixel_values=px, input_ids=ids, attention_mask=mask).logits
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    valid = target != -100
    return float((pred[valid] == target[valid]).float().mean())


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)
