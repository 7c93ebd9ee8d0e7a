"""Feature extraction at real shape: plain diffusers + transformers eager vs audit's runtime, full-size models.

One run, side by side, on random-weight models with the exact published architectures (``audit.testing.fullsize``:
SD-1.5 at 512 px and the paper's LDM-256, each with CLIP ViT-L/14 and BLIP base). Their weights are random, so
these are time and memory figures only. Per target and path, each in its own subprocess (so its peak RSS is its
own), the same fixed thread count: seconds per query featurised (generate n_gen images, caption each, embed query
+ generated images and caption + generated captions), load time, RSS after loading, peak RSS while featurising and
of the whole process, and every graph's median seconds per call. Then the UNet's FLOPs per image (counted on the
meta device) over each path's seconds per image, as a fraction of this machine's measured fp32 matmul throughput;
and the export: seconds and peak RSS (measured when the export is made; exports are cached under
``$TMPDIR/audit-bench`` by the models' weights and the export code, so reruns reuse them; a new export deletes
the cached ones of the same models made by other export code, 6-8 GB each, before it starts).

    python benchmarks/realsize.py                                       # both targets, the defaults below
    python benchmarks/realsize.py --targets sd-1.5 --queries 2 --steps 4 --json real.json
    python benchmarks/realsize.py --profile                             # + onnxruntime op profile of a UNet step
    python benchmarks/realsize.py --json benchmarks/results/realsize.json --markdown   # the run the docs quote
    python benchmarks/realsize.py --from-json benchmarks/results/realsize.json         # its tables, nothing run

Every call's seconds and rows are recorded, so per-image figures hold however each path batches its calls.
``--markdown`` prints the tables the README and benchmarks/README.md show (a test checks they are the rendering
of ``benchmarks/results/realsize.json``).

The eager path is what a user writes: ``DiffusionPipeline.from_pretrained`` (SDPA attention, diffusers' default),
``CLIPModel`` (SDPA) and ``BlipForConditionalGeneration`` (eager attention; transformers has no SDPA for it), one
prompt per image with its own seeded generator, ``guidance_scale=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import _reset_peak, _rss_mib, _status_mib, matmul_flops  # noqa: E402  (the toy benchmark's helpers)

CAPTIONS = ["a red double-decker bus driving down a city street", "a bowl of green apples on a wooden table",
            "a dog running on a sandy beach at sunset", "a snowy mountain above a quiet lake"]


def _queries(n: int, resolution: int):
    from audit.export.components import _probe_images

    return _probe_images(resolution, n), [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


class Timers:
    """Seconds and rows of every call of named functions, wrapped in place."""

    def __init__(self):
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.rows: dict[str, list[int]] = defaultdict(list)
        self.peak: dict | None = None  # the call during which the process's peak RSS (VmHWM) was last raised

    def begin(self) -> tuple[float, float, float]:
        return time.perf_counter(), _status_mib("VmRSS"), _status_mib("VmHWM")

    def end(self, name: str, start: tuple[float, float, float], rows: int) -> None:
        t, rss, hwm = start
        self.calls[name].append(time.perf_counter() - t)
        self.rows[name].append(rows)
        now = _status_mib("VmHWM")  # two reads of /proc per call: no sampling thread competing for the cores
        # An enclosing call that ends at the same mark leaves the innermost call named.
        if now > hwm and (self.peak is None or now > self.peak["peak_mib"]):
            self.peak = {"call": name, "rss_before_mib": rss, "peak_mib": now}

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            start = self.begin()
            try:
                return fn(*a, **kw)
            finally:
                self.end(name, start, _rows(a, kw))

        setattr(owner, attr, timed)

    def hook(self, module, name: str) -> None:
        """Time a module's forward with hooks (generate() inspects forward's signature: it must stay as it is)."""
        start: list[tuple[tuple[float, float, float], int]] = []
        module.register_forward_pre_hook(lambda _, a, kw: start.append((self.begin(), _rows(a, kw))),
                                         with_kwargs=True)
        module.register_forward_hook(lambda *_: self.end(name, *start.pop()))

    def summary(self, skip: dict[str, int]) -> dict:
        """Median seconds and rows per call and number of calls, leaving out each name's first ``skip`` (warm-up)
        calls."""
        out = {}
        for name, times in self.calls.items():
            n = skip.get(name, 0) if len(times) > skip.get(name, 0) else 0
            out[name] = {"median_s": statistics.median(times[n:]), "calls": len(times) - n,
                         "rows_per_call": statistics.median(self.rows[name][n:])}
        return out


def _rows(args: tuple, kwargs: dict) -> int:
    """The batch dimension of a call's first array argument (positional or keyword)."""
    for v in (*args, *kwargs.values()):
        shape = getattr(v, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    return 1


# --- workers (one subprocess each) ---------------------------------------------------------------------------------

def worker_eager(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DiffusionPipeline
    from transformers import BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor

    from audit.seeding import image_seeds

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    t = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.target, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained(args.embedder, use_safetensors=True).eval()
    clip_proc = CLIPProcessor.from_pretrained(args.embedder)
    blip = BlipForConditionalGeneration.from_pretrained(args.captioner, use_safetensors=True).eval()
    blip_proc = BlipProcessor.from_pretrained(args.captioner)
    load_s = time.perf_counter() - t
    text = getattr(pipe, "text_encoder", None) or pipe.bert
    vae = getattr(pipe, "vae", None) or pipe.vqvae
    timers = Timers()
    for module, name in ((pipe.unet, "unet"), (text, "text_encoder"), (blip.vision_model, "blip_vision"),
                         (blip.text_decoder, "blip_decoder_step")):
        timers.hook(module, name)
    for owner, attr, name in ((vae, "decode", "vae_decoder"), (clip, "get_image_features", "clip_image"),
                              (clip, "get_text_features", "clip_text")):
        timers.wrap(owner, attr, name)
    resolution = int(pipe.unet.config.sample_size) * 8
    feat = lambda out: getattr(out, "pooler_output", out)  # noqa: E731  (transformers 5 returns a ModelOutput)

    @torch.inference_mode()
    def featurise(images, captions, steps):
        prompts = [c for c in captions for _ in range(args.n_gen)]
        gens = [torch.Generator().manual_seed(s) for c in captions for s in image_seeds(args.seed, c, args.n_gen)]
        gen = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, generator=gens, output_type="np",
                   height=resolution, width=resolution).images
        gen = (np.asarray(gen) * 255).round().clip(0, 255).astype(np.uint8)
        px = blip_proc(images=list(gen), return_tensors="pt").pixel_values
        ids = blip.generate(pixel_values=px, max_new_tokens=args.caption_tokens, do_sample=False, num_beams=1)
        gen_caps = [c.strip() for c in blip_proc.batch_decode(ids, skip_special_tokens=True)]
        px = clip_proc(images=list(images) + list(gen), return_tensors="pt").pixel_values
        img_emb = F.normalize(feat(clip.get_image_features(pixel_values=px)), dim=-1).numpy()
        tok = clip_proc.tokenizer(list(captions) + gen_caps, padding=True, truncation=True, return_tensors="pt")
        txt_emb = F.normalize(feat(clip.get_text_features(**tok)), dim=-1).numpy()
        return gen, img_emb, txt_emb

    return _measure(featurise, args, timers, resolution, load_s,
                    {"attention": {"unet": type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))])
                                   .__name__, "clip": clip.config._attn_implementation,
                                   "blip": blip.config._attn_implementation}})


