"""uint8 images -> the normalised pixel tensors an embedder or captioner takes, like the HF image processors.

transformers' torchvision-backed processors (CLIP, BLIP) resize with antialiased bicubic/bilinear interpolation on
uint8 (so the result is rounded back to uint8), centre-crop, then rescale and normalise in one fused step:
``(x - mean / rescale) / (std / rescale)``. ``ImageTransform.from_processor_config`` reads those settings;
``preprocess_images`` runs them on a uint8 [N, H, W, 3] batch and returns float32 [N, 3, h, w].

Implementations: ``reference`` (torch: its native uint8 resize, which is the processors' own kernel, so the output
equals theirs exactly), ``numpy`` (the same resize when one is needed, then crop and normalise in numpy), ``onnx`` (one
fused graph: cast, layout, antialiased resize in float, crop, normalise; within one uint8 level of the reference
where it resizes), ``triton`` (the float resize in torch when needed, then one fused kernel for layout and
normalise).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import ArtifactError, InputError
from ._impls import OnnxKernel, check_impl, make_model, require_triton, triton_device

# PIL resample codes as saved by HF processors -> interpolation names.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


@dataclasses.dataclass
class ImageTransform(Config):
    resize: str = "fixed"  # "fixed" (height, width), "shortest_edge", or "none"
    size: tuple = (224, 224)  # (h, w) for "fixed"; (edge,) for "shortest_edge"
    crop: tuple = ()  # (h, w) centre crop, or () for none
    resample: str = "bicubic"  # bicubic | bilinear
    rescale: float = 1 / 255
    do_rescale: bool = True
    mean: tuple = ()  # () = no normalisation
    std: tuple = ()

    @classmethod
    def from_processor_config(cls, cfg: dict, where: str = "processor config") -> "ImageTransform":
        """From an HF image-processor dict (``preprocessor_config.json`` or ``processor_config.json['image_processor']``)."""
        size = cfg.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if not cfg.get("do_resize", True):
            resize, dims = "none", ()
        elif "shortest_edge" in size and not size.get("longest_edge"):
            resize, dims = "shortest_edge", (int(size["shortest_edge"]),)
        elif "height" in size and "width" in size:
            resize, dims = "fixed", (int(size["height"]), int(size["width"]))
        else:
            raise ArtifactError(f"{where}: image size {size} is not supported (expected height/width or shortest_edge)")
        resample = _RESAMPLE.get(int(cfg.get("resample", 3)))
        if resample is None:
            raise ArtifactError(f"{where}: resample mode {cfg.get('resample')} is not supported (bicubic, bilinear)")
        crop = ()
        if cfg.get("do_center_crop", False):
            cs = cfg.get("crop_size") or {}
            cs = {"height": cs, "width": cs} if isinstance(cs, int) else cs
            crop = (int(cs["height"]), int(cs["width"]))
        normalize = cfg.get("do_normalize", True)
        return cls(resize=resize, size=dims, crop=crop, resample=resample,
                   rescale=float(cfg.get("rescale_factor", 1 / 255)), do_rescale=bool(cfg.get("do_rescale", True)),
                   mean=tuple(float(v) for v in cfg["image_mean"]) if normalize else (),
                   std=tuple(float(v) for v in cfg["image_std"]) if normalize else ())

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageTransform":
        """Read a saved processor's image settings (either HF layout)."""
        folder = Path(folder)
        flat, nested = folder / "preprocessor_config.json", folder / "processor_config.json"
        if flat.is_file():
            return cls.from_processor_config(json.loads(flat.read_text(encoding="utf-8")), str(flat))
        if nested.is_file():
            data = json.loads(nested.read_text(encoding="utf-8"))
            if "image_processor" in data:
                return cls.from_processor_config(data["image_processor"], str(nested))
        raise ArtifactError(f"{folder}: no image processor config (preprocessor_config.json or processor_config.json)")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after resizing (before cropping), as transformers computes it."""
        if self.resize == "none":
            return height, width
        if self.resize == "fixed":
            return int(self.size[0]), int(self.size[1])
        edge = int(self.size[0])
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = edge, int(edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the centre crop of a resized image."""
        if not self.crop:
            return 0, 0, height, width
        ch, cw = self.crop
        if ch > height or cw > width:
            raise InputError(f"centre crop {ch}x{cw} is larger than the resized image {height}x{width}")
        return int((height - ch) / 2.0), int((width - cw) / 2.0), ch, cw

    def fused_mean_std(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and std on the 0..255 scale, float32, as transformers fuses them (``mean * (1 / rescale)``)."""
        if not self.mean:
            return None
        scale = (1.0 / self.rescale) if self.do_rescale else 1.0
        mean = (np.asarray(self.mean, np.float32) * np.float32(scale)).astype(np.float32)
        std = (np.asarray(self.std, np.float32) * np.float32(scale)).astype(np.float32)
        return mean.reshape(3, 1, 1), std.reshape(3, 1, 1)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    return images


def preprocess_images(images: np.ndarray, transform: ImageTransform, impl: str = "numpy") -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 3, h, w], normalised as the model's processor does."""
    check_impl(impl)
    images = _check_images(images)
    if impl == "reference":
        return _preprocess_torch(images, transform).numpy()
    if impl == "numpy":
        return _preprocess_numpy(images, transform)
    if impl == "onnx":
        return _preprocess_onnx(images, transform)
    return _preprocess_triton(images, transform)


def _resize_native(x, transform: ImageTransform, out_hw: tuple[int, int]):
    """torch's native uint8 antialiased resize on the CPU: the kernel transformers' processors call (through
    torchvision), so the result is theirs bit for bit; fast on a channels-last view of NHWC images."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(out_hw):
        return x.float()
    return F.interpolate(x, size=list(out_hw), mode=transform.resample, align_corners=False, antialias=True).float()


def _resize_torch(x, transform: ImageTransform, out_hw: tuple[int, int]):
    """The same resize in float, for devices without the uint8 kernel (CUDA): like PIL and torch's uint8 kernel it
    runs a horizontal then a vertical antialiased pass and rounds to uint8 between them, which matters for images
    with sharp edges (the overshoot of the first pass is clipped). Agrees with it within one uint8 level."""
    import torch.nn.functional as F

    y = x.float()
    for axis in (-1, -2):
        if y.shape[axis] != out_hw[axis]:
            size = [y.shape[-2], out_hw[1]] if axis == -1 else [out_hw[0], y.shape[-1]]
            y = F.interpolate(y, size=size, mode=transform.resample, align_corners=False, antialias=True)
            y = y.clamp_(0, 255).round_()
    return y


def _normalize_torch(x, transform: ImageTransform):
    import torch

    ms = transform.fused_mean_std()
    if ms is not None:
        return (x - torch.from_numpy(ms[0])) / torch.from_numpy(ms[1])
    return x * transform.rescale if transform.do_rescale else x


def _preprocess_torch(images: np.ndarray, transform: ImageTransform):
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = _resize_native(x, transform, transform.output_size(*images.shape[1:3]))
    top, left, h, w = transform.crop_box(*x.shape[-2:])
    return _normalize_torch(x[..., top : top + h, left : left + w], transform).contiguous()


def _preprocess_numpy(images: np.ndarray, transform: ImageTransform) -> np.ndarray:
    out_hw = transform.output_size(*images.shape[1:3])
    if out_hw != tuple(images.shape[1:3]):
        return _preprocess_torch(images, transform).numpy()
    top, left, h, w = transform.crop_box(*out_hw)
    x = images[:, top : top + h, left : left + w].transpose(0, 3, 1, 2).astype(np.float32)
    ms = transform.fused_mean_std()
    if ms is not None:
        return np.ascontiguousarray((x - ms[0]) / ms[1])
    return np.ascontiguousarray(x * np.float32(transform.rescale) if transform.do_rescale else x)


# --- ONNX ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _onnx_kernel(transform_json: str, with_resize: bool) -> OnnxKernel:
    return OnnxKernel(lambda: _build_graph(ImageTransform.from_json(transform_json), with_resize))


def _build_graph(transform: ImageTransform, with_resize: bool):
    from onnx import TensorProto, helper, numpy_helper

    i64 = TensorProto.INT64
    inputs = [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", "h", "w", 3]),
              helper.make_tensor_value_info("box", i64, [4])]  # top, left, bottom, right
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["nchw"], perm=[0, 3, 1, 2])]
    inits = [helper.make_tensor("axes", i64, [2], [2, 3]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("top", TensorProto.FLOAT, [], [255.0]),
             helper.make_tensor("i0", i64, [1], [0]), helper.make_tensor("i2", i64, [1], [2]),
             helper.make_tensor("i4", i64, [1], [4])]
    src = "nchw"
    if with_resize:
        # Horizontal then vertical pass, each rounded to uint8 values, as in ``_resize_torch``. The filter matches
        # torch's antialiased interpolation (PIL's: a = -0.5 for bicubic, taps outside the image excluded and the
        # weights renormalised).
        mode = "cubic" if transform.resample == "bicubic" else "linear"
        for i in (1, 2):
            inputs.append(helper.make_tensor_value_info(f"sizes{i}", i64, [4]))
            nodes += [helper.make_node("Resize", [src, "", "", f"sizes{i}"], [f"resized{i}"], mode=mode,
                                       cubic_coeff_a=-0.5, antialias=1, exclude_outside=1,
                                       coordinate_transformation_mode="half_pixel"),
                      helper.make_node("Clip", [f"resized{i}", "zero", "top"], [f"clipped{i}"]),
                      helper.make_node("Round", [f"clipped{i}"], [f"pass{i}"])]
            src = f"pass{i}"
    nodes += [helper.make_node("Slice", ["box", "i0", "i2"], ["starts"]),  # box[0:2]: top, left
              helper.make_node("Slice", ["box", "i2", "i4"], ["ends"]),  # box[2:4]: bottom, right
              helper.make_node("Slice", [src, "starts", "ends", "axes"], ["cropped"])]
    ms = transform.fused_mean_std()
    if ms is not None:
        inits += [numpy_helper.from_array(ms[0], "mean"), numpy_helper.from_array(ms[1], "std")]
        nodes += [helper.make_node("Sub", ["cropped", "mean"], ["centred"]),
                  helper.make_node("Div", ["centred", "std"], ["pixel_values"])]
    elif transform.do_rescale:
        inits.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [transform.rescale]))
        nodes.append(helper.make_node("Mul", ["cropped", "scale"], ["pixel_values"]))
    else:
        nodes.append(helper.make_node("Identity", ["cropped"], ["pixel_values"]))
    out = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["n", 3, "oh", "ow"])
    return make_model(nodes, inputs, [out], inits, name="preprocess")


def _preprocess_onnx(images: np.ndarray, transform: ImageTransform) -> np.ndarray:
    n, height, width = images.shape[:3]
    out_hw = transform.output_size(height, width)
    top, left, h, w = transform.crop_box(*out_hw)
    with_resize = out_hw != (height, width)
    feeds = {"images": np.ascontiguousarray(images), "box": np.array([top, left, top + h, left + w], np.int64)}
    if with_resize:
        feeds["sizes1"] = np.array([n, 3, height, out_hw[1]], np.int64)
        feeds["sizes2"] = np.array([n, 3, *out_hw], np.int64)
    return _onnx_kernel(transform.to_json(), with_resize)(**feeds)[0]


# --- Triton ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def normalize_kernel(img_ptr, out_ptr, hw, m0, m1, m2, s0, s1, s2, BLOCK: tl.constexpr):
        # One program per (image, block of pixels): reads interleaved uint8 RGB, writes three float planes.
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < hw
        base = img_ptr + n * hw * 3 + offs * 3
        r = tl.load(base, mask=mask).to(tl.float32)
        g = tl.load(base + 1, mask=mask).to(tl.float32)
        b = tl.load(base + 2, mask=mask).to(tl.float32)
        out = out_ptr + n * hw * 3 + offs
        tl.store(out, (r - m0) / s0, mask=mask)
        tl.store(out + hw, (g - m1) / s1, mask=mask)
        tl.store(out + 2 * hw, (b - m2) / s2, mask=mask)

    return normalize_kernel


def _preprocess_triton(images: np.ndarray, transform: ImageTransform) -> np.ndarray:
    import torch
    import triton

    require_triton()
    dev = triton_device()
    out_hw = transform.output_size(*images.shape[1:3])
    x = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    if out_hw != tuple(images.shape[1:3]):
        x = _resize_torch(x.permute(0, 3, 1, 2), transform, out_hw).to(torch.uint8).permute(0, 2, 3, 1)
    top, left, h, w = transform.crop_box(*out_hw)
    x = x[:, top : top + h, left : left + w].contiguous()
    ms = transform.fused_mean_std()
    if ms is None:  # plain rescale: mean 0, std 1 / rescale
        scale = (1.0 / transform.rescale) if transform.do_rescale else 1.0
        mean, std = [0.0] * 3, [scale] * 3
    else:
        mean, std = ms[0].ravel().tolist(), ms[1].ravel().tolist()
    out = torch.empty((x.shape[0], 3, h, w), dtype=torch.float32, device=dev)
    block = 256
    _triton_kernel()[(x.shape[0], triton.cdiv(h * w, block))](x, out, h * w, *mean, *std, BLOCK=block)
    return out.cpu().numpy()


def resize_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then PIL bicubic resize to ``size`` x ``size`` (no-op when already that size)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    from PIL import Image  # Pillow only where an image is resized

    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.uint8)
