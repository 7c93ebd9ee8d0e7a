"""GPU checks of the compiled path, for a machine with a CUDA GPU. Prints one PASS / FAIL / SKIP line per check.

    PYTHONPATH=. python benchmarks/gpu_check.py [--world DIR | --fullsize] [--skip-fp16] [--skip-bench]

Checks: torch sees the GPU; the Triton kernels (CFG+DDIM step, preprocessing, pairwise cosine) equal their torch
references on the GPU; onnxruntime offers the CUDA (and TensorRT) provider; `audit export --device cuda` of the toy
world validates every graph on the CUDA provider and its end-to-end checks pass (fp32, then fp16); the CUDA runtime
generates the torch path's images; and a short side-by-side throughput of eager torch on CUDA vs the CUDA runtime.
Exit status 1 if any check failed. Needs no network; uses the bundled toy world unless --world is given, or with
--fullsize random-weight SD-1.5 + CLIP ViT-L/14 + BLIP base at their published sizes (``audit.testing.fullsize``;
time and memory only): the throughput check then also runs both paths in fp16 (torch fp16 eager with SDPA against
the fp16 export) and reports seconds per query and peak GPU memory.
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
        d = np.abs(cfg_ddim_step(e, x, c, 7.5, pred, 1.0, impl="triton")
                   - cfg_ddim_step(e, x, c, 7.5, pred, 1.0, impl="reference")).max()
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


def _export(world: dict, out: Path, precision: str):
    from audit.export import ExportConfig, export_all

    info = export_all(ExportConfig(target=str(world["target"]), embedder=str(world["clip"]),
                                   captioner=str(world["blip"]), device="cuda", precision=precision), out)
    worst = {}
    for part in ("target", "embedder", "captioner"):
        graphs = json.loads((out / part / "export.json").read_text())["graphs"]
        worst.update({f"{part}/{k}": v["validation"]["max_abs_err"] for k, v in graphs.items()})
    return f"end to end {info['end_to_end']}; worst graph error {max(worst.values()):.1e}"


export_cuda = check("export --device cuda (fp32): graphs validated on CUDA, end-to-end checks")(
    lambda world, out: _export(world, out, "fp32"))
export_fp16 = check("export --device cuda --precision fp16")(lambda world, out: _export(world, out, "fp16"))


@check("CUDA runtime images == torch CUDA path (same seeds)")
def runtime_images(world: dict, export: Path):
    import numpy as np

    from audit.runtime import OnnxGenerator, RuntimeOptions
    from audit.targets import load_target

    from audit.export.convert import exact_fp32

    captions = ["a red circle above a blue square", "three green triangles"]
    with exact_fp32():  # cuDNN convolutions default to TF32; the runtime's CUDA provider runs without it
        a = load_target(str(world["target"]), device="cuda").generate(captions, 2, 0, 10)
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
    size = ref.session.get_inputs()[0].shape[-1]  # the embedder's image size (32 toy, 224 ViT-L/14)
    px = np.random.default_rng(0).standard_normal((4, 3, size, size), np.float32)
    d = np.abs(g.run(pixel_values=px)["image_embeds"] - ref.run(pixel_values=px)["image_embeds"]).max()
    if d > 1e-2:
        raise RuntimeError(f"TensorRT output differs from CUDA by {d:.2e}")
    return f"providers {g.providers}; max diff vs CUDA {d:.1e}"


def _featurise_rate(g, e, c, images, captions, batch: int, steps: int) -> dict:
    """Queries per second (after a warm-up batch) and the peak GPU memory torch saw allocated while featurising."""
    import numpy as np
    import torch

    def featurise(imgs, caps):
        gen = g.generate(caps, 2, 0, steps)
        gen = gen.reshape(-1, *gen.shape[2:])
        e.embed_images(np.concatenate([imgs, gen]))
        e.embed_texts(list(caps) + c.caption(gen, 30))

    featurise(images[:2], captions[:2])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(0, len(images), batch):
        featurise(images[i : i + batch], captions[i : i + batch])
    torch.cuda.synchronize()
    return {"queries_per_s": len(images) / (time.perf_counter() - t),
            "torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def _gpu_used_gib() -> float | None:
    """GPU memory in use on device 0 (nvidia-smi: counts onnxruntime's CUDA arena, which torch does not see)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


@check("throughput on CUDA: eager torch vs runtime (n_gen 2; toy: 64 queries, 10 steps; full size: 4, 4)")
def throughput(world: dict, exports: dict, fullsize: bool):
    import torch

    from audit.export.components import _probe_images
    from audit.runtime import OnnxCaptioner, OnnxEmbedder, OnnxGenerator, RuntimeOptions
    from audit.targets import load_captioner, load_embedder, load_target
    from audit.toy import scenes

    if fullsize:
        n, batch, steps = 4, 2, 4
        captions = ["a red bus on a city street", "a bowl of green apples", "a dog on a beach", "a snowy mountain"]
        images = _probe_images(512, n)
    else:
        n, batch, steps = 64, 32, 10
        images, captions = scenes.scene_images(0, "heldout", n)
    opts = RuntimeOptions(device="cuda", tensorrt=False)
    rates = {}
    for precision, export in exports.items():
        torch_models = (load_target(str(world["target"]), device="cuda"),
                        load_embedder(str(world["clip"]), device="cuda"),
                        load_captioner(str(world["blip"]), device="cuda"))
        if precision == "fp16":  # torch fp16 eager (diffusers' SDPA attention) against the fp16 export
            for m in (torch_models[0].pipe, torch_models[1].model, torch_models[2].model):
                m.to(torch.float16)
        rates[f"torch {precision}"] = _featurise_rate(*torch_models, images, captions, batch, steps)
        del torch_models
        torch.cuda.empty_cache()
        before = _gpu_used_gib()
        runtime = (OnnxGenerator(export, opts), OnnxEmbedder(export / "embedder", opts),
                   OnnxCaptioner(export / "captioner", opts))
        rate = _featurise_rate(*runtime, images, captions, batch, steps)
        after = _gpu_used_gib()
        rate["gpu_used_gib"] = None if before is None or after is None else after - before
        rates[f"runtime {precision}"] = rate
        del runtime
    parts = [f"{k} {v['queries_per_s']:.2f} queries/s ({1 / v['queries_per_s']:.2f} s/query)" for k, v in
             rates.items()]
    mem = [f"{k} {v['torch_peak_gib']:.1f} GiB" for k, v in rates.items() if k.startswith("torch")]
    mem += [f"{k} {v['gpu_used_gib']:.1f} GiB (nvidia-smi)" for k, v in rates.items()
            if k.startswith("runtime") and v.get("gpu_used_gib") is not None]
    ratios = [f"{p} {rates[f'runtime {p}']['queries_per_s'] / rates[f'torch {p}']['queries_per_s']:.2f}x"
              for p in exports]
    return "; ".join(parts) + "; runtime/torch " + ", ".join(ratios) + "; peak GPU memory " + ", ".join(mem)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, help="toy world folder (target/, clip/, blip/); default: the bundled one")
    p.add_argument("--fullsize", action="store_true", help="random-weight SD-1.5 + CLIP ViT-L/14 + BLIP base at "
                   "their published sizes instead of the toy (built once into $AUDIT_HOME/fullsize; ~5 GB)")
    p.add_argument("--skip-fp16", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("TRITON_INTERPRET", None)  # the real GPU, not the interpreter
    from audit.toy import BUNDLE

    if args.fullsize:
        from audit.testing import fullsize

        built = fullsize.world("sd-1.5")
        world = {"target": built["target"], "clip": built["embedder"], "blip": built["captioner"]}
    else:
        world = {k: (args.world or BUNDLE) / k for k in ("target", "clip", "blip")}
    print(f"audit GPU check; world {world}", flush=True)
    if not torch_cuda():
        print("no CUDA GPU: nothing else to check")
        return 1
    triton_kernels()
    has_ort_cuda = ort_cuda()
    if has_ort_cuda:
        with tempfile.TemporaryDirectory() as tmp:
            exp = Path(tmp) / "fp32"
            exports = {}
            if export_cuda(world, exp):
                exports["fp32"] = exp
                runtime_images(world, exp)
                tensorrt(exp)
            if not args.skip_fp16 and export_fp16(world, Path(tmp) / "fp16"):
                exports["fp16"] = Path(tmp) / "fp16"
            if exports and not args.skip_bench:
                throughput(world, exports, args.fullsize)
    failed = [r for r in RESULTS if r[1] == "FAIL"]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed or skipped; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