def worker_runtime(args) -> dict:
    import numpy as np
    import torch

    from audit.runtime import Graph, OnnxCaptioner, OnnxEmbedder, OnnxGenerator, RuntimeOptions

    torch.set_num_threads(args.threads)  # torch only draws the initial latents here
    timers = Timers()
    run = Graph.run

    def timed_run(graph, **feeds):
        start = timers.begin()
        try:
            return run(graph, **feeds)
        finally:
            timers.end(f"{graph.path.parent.name}/{graph.path.stem}", start, _rows((), feeds))

    Graph.run = timed_run
    opts = RuntimeOptions(intra_op_threads=args.threads)
    root = Path(args.export)
    t = time.perf_counter()
    gen_model = OnnxGenerator(root, opts)
    embedder = OnnxEmbedder(root / "embedder", opts)
    captioner = OnnxCaptioner(root / "captioner", opts)
    load_s = time.perf_counter() - t

    def featurise(images, captions, steps):
        gen = gen_model.generate(captions, args.n_gen, args.seed, steps)
        flat = gen.reshape(-1, *gen.shape[2:])
        gen_caps = captioner.caption(flat, max_new_tokens=args.caption_tokens)
        img_emb = embedder.embed_images(np.concatenate([images, flat]))
        txt_emb = embedder.embed_texts(list(captions) + gen_caps)
        return flat, img_emb, txt_emb

    return _measure(featurise, args, timers, gen_model.resolution, load_s, {})


