"""Every accelerated kernel equals its reference torch implementation; the reference equals what it replaces."""

import os

import numpy as np
import pytest

from audit.errors import InputError, UsageError
from audit.kernels import DdimCoefficients, ImageTransform, cfg_ddim_step, cosine_matrix, preprocess_images, sqdist_matrix
from audit.kernels import _impls, distances, guidance, preprocess

ACCELERATED = ("numpy", "onnx", "triton")


@pytest.fixture(scope="module", autouse=True)
def triton_on_cpu():
    """Triton kernels run on CPU tensors in the interpreter; kernels built here must not leak to other modules."""
    caches = (_impls.triton_status, guidance._triton_kernel, preprocess._triton_kernel, distances._triton_kernel)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for c in caches:
        c.cache_clear()
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old
    for c in caches:
        c.cache_clear()


COEFFS = DdimCoefficients(*np.float32([0.8, 0.6, 0.9, 0.43588989]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("guidance_scale", [None, 7.5])
@pytest.mark.parametrize("clip_range", [None, 1.0])
def test_cfg_ddim_step_impls_equal_reference(prediction_type, guidance_scale, clip_range):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    e = rng.standard_normal((6 if guidance_scale else 3, 4, 8, 8)).astype(np.float32) * 3
    ref = cfg_ddim_step(e, x, COEFFS, guidance_scale, prediction_type, clip_range, impl="reference")
    for impl in ACCELERATED:
        out = cfg_ddim_step(e, x, COEFFS, guidance_scale, prediction_type, clip_range, impl=impl)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=impl)
    if clip_range is not None and prediction_type != "sample":
        unclipped = cfg_ddim_step(e, x, COEFFS, guidance_scale, prediction_type, None, impl="reference")
        assert not np.allclose(unclipped, ref)  # the clip did something, so the comparison covered it


def test_cfg_ddim_step_reference_is_diffusers_guidance_then_ddim_step():
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    t = int(sched.timesteps[3])
    prev = t - 100
    a, ap = sched.alphas_cumprod[t], sched.alphas_cumprod[prev]
    coeffs = DdimCoefficients(np.float32(a**0.5), np.float32((1 - a) ** 0.5), np.float32(ap**0.5),
                              np.float32((1 - ap) ** 0.5))
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    uncond, text = e.chunk(2)
    expected = sched.step(uncond + 5.0 * (text - uncond), t, x).prev_sample.numpy()
    np.testing.assert_array_equal(cfg_ddim_step(e.numpy(), x.numpy(), coeffs, 5.0, impl="numpy"), expected)


def test_cfg_ddim_step_rejects_mismatched_batch():
    x = np.zeros((2, 4, 8, 8), np.float32)
    with pytest.raises(UsageError, match="2x batch"):
        cfg_ddim_step(np.zeros((2, 4, 8, 8), np.float32), x, COEFFS, guidance=3.0)


def _smooth_images(rng, n, h, w):
    """Images with structure as well as noise, so resizing has edges and overshoot to get right."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = (np.sin(xx / 3.0)[None, :, :, None] * 100 + yy[None, :, :, None] * 2 + 60)
    noise = rng.integers(0, 60, (n, h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def processors(tiny_world):
    from transformers import BlipProcessor, CLIPProcessor

    return {"clip": CLIPProcessor.from_pretrained(tiny_world["clip"]),
            "blip": BlipProcessor.from_pretrained(tiny_world["blip"])}


@pytest.mark.parametrize("which", ["clip", "blip"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 48, 40), (2, 20, 30)])
def test_preprocess_matches_hf_processor_and_impls_agree(tiny_world, processors, which, shape):
    rng = np.random.default_rng(1)
    images = _smooth_images(rng, *shape)
    transform = ImageTransform.from_folder(tiny_world[which])
    ref = preprocess_images(images, transform, impl="reference")
    hf = processors[which].image_processor(images=list(images), return_tensors="np").pixel_values
    np.testing.assert_array_equal(ref, hf)  # the processors' own uint8 resize kernel: exact
    level = 1 / (255 * min(transform.std))
    for impl in ACCELERATED:
        out = preprocess_images(images, transform, impl=impl)
        if shape[1:] == (32, 32) or impl == "numpy":
            np.testing.assert_array_equal(out, ref, err_msg=impl)
            continue
        # The float resize (ONNX graph, Triton path) rounds like the fixed-point kernel but for rare ties.
        diff = np.abs(out - ref)
        assert diff.max() <= level + 1e-4, impl
        assert (diff > 1e-4).mean() < 0.01, impl


def test_image_transform_round_trips_and_reads_shortest_edge(tiny_world):
    t = ImageTransform.from_folder(tiny_world["clip"])
    assert t.resize == "shortest_edge" and t.crop == (32, 32)
    assert ImageTransform.from_json(t.to_json()) == t
    assert t.output_size(48, 40) == (38, 32)  # the short side becomes 32, the long one int(32 * 48 / 40)


def test_preprocess_rejects_non_uint8_images(tiny_world):
    with pytest.raises(InputError, match="uint8"):
        preprocess_images(np.zeros((1, 32, 32, 3), np.float32), ImageTransform.from_folder(tiny_world["clip"]))


@pytest.mark.parametrize("shapes", [((5, 64), (7, 64)), ((3, 1, 64), (3, 4, 64)), ((2, 3, 17, 40), (2, 3, 33, 40))])
def test_pairwise_impls_equal_reference(shapes):
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    a[..., 0, :] = 0  # a zero vector: cosine 0, not NaN
    for fn in (cosine_matrix, sqdist_matrix):
        ref = fn(a, b, impl="reference")
        assert ref.shape == shapes[0][:-1] + (shapes[1][-2],)
        assert np.isfinite(ref).all()
        for impl in ACCELERATED:
            if impl == "triton":
                continue  # checked in a fresh interpreter below
            np.testing.assert_allclose(fn(a, b, impl=impl), ref, rtol=1e-5, atol=1e-4, err_msg=impl)
    _check_triton_pairwise_in_fresh_process(shapes)
    unit = a[..., 1:, :] / np.linalg.norm(a[..., 1:, :], axis=-1, keepdims=True)
    np.testing.assert_allclose(np.diagonal(cosine_matrix(a[..., 1:, :], unit), axis1=-2, axis2=-1), 1, atol=1e-6)


def _check_triton_pairwise_in_fresh_process(shapes):
    # Triton's interpreter patches triton.language per kernel; after other test modules have imported Triton
    # without TRITON_INTERPRET the in-process check fails for reasons of import order, not of the kernel.
    import subprocess
    import sys

    code = f"""
import numpy as np
from audit.kernels.distances import cosine_matrix, sqdist_matrix
rng = np.random.default_rng(2)
a, b = (rng.standard_normal(s).astype(np.float32) for s in {shapes!r})
a[..., 0, :] = 0
for fn in (cosine_matrix, sqdist_matrix):
    np.testing.assert_allclose(fn(a, b, impl="triton"), fn(a, b, impl="reference"), rtol=1e-5, atol=1e-4)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pairwise_rejects_unpaired_shapes():
    with pytest.raises(UsageError, match="do not pair up"):
        cosine_matrix(np.zeros((2, 3, 8)), np.zeros((3, 3, 8)))


def test_unknown_kernel_impl_lists_valid_ones():
    with pytest.raises(UsageError, match="numpy, reference, onnx, triton"):
        cosine_matrix(np.zeros((2, 8)), np.zeros((2, 8)), impl="cuda")
