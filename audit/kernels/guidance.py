"""Classifier-free-guidance combine fused with the DDIM update (eta = 0), the per-step work outside the UNet.

The math is diffusers' ``DDIMScheduler.step`` with the guidance combine of ``StableDiffusionPipeline`` in front,
in the same operation order, so the numpy path reproduces the torch path bit for bit on the CPU:

    eps = u + g * (c - u)                                  (only with guidance; u, c: the two halves of the batch)
    epsilon:      x0 = (x - sqrt(1-a) * eps) / sqrt(a)
    v_prediction: x0 = sqrt(a) * x - sqrt(1-a) * eps;  eps = sqrt(a) * eps + sqrt(1-a) * x
    sample:       x0 = eps;  eps = (x - sqrt(a) * x0) / sqrt(1-a)
    x0 = clip(x0, -r, r)                                   (only with clip_sample)
    x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps

Implementations: ``reference`` (torch), ``numpy`` (the CPU default: the benchmark found the fused ONNX graph no
faster on latent-sized arrays, see benchmarks/README.md), ``onnx`` (one fused graph), ``triton`` (one fused GPU
kernel).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..errors import UsageError
from ._impls import OnnxKernel, check_impl, make_model, require_triton, scalar, triton_device

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_PRED_CODE = {p: i for i, p in enumerate(PREDICTION_TYPES)}


@dataclasses.dataclass(frozen=True)
class DdimCoefficients:
    """Per-step scalars of the DDIM update, float32 like diffusers' 0-d tensors."""

    sqrt_alpha: np.float32  # alpha_prod_t ** 0.5
    sqrt_beta: np.float32  # (1 - alpha_prod_t) ** 0.5
    sqrt_alpha_prev: np.float32  # alpha_prod_t_prev ** 0.5
    direction: np.float32  # (1 - alpha_prod_t_prev) ** 0.5

    def as_array(self) -> np.ndarray:
        return np.array([self.sqrt_alpha, self.sqrt_beta, self.sqrt_alpha_prev, self.direction], np.float32)


def _check(noise_pred: np.ndarray, latents: np.ndarray, guidance: float | None, prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"unknown prediction_type {prediction_type!r}; valid are {', '.join(PREDICTION_TYPES)}")
    factor = 2 if guidance is not None else 1
    if noise_pred.shape[0] != factor * latents.shape[0] or noise_pred.shape[1:] != latents.shape[1:]:
        raise UsageError(f"noise_pred {tuple(noise_pred.shape)} does not fit latents {tuple(latents.shape)}"
                         f"{' with guidance (2x batch)' if guidance is not None else ''}")


def cfg_ddim_step(noise_pred, latents, coeffs: DdimCoefficients, guidance: float | None = None,
                  prediction_type: str = "epsilon", clip_range: float | None = None, impl: str = "numpy"):
    """One guided DDIM step. ``noise_pred`` is [2B, ...] (uncond half first) with guidance, else [B, ...]."""
    check_impl(impl)
    _check(noise_pred, latents, guidance, prediction_type)
    if impl == "numpy":
        return _step_numpy(noise_pred, latents, coeffs, guidance, prediction_type, clip_range)
    if impl == "reference":
        return _step_torch(noise_pred, latents, coeffs, guidance, prediction_type, clip_range)
    if impl == "onnx":
        kernel = _onnx_kernel(guidance is not None, prediction_type, clip_range is not None)
        feeds = {"noise_pred": np.ascontiguousarray(noise_pred, np.float32),
                 "latents": np.ascontiguousarray(latents, np.float32), "coeffs": coeffs.as_array()}
        if guidance is not None:
            feeds["guidance"] = scalar(guidance)
        if clip_range is not None:
            feeds["clip_range"] = scalar(clip_range)
        return kernel(**feeds)[0]
    return _step_triton(noise_pred, latents, coeffs, guidance, prediction_type, clip_range)


def _combine_and_step(xp, noise_pred, x, c: DdimCoefficients, guidance, prediction_type, clip_range, clamp):
    """The shared formula over an array module ``xp`` (numpy or torch); order of operations as in diffusers."""
    if guidance is not None:
        half = noise_pred.shape[0] // 2
        uncond, text = noise_pred[:half], noise_pred[half:]
        e = uncond + guidance * (text - uncond)
    else:
        e = noise_pred
    if prediction_type == "epsilon":
        x0 = (x - c.sqrt_beta * e) / c.sqrt_alpha
        eps = e
    elif prediction_type == "v_prediction":
        x0 = c.sqrt_alpha * x - c.sqrt_beta * e
        eps = c.sqrt_alpha * e + c.sqrt_beta * x
    else:
        x0 = e
        eps = (x - c.sqrt_alpha * x0) / c.sqrt_beta
    if clip_range is not None:
        x0 = clamp(x0, -clip_range, clip_range)
    return c.sqrt_alpha_prev * x0 + c.direction * eps


def _step_numpy(noise_pred, latents, coeffs, guidance, prediction_type, clip_range):
    f32 = functools.partial(np.asarray, dtype=np.float32)
    c = DdimCoefficients(*(np.float32(v) for v in coeffs.as_array()))
    g = np.float32(guidance) if guidance is not None else None
    r = np.float32(clip_range) if clip_range is not None else None
    return _combine_and_step(np, f32(noise_pred), f32(latents), c, g, prediction_type, r, np.clip).astype(np.float32)