def _measure(featurise, args, timers: Timers, resolution: int, load_s: float, extra: dict) -> dict:
    import numpy as np

    images, captions = _queries(args.queries, resolution)
    loaded, load_peak = _status_mib("VmRSS"), _rss_mib()
    _reset_peak()  # from here VmHWM (and ru_maxrss) is the featurisation's peak
    featurise(images[:1], captions[:1], 1)  # warm-up: first calls allocate, pack weights, pick kernels
    skip = {k: len(v) for k, v in timers.calls.items()}
    start = time.perf_counter()
    outputs = [featurise(images[a:a + args.batch_size], captions[a:a + args.batch_size], args.steps)
               for a in range(0, args.queries, args.batch_size)]
    seconds = time.perf_counter() - start
    np.savez(args.out_arrays, gen=np.concatenate([o[0].reshape(-1, *o[0].shape[-3:]) for o in outputs]),
             img_emb=np.concatenate([o[1] for o in outputs]), txt_emb=np.concatenate([o[2] for o in outputs]))
    return {"seconds": seconds, "seconds_per_query": seconds / args.queries, "load_seconds": load_s,
            "rss_after_load_mib": loaded, "peak_rss_load_mib": load_peak, "peak_rss_work_mib": _status_mib("VmHWM"),
            "peak_rss_process_mib": max(load_peak, _status_mib("VmHWM")), "calls": timers.summary(skip),
            "peak_call": timers.peak, **extra}


