"""Throughput of feature extraction: plain diffusers + transformers eager vs audit's onnxruntime runtime.

One run, side by side, on the toy target at the demo's settings (n_gen 2, 10 DDIM steps, 32 captions a batch,
captions of up to 30 tokens). Each path runs in its own subprocess so its peak memory (ru_maxrss) is its own; both
get the same fixed thread count. Per path: queries featurised per second (generate n_gen images per query, caption
each generated image, embed query + generated images, embed caption + generated captions), images generated per
second (the generation part alone), and peak RSS. Then the UNet's achieved FLOP/s as a fraction of the machine's
measured fp32 matmul throughput, and the kernel micro-benchmarks that pick ``audit.kernels.DEFAULT_IMPLS``.

    python benchmarks/runtime.py                      # bundled toy world, export cached under /tmp
    python benchmarks/runtime.py --world /tmp/twq2 --queries 64 --threads 2 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib() -> float:
    """Peak RSS of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> None:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0), so the featurisation's own peak is measurable
    apart from the imports' (importing a CUDA build of torch maps ~1 GB of libraries)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _queries(n: int):
    from audit.toy import scenes

    images, captions = scenes.scene_images(0, "heldout", n)
    return images, captions


def _batches(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


# --- (a) plain diffusers + transformers, eager, the way a user would write it -------------------------------------

def worker_eager(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import StableDiffusionPipeline
    from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor

    from audit.seeding import image_seeds

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    world = Path(args.world)
    pipe = StableDiffusionPipeline.from_pretrained(world / "target", use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained(world / "clip", use_safetensors=True).eval()
    clip_proc = CLIPProcessor.from_pretrained(world / "clip")
    blip = BlipForConditionalGeneration.from_pretrained(world / "blip", use_safetensors=True).eval()
    blip_proc = BlipProcessor.from_pretrained(world / "blip")
    feat = lambda out: getattr(out, "pooler_output", out)  # noqa: E731  (transformers 5 returns a ModelOutput)

    @torch.inference_mode()
    def featurise(images, captions, timings):
        t0 = time.perf_counter()
        gens = [torch.Generator().manual_seed(s) for c in captions for s in image_seeds(args.seed, c, args.n_gen)]
        gen = pipe(captions, num_images_per_prompt=args.n_gen, num_inference_steps=args.steps, guidance_scale=1.0,
                   generator=gens, output_type="np").images
        gen = (gen * 255).round().clip(0, 255).astype(np.uint8)
        t1 = time.perf_counter()
        px = blip_proc(images=list(gen), return_tensors="pt").pixel_values
        ids = blip.generate(pixel_values=px, max_new_tokens=args.caption_tokens, do_sample=False, num_beams=1)
        gen_caps = [t.strip() for t in blip_proc.batch_decode(ids, skip_special_tokens=True)]
        px = clip_proc(images=list(images) + list(gen), return_tensors="pt").pixel_values
        img_emb = F.normalize(feat(clip.get_image_features(pixel_values=px)), dim=-1)
        tok = clip_proc.tokenizer(list(captions) + gen_caps, padding=True, truncation=True, return_tensors="pt")
        txt_emb = F.normalize(feat(clip.get_text_features(**tok)), dim=-1)
        timings["generate"] += t1 - t0
        timings["total"] += time.perf_counter() - t0
        return gen, img_emb.numpy(), txt_emb.numpy(), gen_caps

    return _measure(featurise, args)


# --- (b) audit's runtime on the exported graphs --------------------------------------------------------------------

def worker_runtime(args) -> dict:
    import numpy as np
    import torch

    from audit.runtime import OnnxCaptioner, OnnxEmbedder, OnnxGenerator, RuntimeOptions

    torch.set_num_threads(args.threads)  # torch only draws the initial latents here
    opts = RuntimeOptions(intra_op_threads=args.threads, memory_arena=args.worker != "runtime-lowmem",
                          replicas=1 if args.worker == "runtime-1session" else 0)
    root = Path(args.export)
    gen_model = OnnxGenerator(root, opts, batch_size=args.batch_size * args.n_gen)
    embedder = OnnxEmbedder(root / "embedder", opts)
    captioner = OnnxCaptioner(root / "captioner", opts)

    def featurise(images, captions, timings):
        t0 = time.perf_counter()
        gen = gen_model.generate(captions, args.n_gen, args.seed, args.steps)
        flat = gen.reshape(-1, *gen.shape[2:])
        t1 = time.perf_counter()
        gen_caps = captioner.caption(flat, max_new_tokens=args.caption_tokens)
        img_emb = embedder.embed_images(np.concatenate([images, flat]))
        txt_emb = embedder.embed_texts(list(captions) + gen_caps)
        timings["generate"] += t1 - t0
        timings["total"] += time.perf_counter() - t0
        return flat, img_emb, txt_emb, gen_caps

    return _measure(featurise, args)


def _measure(featurise, args) -> dict:
    images, captions = _queries(args.queries)
    loaded_now = _status_mib("VmRSS")
    _reset_peak()
    warm = {"generate": 0.0, "total": 0.0}
    featurise(images[:2], captions[:2], warm)  # first calls allocate arenas, JIT, caches: not throughput
    # The fastest of several passes over the queries: the machine's speed drifts by tens of percent over seconds
    # (other tenants), and a slow spell only ever slows a pass down.
    passes = []
    for _ in range(args.passes):
        timings = {"generate": 0.0, "total": 0.0}
        outputs = [featurise(images[a:b], captions[a:b], timings) for a, b in _batches(args.queries, args.batch_size)]
        passes.append(timings)
    timings = min(passes, key=lambda t: t["total"])
    import numpy as np

    np.savez(args.out_arrays, gen=np.concatenate([o[0].reshape(-1, *o[0].shape[-3:]) for o in outputs]),
             img_emb=np.concatenate([o[1] for o in outputs]), txt_emb=np.concatenate([o[2] for o in outputs]))
    return {"queries": args.queries, "seconds": timings["total"], "generate_seconds": timings["generate"],
            "queries_per_s": args.queries / timings["total"],
            "images_per_s": args.queries * args.n_gen / timings["generate"],
            "rss_after_load_mib": loaded_now, "peak_rss_work_mib": _status_mib("VmHWM"),
            "peak_rss_process_mib": _rss_mib(), "pass_seconds": [round(t["total"], 3) for t in passes],
            "captions_sample": outputs[0][3][:3]}


# --- UNet FLOP/s against the machine's matmul throughput -----------------------------------------------------------

def worker_flops(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from audit.runtime import Graph, RuntimeOptions
    from audit.targets.diffusion import load_pipeline

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    peak = matmul_flops(1536)

    unet = load_pipeline(Path(args.world) / "target").unet.eval()
    batch = args.batch_size * args.n_gen
    s = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, s, s)
    t = torch.full((batch,), 500, dtype=torch.int64)
    ehs = torch.randn(batch, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=ehs)
        flops = counter.get_total_flops()
        eager = min(_time(lambda: unet(x, t, encoder_hidden_states=ehs)) for _ in range(3))
    target = Path(args.export) / "target"
    opts = RuntimeOptions(intra_op_threads=args.threads)
    graph = Graph(target / "unet.onnx", opts)
    feeds = {"sample": x.numpy(), "timestep": t.numpy()}
    context_s = 0.0
    if (target / "unet_context.onnx").is_file():  # cross-attention keys/values once per generation, not per step
        context = Graph(target / "unet_context.onnx", opts)
        feeds.update(context.run(encoder_hidden_states=ehs.numpy()))  # also the warm-up call
        context_s = min(_time(lambda: context.run(encoder_hidden_states=ehs.numpy())) for _ in range(3))
    else:
        feeds["encoder_hidden_states"] = ehs.numpy()
    graph.run(**feeds)
    ort_s = min(_time(lambda: graph.run(**feeds)) for _ in range(3)) + context_s / args.steps
    return {"matmul_gflops": peak / 1e9, "unet_batch": batch, "unet_gflop_per_call": flops / 1e9,
            "unet_eager_s": eager, "unet_onnx_s": ort_s, "unet_eager_fraction": flops / eager / peak,
            "unet_onnx_fraction": flops / ort_s / peak}


def matmul_flops(n: int, repeats: int = 5) -> float:
    """This machine's fp32 throughput (FLOP/s) on torch's current threads: the fastest of ``repeats`` n x n
    matmuls after a warm-up, the yardstick the UNets' FLOP rates are given against."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    return 2 * n**3 / min(_time(lambda: torch.matmul(a, b)) for _ in range(repeats))


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- kernels: reference vs accelerated -----------------------------------------------------------------------------

def worker_kernels(args) -> dict:
    import numpy as np
    import torch

    from audit.kernels import DdimCoefficients, ImageTransform, cfg_ddim_step, cosine_matrix, preprocess_images

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    c = DdimCoefficients(*np.float32([0.8, 0.6, 0.9, 0.43]))
    clip = ImageTransform(resize="shortest_edge", size=(224,), crop=(224, 224), mean=(0.48, 0.46, 0.41),
                          std=(0.27, 0.26, 0.28))
    toy = ImageTransform(resize="shortest_edge", size=(32,), crop=(32, 32), mean=(0.48, 0.46, 0.41),
                         std=(0.27, 0.26, 0.28))
    cases = {
        "cfg_ddim_step toy latents [64,4,8,8]": lambda b: cfg_ddim_step(e1, x1, c, None, impl=b),
        "cfg_ddim_step SD latents, CFG [2x8,4,64,64]": lambda b: cfg_ddim_step(e2, x2, c, 7.5, impl=b),
        "preprocess toy [128,32,32,3] (no resize)": lambda b: preprocess_images(im1, toy, impl=b),
        "preprocess [16,256,320,3] -> 224 (resize+crop)": lambda b: preprocess_images(im2, clip, impl=b),
        "cosine [256,2,64] x [256,2,64]": lambda b: cosine_matrix(f1, f2, impl=b),
    }
    x1, e1 = rng.standard_normal((64, 4, 8, 8), np.float32), rng.standard_normal((64, 4, 8, 8), np.float32)
    x2, e2 = rng.standard_normal((8, 4, 64, 64), np.float32), rng.standard_normal((16, 4, 64, 64), np.float32)
    im1 = rng.integers(0, 256, (128, 32, 32, 3), dtype=np.uint8)
    im2 = rng.integers(0, 256, (16, 256, 320, 3), dtype=np.uint8)
    f1, f2 = rng.standard_normal((256, 2, 64), np.float32), rng.standard_normal((256, 2, 64), np.float32)
    out = {}
    for name, fn in cases.items():
        row = {}
        for impl in ("reference", "numpy", "onnx"):
            fn(impl)
            reps = 20
            t = time.perf_counter()
            for _ in range(reps):
                fn(impl)
            row[impl] = (time.perf_counter() - t) / reps * 1e3
        out[name] = row
    return out


WORKERS = {"eager": worker_eager, "runtime": worker_runtime, "runtime-lowmem": worker_runtime,
           "runtime-1session": worker_runtime, "flops": worker_flops,
           "kernels": worker_kernels}


# --- driver --------------------------------------------------------------------------------------------------------

def _default_world() -> Path:
    from audit.toy import BUNDLE

    if (BUNDLE / "target").is_dir():
        return BUNDLE
    raise SystemExit(f"no bundled toy world at {BUNDLE}; pass --world DIR (a folder with target/, clip/, blip/, "
                     "e.g. from `audit toy build --quick --out DIR`)")


def _ensure_export(world: Path, export: Path | None) -> tuple[Path, float | None]:
    from audit.export import ExportConfig, export_all
    from audit.manifest import weights_hash

    if export is None:
        # Keyed by the weights and by the export code: a cache made by another version of audit/export is not
        # benchmarked as this one's graphs.
        import hashlib

        import audit.export

        sources = sorted(Path(audit.export.__file__).parent.glob("*.py"))
        code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:8]
        export = Path(tempfile.gettempdir()) / "audit-bench" / f"{weights_hash(world / 'target')}-{code}"
    if (export / "export.json").is_file():
        return export, None
    t = time.perf_counter()
    export_all(ExportConfig(target=str(world / "target"), embedder=str(world / "clip"),
                            captioner=str(world / "blip")), export)
    return export, time.perf_counter() - t


def _run_worker(name: str, args, arrays: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--world", str(args.world), "--export", str(args.export),
           "--queries", str(args.queries), "--batch-size", str(args.batch_size), "--n-gen", str(args.n_gen),
           "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
           "--caption-tokens", str(args.caption_tokens), "--passes", str(args.passes),
           "--out-arrays", str(arrays or os.devnull)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               DIFFUSERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=Path, help="folder with target/, clip/, blip/ (default: the bundled toy world)")
    p.add_argument("--export", type=Path, help="export folder to use or create (default: cached under /tmp)")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="captions per batch (the demo's)")
    p.add_argument("--n-gen", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--caption-tokens", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="run each path this many times, interleaved; report "
                   "each path's fastest run")
    p.add_argument("--passes", type=int, default=3, help="passes over the queries within each run; a run reports "
                   "its fastest pass")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out-arrays", default=os.devnull, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        if args.worker.startswith(("eager", "runtime")):
            args.out_arrays = args.out_arrays if args.out_arrays != os.devnull else tempfile.mktemp(suffix=".npz")
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import numpy as np

    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
    args.world = args.world or _default_world()
    args.export, export_s = _ensure_export(args.world, args.export)
    print(f"world {args.world}; export {args.export}" + (f" (exported in {export_s:.0f} s)" if export_s else ""))
    print(f"settings: {args.queries} queries, {args.batch_size} captions a batch, n_gen {args.n_gen}, {args.steps} "
          f"DDIM steps, captions <= {args.caption_tokens} tokens, {args.threads} threads, best of {args.passes} "
          f"passes a run, machine "
          f"{os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})")
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, list[dict]] = {"eager": [], "runtime": [], "runtime-lowmem": [], "runtime-1session": []}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every path
            for name in runs:
                runs[name].append(_run_worker(name, args, Path(tmp) / f"{name}.npz"))
        # Each path's fastest run: on a shared machine the others' load only ever slows a run down, so the best of
        # several interleaved runs is the least disturbed measurement (timeit's reasoning); every run is kept.
        results = {name: max(r, key=lambda x: x["queries_per_s"]) for name, r in runs.items()}
        results["all_runs"] = runs
        a, b = np.load(Path(tmp) / "eager.npz"), np.load(Path(tmp) / "runtime.npz")
        agreement = {"images_max_abs_uint8": int(np.abs(a["gen"].astype(int) - b["gen"].astype(int)).max()),
                     "image_emb_max_abs": float(np.abs(a["img_emb"] - b["img_emb"]).max()),
                     "text_emb_max_abs": float(np.abs(a["txt_emb"] - b["txt_emb"]).max())}
    results["flops"] = _run_worker("flops", args)
    results["kernels"] = _run_worker("kernels", args)
    e, r, f = results["eager"], results["runtime"], results["flops"]
    print(f"\n{'':28}{'eager (diffusers+transformers)':>32}{'audit runtime (onnxruntime)':>30}{'ratio':>8}")
    for label, key, fmt in (("queries featurised / s", "queries_per_s", ".2f"), ("images generated / s", "images_per_s",
                                                                                   ".1f"),
                            ("RSS after loading (MiB)", "rss_after_load_mib", ".0f"),
                            ("peak RSS featurising (MiB)", "peak_rss_work_mib", ".0f"),
                            ("peak RSS of process (MiB)", "peak_rss_process_mib", ".0f")):
        ratio = r[key] / e[key]
        print(f"{label:28}{format(e[key], fmt):>32}{format(r[key], fmt):>30}{ratio:>7.2f}x")
    low = results["runtime-lowmem"]
    print(f"runtime without onnxruntime's memory arena (AUDIT_MEMORY_ARENA=0): {low['queries_per_s']:.2f} queries/s "
          f"({low['queries_per_s'] / e['queries_per_s']:.2f}x eager), peak RSS featurising "
          f"{low['peak_rss_work_mib']:.0f} MiB")
    one = results["runtime-1session"]
    print(f"runtime with one multi-thread session per graph (AUDIT_REPLICAS=1): {one['queries_per_s']:.2f} queries/s "
          f"({one['queries_per_s'] / e['queries_per_s']:.2f}x eager), peak RSS featurising "
          f"{one['peak_rss_work_mib']:.0f} MiB")
    if args.repeats > 1:
        print("queries/s of every run: " + "; ".join(f"{k} {', '.join(format(v['queries_per_s'], '.2f') for v in vs)}"
                                                     for k, vs in results["all_runs"].items()))
        # Runs of one round ran minutes apart at most: their ratio is the least disturbed by the machine's drift.
        pairs = [r["queries_per_s"] / e_["queries_per_s"]
                 for r, e_ in zip(results["all_runs"]["runtime"], results["all_runs"]["eager"])]
        results["same_round_ratios"] = pairs
        print(f"runtime / eager in each round: {', '.join(f'{x:.2f}' for x in pairs)} (median "
              f"{float(np.median(pairs)):.2f}x)")
    print(f"\noutputs agree: generated images within {agreement['images_max_abs_uint8']} uint8 levels, image "
          f"embeddings within {agreement['image_emb_max_abs']:.1e}, text embeddings within "
          f"{agreement['text_emb_max_abs']:.1e} (text differs where a caption differs)")
    print(f"machine fp32 matmul: {f['matmul_gflops']:.1f} GFLOP/s ({args.threads} threads). UNet at batch "
          f"{f['unet_batch']}: {f['unet_gflop_per_call']:.2f} GFLOP/call; eager {f['unet_eager_s'] * 1e3:.0f} ms = "
          f"{f['unet_eager_fraction']:.0%} of matmul peak; onnxruntime {f['unet_onnx_s'] * 1e3:.0f} ms = "
          f"{f['unet_onnx_fraction']:.0%} (a step plus 1/{args.steps} of the cross-attention context graph, the "
          "whole UNet's FLOPs: the same work as eager's call, done once per generation where it can be)")
    print(f"\n{'kernels (ms per call)':48}" + "".join(f"{b:>12}" for b in ("reference", "numpy", "onnx")))
    for name, row in results["kernels"].items():
        print(f"{name:48}" + "".join(f"{row[b]:>12.3f}" for b in ("reference", "numpy", "onnx")))
    results["agreement"] = agreement
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("worker", "out_arrays", "json")}
    results["load_average"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
