"""GPU checks of the compiled path, for a machine with a CUDA GPU. Prints one PASS / FAIL / SKIP line per check.

    PYTHONPATH=. python benchmarks/gpu_check.py [--world DIR] [--skip-fp16] [--skip-bench]

Checks: torch sees the GPU; the Triton kernels (CFG+DDIM step, preprocessing, pairwise cosine) equal their torch
references on the GPU; onnxruntime offers the CUDA (and TensorRT) provider; `audit export --device cuda` of the toy
world validates every graph on the CUDA provider and its end-to-end checks pass (fp32, then fp16); the CUDA runtime
generates the torch path's images; and a short side-by-side throughput of eager torch on CUDA vs the CUDA runtime.
Exit status 1 if any check failed. Needs no network; uses the bundled toy world unless --world is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULTS: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str = "") -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:4} {name}" + (f": {detail}" if detail else ""), flush=True)


def check(name: str):
    """Run a check; an exception is a FAIL with its last line; a returned ('SKIP', why) is a SKIP."""
    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                out = fn(*a, **kw)
            except Exception as exc:  # a check that crashes is a failed check, and the others still run
                report(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(limit=3, file=sys.stderr)
                return None
            if isinstance(out, tuple) and out and out[0] == "SKIP":
                report(name, "SKIP", out[1])
                return None
            report(name, "PASS", f"{out} ({time.perf_counter() - t:.1f} s)" if out else f"{time.perf_counter() - t:.1f} s")
            return out if out is not None else True
        return run
    return wrap


@check("torch CUDA")
def torch_cuda():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    return torch.cuda.get_device_name(0)


@check("triton kernels == torch reference on the GPU")
def triton_kernels():
    import numpy as np

    from audit.kernels import (DdimCoefficients, ImageTransform, cfg_ddim_step, cosine_matrix, preprocess_images,
                               sqdist_matrix, triton_status)

    ok, why = triton_status()
    if not ok:
        raise RuntimeError(why)
    rng = np.random.default_rng(0)
    c = DdimCoefficients(*np.float32([0.8, 0.6, 0.9, 0.43]))
    worst = {}
    for pred in ("epsilon", "v_prediction", "sample"):
        x = rng.standard_normal((8, 4, 64, 64), np.float32)
        e = rng.standard_normal((16, 4, 64, 64), np.float32)
        d = np.abs(cfg_ddim_step(e, x, c, 7.5, pred, 1.0, backend="triton")
                   - cfg_ddim_step(e, x, c, 7.5, pred, 1.0, backend="reference")).max()
        worst[f"ddim/{pred}"] = float(d)
    t = ImageTransform(resize="shortest_edge", size=(224,), crop=(224, 224), mean=(0.48, 0.46, 0.41),
                       std=(0.27, 0.26, 0.28))
    im = rng.integers(0, 256, (4, 256, 320, 3), dtype=np.uint8)
    diff = np.abs(preprocess_images(im, t, "triton") - preprocess_images(im, t, "reference"))
    # The GPU resize runs in float; it rounds like the CPU's fixed-point kernel but for rare ties (one level).
    worst["preprocess_levels"] = float(diff.max() * 255 * min(t.std))
    worst["preprocess_frac_off"] = float((diff > 1e-4).mean())
    a, b = rng.standard_normal((3, 50, 64), np.float32), rng.standard_normal((3, 70, 64), np.float32)
    worst["cosine"] = float(np.abs(cosine_matrix(a, b, "triton") - cosine_matrix(a, b, "reference")).max())
    worst["sqdist_rel"] = float((np.abs(sqdist_matrix(a, b, "triton") - sqdist_matrix(a, b, "reference"))
                                 / sqdist_matrix(a, b, "reference").max()).max())
    limits = {"preprocess_levels": 1.001, "preprocess_frac_off": 2e-2}
    bad = {k: v for k, v in worst.items() if v > limits.get(k, 1e-4)}
    if bad:
        raise RuntimeError(f"outside tolerance: {bad}")
    return ", ".join(f"{k} {v:.1e}" for k, v in worst.items())


@check("onnxruntime CUDA provider")
def ort_cuda():
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        raise RuntimeError(f"providers: {have} (install onnxruntime-gpu in place of onnxruntime)")
    return f"onnxruntime {ort.__version__}; TensorRT {'offered' if 'TensorrtExecutionProvider' in have else 'absent'}"


def _export(world: Path, out: Path, precision: str):
    from audit.export import ExportConfig, export_all

    info = export_all(ExportConfig(target=str(world / "target"), embedder=str(world / "clip"),
                                   captioner=str(world / "blip"), device="cuda", precision=precision), out)
    worst = {}
    for part in ("target", "embedder", "captioner"):
        graphs = json.loads((out / part / "export.json").read_text())["graphs"]
        worst.update({f"{part}/{k}": v["validation"]["max_abs_err"] for k, v in graphs.items()})
    return f"end to end {info['end_to_end']}; worst graph error {max(worst.values()):.1e}"


export_cuda = check("export --device cuda (fp32): graphs validated on CUDA, end-to-end checks")(
    lambda world, out: _export(world, out, "fp32"))
export_fp16 = check("export --device cuda --precision fp16")(lambda world, out: _export(world, out, "fp16"))


@check("CUDA runtime images == torch CUDA path (same seeds)")
def runtime_images(world: Path, export: Path):
    import numpy as np

    from audit.runtime import OnnxGenerator, RuntimeOptions
    from audit.targets import load_target

    from audit.export.convert import exact_fp32

    captions = ["a red circle above a blue square", "three green triangles"]
    with exact_fp32():  # cuDNN convolutions default to TF32; the runtime's CUDA provider runs without it
        a = load_target(str(world / "target"), device="cuda").generate(captions, 2, 0, 10)
    b = OnnxGenerator(export, RuntimeOptions(device="cuda", tensorrt=False)).generate(captions, 2, 0, 10)
    d = np.abs(a.astype(int) - b.astype(int))
    if d.max() > 8 or d.mean() > 0.5:
        raise RuntimeError(f"images differ by up to {d.max()} levels (mean {d.mean():.2f})")
    return f"max {d.max()} levels, mean {d.mean():.3f}"


@check("TensorRT provider runs the CLIP image graph")
def tensorrt(export: Path):
    import numpy as np

    from audit.runtime import Graph, RuntimeOptions
    from audit.runtime.session import available_providers

    if "TensorrtExecutionProvider" not in available_providers():
        return ("SKIP", "onnxruntime offers no TensorrtExecutionProvider")
    g = Graph(export / "embedder" / "image_encoder.onnx", RuntimeOptions(device="cuda", tensorrt=True))
    ref = Graph(export / "embedder" / "image_encoder.onnx", RuntimeOptions(device="cuda", tensorrt=False))
    px = np.random.default_rng(0).standard_normal((4, 3, 32, 32), np.float32)
    d = np.abs(g.run(pixel_values=px)["image_embeds"] - ref.run(pixel_values=px)["image_embeds"]).max()
    if d > 1e-2:
        raise RuntimeError(f"TensorRT output differs from CUDA by {d:.2e}")
    return f"providers {g.providers}; max diff vs CUDA {d:.1e}"


@check("throughput on CUDA: eager torch vs runtime (64 queries, n_gen 2, 10 steps)")
def throughput(world: Path, export: Path):
    import numpy as np

    from audit.runtime import OnnxCaptioner, OnnxEmbedder, OnnxGenerator, RuntimeOptions
    from audit.targets import load_captioner, load_embedder, load_target
    from audit.toy import scenes

    images, captions = scenes.scene_images(0, "heldout", 64)
    opts = RuntimeOptions(device="cuda", tensorrt=False)
    paths = {"torch": (load_target(str(world / "target"), device="cuda"), load_embedder(str(world / "clip"),
                                                                                          device="cuda"),
                       load_captioner(str(world / "blip"), device="cuda")),
             "runtime": (OnnxGenerator(export, opts), OnnxEmbedder(export / "embedder", opts),
                         OnnxCaptioner(export / "captioner", opts))}
    rates = {}
    for name, (g, e, c) in paths.items():
        def featurise(imgs, caps):
            gen = g.generate(caps, 2, 0, 10).reshape(-1, 32, 32, 3)
            gc = c.caption(gen, 30)
            e.embed_images(np.concatenate([imgs, gen]))
            e.embed_texts(list(caps) + gc)
        featurise(images[:2], captions[:2])
        t = time.perf_counter()
        for i in range(0, 64, 32):
            featurise(images[i : i + 32], captions[i : i + 32])
        rates[name] = 64 / (time.perf_counter() - t)
    return ", ".join(f"{k} {v:.1f} queries/s" for k, v in rates.items()) + \
        f"; ratio {rates['runtime'] / rates['torch']:.2f}x"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, help="toy world folder (target/, clip/, blip/); default: the bundled one")
    p.add_argument("--skip-fp16", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("TRITON_INTERPRET", None)  # the real GPU, not the interpreter
    from audit.toy import BUNDLE

    world = args.world or BUNDLE
    print(f"audit GPU check; world {world}", flush=True)
    if not torch_cuda():
        print("no CUDA GPU: nothing else to check")
        return 1
    triton_kernels()
    has_ort_cuda = ort_cuda()
    if has_ort_cuda:
        with tempfile.TemporaryDirectory() as tmp:
            exp = Path(tmp) / "fp32"
            if export_cuda(world, exp):
                runtime_images(world, exp)
                tensorrt(exp)
                if not args.skip_bench:
                    throughput(world, exp)
            if not args.skip_fp16:
                export_fp16(world, Path(tmp) / "fp16")
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed or skipped; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