def worker_flops(args) -> dict:
    """fp32 matmul throughput on these threads; UNet and VAE-decoder FLOPs per image, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    peak = matmul_flops(2048)
    target = Path(args.target)
    unet_cfg = UNet2DConditionModel.load_config(target / "unet")
    vae_cfg = AutoencoderKL.load_config(target / ("vae" if (target / "vae").is_dir() else "vqvae"))
    s, dim = int(unet_cfg["sample_size"]), int(unet_cfg["cross_attention_dim"])
    with torch.device("meta"):  # counted, not computed: nothing is allocated
        meta_unet = UNet2DConditionModel.from_config(unet_cfg)
        meta_vae = AutoencoderKL.from_config(vae_cfg)
        with FlopCounterMode(display=False) as counter:
            meta_unet(torch.randn(1, 4, s, s), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, dim))
        unet_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            meta_vae.decode(torch.randn(1, int(vae_cfg["latent_channels"]), s, s))
        vae_flops = counter.get_total_flops()
    return {"matmul_gflops": peak / 1e9, "unet_gflop_per_image": unet_flops / 1e9,
            "vae_decode_gflop_per_image": vae_flops / 1e9}


def worker_export(args) -> dict:
    from audit.export import ExportConfig, export_all

    t = time.perf_counter()
    export_all(ExportConfig(target=args.target, embedder=args.embedder, captioner=args.captioner), args.export,
               quiet=True)
    return {"export_seconds": time.perf_counter() - t, "export_peak_rss_mib": _rss_mib()}


def worker_profile(args) -> dict:
    """onnxruntime's op profile of one UNet step and one VAE decode: kernel time by op type."""
    import numpy as np
    import onnxruntime as ort

    from audit.runtime.session import Graph, RuntimeOptions

    out = {}
    target = Path(args.export) / "target"
    context = Graph(target / "unet_context.onnx", RuntimeOptions(intra_op_threads=args.threads))
    rows = args.batch_size * args.n_gen
    rng = np.random.default_rng(0)
    feeds_by_graph = {}
    s = context.session.get_inputs()[0].shape
    cross = context.run(encoder_hidden_states=rng.standard_normal((rows, s[1], s[2])).astype(np.float32))
    for name in ("unet", "vae_decoder"):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"audit-profile-{name}")
        sess = ort.InferenceSession(str(target / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        if name == "unet":
            latent = sess.get_inputs()[0].shape
            feeds = {"sample": rng.standard_normal((rows, *latent[1:])).astype(np.float32),
                     "timestep": np.full(rows, 500, np.int64), **cross}
        else:
            latent = sess.get_inputs()[0].shape
            feeds = {"latents": rng.standard_normal((1, *latent[1:])).astype(np.float32)}
        feeds_by_graph[name] = feeds
        sess.run(None, feeds)  # the first call profiles allocation too; the second is the one read
        sess.run(None, feeds)
        trace_file = Path(sess.end_profiling())
        trace = json.loads(trace_file.read_text())
        trace_file.unlink()
        runs = [e for e in trace if e.get("name") == "model_run"]
        last_start = runs[-1]["ts"] if runs else 0
        by_op: dict[str, float] = defaultdict(float)
        for e in trace:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last_start:
                by_op[e["args"]["op_name"]] += e["dur"] / 1e6
        total = sum(by_op.values())
        out[name] = {"rows": len(next(iter(feeds.values()))), "kernel_seconds": total,
                     "by_op": {k: round(v / total, 3) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:8]}}
    return out


WORKERS = {"eager": worker_eager, "runtime": worker_runtime, "flops": worker_flops, "export": worker_export,
           "profile": worker_profile}


# --- driver --------------------------------------------------------------------------------------------------------

def _export_for(world: dict, root: Path, args) -> tuple[Path, dict]:
    """The cached export of a world (keyed by its weights and the export code); made now, measured, if missing."""
    import hashlib

    import audit.export
    from audit.manifest import weights_hash

    sources = sorted(Path(audit.export.__file__).parent.glob("*.py"))
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:8]
    ids = "-".join(weights_hash(world[k])[:8] for k in ("target", "embedder", "captioner"))
    folder = root / f"{ids}-{code}"
    record = folder.with_name(folder.name + ".bench.json")
    if not (folder / "export.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f"{ids}-*"):  # other export code: never read again, and 6-8 GB each
            if stale != folder and stale != record:
                print(f"removing the stale cached export {stale}", file=sys.stderr)
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        result = _run_worker("export", args, world, folder)
        record.write_text(json.dumps(result) + "\n")
    measured = json.loads(record.read_text()) if record.is_file() else {}
    return folder, measured


def _run_worker(name: str, args, world: dict, export: Path, arrays: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--target", str(world["target"]), "--embedder",
           str(world["embedder"]), "--captioner", str(world["captioner"]), "--export", str(export),
           "--queries", str(args.queries), "--batch-size", str(args.batch_size), "--n-gen", str(args.n_gen),
           "--steps", str(args.steps), "--threads", str(args.threads), "--seed", str(args.seed),
           "--caption-tokens", str(args.caption_tokens), "--out-arrays", str(arrays or os.devnull)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               DIFFUSERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


UNET = {"eager": "unet", "runtime": "target/unet"}
VAE = {"eager": "vae_decoder", "runtime": "target/vae_decoder"}
EAGER_FOR = {"target/text_encoder": "text_encoder", "target/unet": "unet", "target/vae_decoder": "vae_decoder",
             "captioner/vision_encoder": "blip_vision", "captioner/decoder_step": "blip_decoder_step",
             "embedder/image_encoder": "clip_image", "embedder/text_encoder": "clip_text"}


def _gib(mib: float, digits: int = 2) -> str:
    return f"{mib / 1024:.{digits}f}"


def _report(name: str, r: dict, args) -> None:
    e, o, f = r["eager"], r["runtime"], r["flops"]
    gib = _gib
    print(f"\n== {name}: {args.queries} queries, {args.batch_size} captions a batch, n_gen {args.n_gen}, "
          f"{args.steps} DDIM steps, captions <= {args.caption_tokens} tokens, {args.threads} threads")
    print(f"{'':34}{'eager':>12}{'runtime':>12}{'eager/runtime':>15}")
    rows = (("seconds per query", e["seconds_per_query"], o["seconds_per_query"], ".1f"),
            ("load seconds", e["load_seconds"], o["load_seconds"], ".0f"),
            ("RSS after loading (GiB)", e["rss_after_load_mib"], o["rss_after_load_mib"], "gib"),
            ("peak RSS loading (GiB)", e["peak_rss_load_mib"], o["peak_rss_load_mib"], "gib"),
            ("peak RSS featurising (GiB)", e["peak_rss_work_mib"], o["peak_rss_work_mib"], "gib"),
            ("peak RSS of the process (GiB)", e["peak_rss_process_mib"], o["peak_rss_process_mib"], "gib"))
    for label, a, b, fmt in rows:
        fa, fb = (gib(a), gib(b)) if fmt == "gib" else (format(a, fmt), format(b, fmt))
        print(f"{label:34}{fa:>12}{fb:>12}{a / b:>14.2f}x")
    for label, w in (("eager", e), ("runtime", o)):
        p = w.get("peak_call")
        if p:
            print(f"peak RSS featurising, {label}: during {p['call']}, {gib(p['rss_before_mib'])} GiB resident "
                  f"before it + {gib(p['peak_mib'] - p['rss_before_mib'])} GiB during it")
    print("median seconds per call (rows per call in brackets, then the number of calls):")
    for graph, eager_name in EAGER_FOR.items():
        a, b = e["calls"].get(eager_name), o["calls"].get(graph)
        if a and b:
            print(f"  {graph:32}{a['median_s']:>9.3f} [{a['rows_per_call']:g}]{b['median_s']:>9.3f} "
                  f"[{b['rows_per_call']:g}]   (calls {a['calls']} / {b['calls']})")
    for label, w in (("eager", e), ("runtime", o)):
        s, frac = _per_image(w, UNET[label]), _matmul_fraction(r, label)
        print(f"UNet {label}: {s:.2f} s per image per step = {frac:.0%} of the machine's "
              f"{f['matmul_gflops']:.0f} GFLOP/s fp32 matmul ({f['unet_gflop_per_image']:.0f} GFLOP per image)")
    print(f"VAE decoder: {f['vae_decode_gflop_per_image']:.0f} GFLOP per image")
    x = r.get("export", {})
    if x:
        print(f"export: {x['export_seconds'] / 60:.1f} min, peak RSS {gib(x['export_peak_rss_mib'])} GiB")
    print(f"outputs agree: generated images within {r['agreement']['images_max_abs_uint8']} uint8 levels, image "
          f"embeddings within {r['agreement']['image_emb_max_abs']:.1e}")
    if "profile" in r:
        for graph, p in r["profile"].items():
            shares = ", ".join(f"{k} {v:.0%}" for k, v in p["by_op"].items())
            print(f"profile {graph} ({p['rows']} rows, {p['kernel_seconds']:.1f} s of kernels): {shares}")


def _per_image(worker: dict, call: str) -> float:
    """Median seconds per row of a call (per image for the UNet and the VAE decoder)."""
    c = worker["calls"][call]
    return c["median_s"] / c["rows_per_call"]


def _matmul_fraction(r: dict, path: str) -> float:
    f = r["flops"]
    return f["unet_gflop_per_image"] / _per_image(r[path], UNET[path]) / f["matmul_gflops"]


TITLES = {"sd-1.5": ("Stable Diffusion 1.5, 512 px", "SD-1.5"), "ldm-256": ("LDM-256 (the paper's target)", "LDM-256")}


def markdown(results: dict) -> str:
    return "\n".join(sections(results).values())


def sections(results: dict) -> dict[str, str]:
    """What the docs quote from one run's results (``--json``): the README's summary table, benchmarks/README.md's
    full table and docs/cluster.md's projection of a million queries (SD-1.5)."""
    names = [n for n in TITLES if n in results]
    gib = lambda mib: _gib(mib, 1)  # noqa: E731
    out = ["| target | eager s / query | runtime s / query | ratio | UNet step ratio | peak RSS eager / runtime |",
           "|---|---|---|---|---|---|"]
    for n in names:
        e, o = results[n]["eager"], results[n]["runtime"]
        out.append(f"| {TITLES[n][0]} | {e['seconds_per_query']:.1f} | {o['seconds_per_query']:.1f} | "
                   f"{e['seconds_per_query'] / o['seconds_per_query']:.2f}x | "
                   f"{_per_image(e, UNET['eager']) / _per_image(o, UNET['runtime']):.2f}x | "
                   f"{gib(e['peak_rss_process_mib'])} / {gib(o['peak_rss_process_mib'])} GiB |")
    summary, out = "\n".join(out) + "\n", []
    out += ["| | " + " | ".join(f"{TITLES[n][1]}, {p}" for n in names for p in ("eager", "runtime", "ratio"))
            + " |", "|---" * (1 + 3 * len(names)) + "|"]

    def row(label: str, cell) -> None:
        out.append(f"| {label} | " + " | ".join(c for n in names for c in cell(results[n])) + " |")

    def ratio(a: float, b: float, bold: bool = False) -> str:
        return f"**{a / b:.2f}x**" if bold else f"{a / b:.2f}x"

    def peak_call(w: dict) -> str:
        p = w["peak_call"]
        return f"{p['call']} ({gib(p['rss_before_mib'])} + {gib(p['peak_mib'] - p['rss_before_mib'])} GiB)"

    row("seconds per query", lambda r: (f"{r['eager']['seconds_per_query']:.1f}",
                                        f"{r['runtime']['seconds_per_query']:.1f}",
                                        ratio(r['eager']['seconds_per_query'], r['runtime']['seconds_per_query'],
                                              True)))
    for label, calls in (("UNet, s per image per step", UNET), ("VAE decode, s per image", VAE)):
        row(label, lambda r, c=calls: (f"{_per_image(r['eager'], c['eager']):.2f}",
                                       f"{_per_image(r['runtime'], c['runtime']):.2f}",
                                       ratio(_per_image(r['eager'], c['eager']),
                                             _per_image(r['runtime'], c['runtime']))))
    row("images per call: UNet, VAE decode", lambda r: tuple(
        f"{r[p]['calls'][UNET[p]]['rows_per_call']:g}, {r[p]['calls'][VAE[p]]['rows_per_call']:g}"
        for p in ("eager", "runtime")) + ("",))
    row("UNet, fraction of the machine's fp32 matmul throughput",
        lambda r: (f"{_matmul_fraction(r, 'eager'):.0%}", f"{_matmul_fraction(r, 'runtime'):.0%}", ""))
    row("RSS after loading (GiB)", lambda r: (_gib(r["eager"]["rss_after_load_mib"]),
                                              _gib(r["runtime"]["rss_after_load_mib"]), ""))
    row("peak RSS, whole process (GiB)", lambda r: (
        f"**{_gib(r['eager']['peak_rss_process_mib'])}**", f"**{_gib(r['runtime']['peak_rss_process_mib'])}**",
        f"runtime {r['runtime']['peak_rss_process_mib'] / r['eager']['peak_rss_process_mib']:.2f}x"))
    row("call at the peak (resident before + during)", lambda r: (peak_call(r["eager"]), peak_call(r["runtime"]), ""))
    row("export with CLIP ViT-L/14 + BLIP base", lambda r: ("", (
        f"{r['export']['export_seconds'] / 60:.1f} min, peak {gib(r['export']['export_peak_rss_mib'])} GiB"
        if r.get("export") else "cached, not measured"), ""))
    facts = "; ".join(
        f"{TITLES[n][1]}: images within {results[n]['agreement']['images_max_abs_uint8']} uint8 levels, image "
        f"embeddings within {results[n]['agreement']['image_emb_max_abs']:.1e}, matmul yardstick "
        f"{results[n]['flops']['matmul_gflops']:.0f} GFLOP/s, load average "
        f"{results[n]['load_average'][0]:.1f}-{results[n]['load_average'][1]:.1f}" for n in names)
    out += ["", f"Eager and runtime agree ({facts})."]
    found = {"README.md": summary, "benchmarks/README.md": "\n".join(out) + "\n"}
    if "sd-1.5" in results:
        found["docs/cluster.md"] = projection(results["sd-1.5"])
    return found


def _commit() -> str:
    """The code measured: HEAD, marked when the tree has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                                                   else "")


def projection(r: dict, queries: float = 1e6, n_gen: int = 2, steps: int = 25, fewer_steps: int = 10) -> str:
    """docs/cluster.md's cost of ``queries`` at the CLI's defaults from one target's runtime figures: the UNet step
    and VAE decode per image, and the rest of a query (encoding its caption, captioning and embedding) as measured
    less those two."""
    o = r["runtime"]
    unet, vae = _per_image(o, UNET["runtime"]), _per_image(o, VAE["runtime"])
    spent = sum(o["calls"][c]["median_s"] * o["calls"][c]["calls"] for c in (UNET["runtime"], VAE["runtime"]))
    rest = o["seconds_per_query"] - spent / r["settings"]["queries"]
    per = lambda k: n_gen * k * unet + n_gen * vae + rest  # noqa: E731
    hours = lambda k, workers=1: f"{float(f'{queries * per(k) / 3600 / workers:.2g}'):,.0f}"  # noqa: E731  (2 digits)
    mantissa, exponent = f"{queries * per(steps):.1e}".split("e")
    return "\n".join([
        "```text",
        "t_query = n_gen × steps × t_unet_step  +  n_gen × t_vae_decode  +  t_caption_embed",
        f"        = {n_gen} × {steps} × {unet:.2f} s  +  {n_gen} × {vae:.1f} s  +  {rest:.1f} s   "
        f"(the defaults: n_gen {n_gen}, {steps} steps, no guidance)",
        f"        = {per(steps):.0f} s{'':37}(guidance > 1 doubles the UNet term)",
        "```",
        "",
        f"{queries:,.0f} queries: {mantissa} × 10^{int(exponent)} s, about **{hours(steps)} machine-hours** of this "
        f"machine, {hours(steps, 10)} hours on 10 such workers and {hours(steps, 100)} on 100 (--steps {fewer_steps}: "
        f"{per(fewer_steps):.0f} s a query, {hours(fewer_steps)} machine-hours).",
    ]) + "\n"


def _merge(paths: list[Path]) -> dict:
    """One results dict from several ``--json`` files (a target in a later file replaces an earlier one)."""
    merged: dict = {}
    for path in paths:
        merged.update(_targets(json.loads(path.read_text())))
    return merged


def _targets(run: dict) -> dict:
    """A run's per-target results, each with the run's settings and load average."""
    load = [run["load_average_start"][0], run["load_average_end"][0]]
    return {k: dict(v, settings=run["settings"], load_average=load) for k, v in run.items() if k in TITLES}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="sd-1.5,ldm-256", help="comma-separated full-size targets")
    p.add_argument("--queries", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2, help="captions per batch")
    p.add_argument("--n-gen", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--caption-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile a UNet step and a VAE decode by op type")
    p.add_argument("--tiny", action="store_true", help="the same architectures at toy sizes (checks the script)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "audit-bench",
                   help="where exports are cached")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--markdown", action="store_true", help="also print the tables the docs quote")
    p.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                   help="print the tables the docs quote from these --json results, without running anything")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for name in ("--target", "--embedder", "--captioner", "--export"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--out-arrays", default=os.devnull, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    if args.from_json:
        print(markdown(_merge(args.from_json)), end="")
        return

    import numpy as np

    from audit.testing import fullsize

    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                            if k not in ("worker", "target", "embedder", "captioner", "export", "out_arrays")},
               "commit": _commit(), "load_average_start": os.getloadavg()}
    for name in args.targets.split(","):
        world = fullsize.world(name, tiny=args.tiny)
        export, measured = _export_for(world, args.cache, args)
        r: dict = {"export": measured, "world": {k: str(v) for k, v in world.items()}, "export_folder": str(export)}
        with tempfile.TemporaryDirectory() as tmp:
            for path in ("eager", "runtime"):
                r[path] = _run_worker(path, args, world, export, Path(tmp) / f"{path}.npz")
            a, b = np.load(Path(tmp) / "eager.npz"), np.load(Path(tmp) / "runtime.npz")
            r["agreement"] = {"images_max_abs_uint8": int(np.abs(a["gen"].astype(int) - b["gen"].astype(int)).max()),
                              "image_emb_max_abs": float(np.abs(a["img_emb"] - b["img_emb"]).max())}
        r["flops"] = _run_worker("flops", args, world, export)
        if args.profile:
            r["profile"] = _run_worker("profile", args, world, export)
        results[name] = r
        _report(name, r, args)
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at start {results['load_average_start'][0]:.1f}, at end "
          f"{results['load_average_end'][0]:.1f} ({os.cpu_count()} cores)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        print("\n" + markdown(_targets(results)), end="")


if __name__ == "__main__":
    main()