def _step_torch(noise_pred, latents, coeffs, guidance, prediction_type, clip_range):
    import torch

    as_t = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    c = DdimCoefficients(*(torch.tensor(v, dtype=torch.float32) for v in coeffs.as_array()))
    out = _combine_and_step(torch, as_t(noise_pred), as_t(latents), c, guidance, prediction_type, clip_range,
                            torch.clamp)
    return out if isinstance(latents, torch.Tensor) else out.numpy()


@functools.lru_cache(maxsize=None)
def _onnx_kernel(cfg: bool, prediction_type: str, clip: bool) -> OnnxKernel:
    return OnnxKernel(lambda: _build_graph(cfg, prediction_type, clip))


def _build_graph(cfg: bool, prediction_type: str, clip: bool):
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("noise_pred", f, None), helper.make_tensor_value_info("latents", f, None),
              helper.make_tensor_value_info("coeffs", f, [4])]
    # Gather with 0-d indices yields 0-d scalars, which broadcast over the latents' shape.
    names = ("sa", "sb", "sap", "dir")
    initializers = [helper.make_tensor(f"i_{n}", TensorProto.INT64, [], [i]) for i, n in enumerate(names)]
    nodes = [helper.make_node("Gather", ["coeffs", f"i_{n}"], [n], axis=0) for n in names]
    if cfg:
        inputs.append(helper.make_tensor_value_info("guidance", f, []))
        nodes += [
            helper.make_node("Split", ["noise_pred"], ["uncond", "text"], axis=0, num_outputs=2),
            helper.make_node("Sub", ["text", "uncond"], ["diff"]),
            helper.make_node("Mul", ["guidance", "diff"], ["gdiff"]),
            helper.make_node("Add", ["uncond", "gdiff"], ["e"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["noise_pred"], ["e"]))
    if prediction_type == "epsilon":
        nodes += [helper.make_node("Mul", ["sb", "e"], ["sb_e"]), helper.make_node("Sub", ["latents", "sb_e"], ["num"]),
                  helper.make_node("Div", ["num", "sa"], ["x0"]), helper.make_node("Identity", ["e"], ["eps"])]
    elif prediction_type == "v_prediction":
        nodes += [helper.make_node("Mul", ["sa", "latents"], ["sa_x"]), helper.make_node("Mul", ["sb", "e"], ["sb_e"]),
                  helper.make_node("Sub", ["sa_x", "sb_e"], ["x0"]), helper.make_node("Mul", ["sa", "e"], ["sa_e"]),
                  helper.make_node("Mul", ["sb", "latents"], ["sb_x"]), helper.make_node("Add", ["sa_e", "sb_x"], ["eps"])]
    else:
        nodes += [helper.make_node("Identity", ["e"], ["x0"]), helper.make_node("Mul", ["sa", "x0"], ["sa_x0"]),
                  helper.make_node("Sub", ["latents", "sa_x0"], ["num"]), helper.make_node("Div", ["num", "sb"], ["eps"])]
    x0 = "x0"
    if clip:
        inputs.append(helper.make_tensor_value_info("clip_range", f, []))
        nodes += [helper.make_node("Neg", ["clip_range"], ["neg_range"]),
                  helper.make_node("Clip", ["x0", "neg_range", "clip_range"], ["x0c"])]
        x0 = "x0c"
    nodes += [helper.make_node("Mul", ["sap", x0], ["sap_x0"]), helper.make_node("Mul", ["dir", "eps"], ["dir_eps"]),
              helper.make_node("Add", ["sap_x0", "dir_eps"], ["prev"])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("prev", f, None)], initializers,
                      name="cfg_ddim_step")


# --- Triton ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def cfg_ddim_kernel(np_ptr, x_ptr, out_ptr, n, g, sa, sb, sap, dr, r,
                        CFG: tl.constexpr, PRED: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        if CFG:
            u = tl.load(np_ptr + offs, mask=mask)
            c = tl.load(np_ptr + n + offs, mask=mask)
            e = u + g * (c - u)
        else:
            e = tl.load(np_ptr + offs, mask=mask)
        if PRED == 0:
            x0 = (x - sb * e) / sa
            eps = e
        elif PRED == 1:
            x0 = sa * x - sb * e
            eps = sa * e + sb * x
        else:
            x0 = e
            eps = (x - sa * x0) / sb
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -r), r)
        tl.store(out_ptr + offs, sap * x0 + dr * eps, mask=mask)

    return cfg_ddim_kernel


def _step_triton(noise_pred, latents, coeffs, guidance, prediction_type, clip_range):
    import torch
    import triton

    require_triton()
    numpy_in = not isinstance(latents, torch.Tensor)
    dev = triton_device()
    to_t = lambda a: (torch.from_numpy(np.ascontiguousarray(a, np.float32)) if numpy_in else a).to(dev).contiguous()  # noqa: E731
    n_pred, x = to_t(noise_pred), to_t(latents)
    out = torch.empty_like(x)
    n = x.numel()
    block = 1024
    c = coeffs.as_array()
    _triton_kernel()[(triton.cdiv(n, block),)](
        n_pred, x, out, n, float(guidance or 0.0), float(c[0]), float(c[1]), float(c[2]), float(c[3]),
        float(clip_range or 0.0), CFG=guidance is not None, PRED=_PRED_CODE[prediction_type], CLIP=clip_range is not None,
        BLOCK=block)
    return out.cpu().numpy() if numpy_in else out
