"""Start-up cost of an `audit export` folder, side by side in one run: loading its graphs with onnxruntime's
optimisation at each load vs from the optimised graphs saved under $AUDIT_HOME (``RuntimeOptions.saved_graphs``),
and, given heads, `audit serve`'s time to ready beside `audit check`'s cold start on one image.

Every measurement is a fresh process (what a user pays), in alternating rounds: ``cold`` (saved graphs off),
``saved`` (from the saved graphs, written by a first ``save`` load that is timed too). With ``--heads``:
``audit serve --target EXPORT --heads HEADS`` until ``GET /v2/health/ready`` answers 200, both ways, and one
``audit check IMAGE --json`` on the export, both ways, and on ``--torch DIR`` (the folder it was exported from).

On the full-size SD-1.5 export (random weights, ``audit.testing.fullsize``: time only; its heads are throwaway
heads trained on a handful of rows of its own features, never attack results):

    python benchmarks/startup.py --export EXPORT --heads HEADS --torch SD_FOLDER --rounds 2 --json startup.json

``--graph FILE`` times one graph file the same way. ``--stand-in-unet SD_FOLDER --out DIR`` writes a diffusers UNet
to DIR/unet.onnx with torch's TorchScript exporter (minutes, where `audit export` of the whole SD-1.5 takes a quarter
of an hour and more): a stand-in for timing onnxruntime's load, not the export's graph.

    python -m audit.testing.fullsize sd-1.5      # prints the folder
    python benchmarks/startup.py --stand-in-unet FOLDER/unet --out unet-onnx
    python benchmarks/startup.py --graph unet-onnx/unet.onnx --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMPONENTS = ("target", "embedder", "captioner")


def _env(home: Path, saved: bool) -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "AUDIT_HOME": str(home),
                         "AUDIT_SAVED_GRAPHS": "1" if saved else "0"}


def worker_load(export: Path) -> dict:
    """Load every graph of the export as the runtime does (one Graph each), timing each."""
    from audit.runtime.folder import ExportFolder
    from audit.runtime.session import RuntimeOptions

    out = {}
    options = RuntimeOptions()
    for component in COMPONENTS:
        folder = ExportFolder(export / component)
        for graph in sorted(folder.path.glob("*.onnx")):
            t = time.perf_counter()
            g = folder.load_graph(graph.stem, options)
            out[f"{component}/{graph.stem}"] = round(time.perf_counter() - t, 2)
            del g
    return out


def worker_graph(path: Path) -> dict:
    from audit.runtime.session import Graph, RuntimeOptions

    t = time.perf_counter()
    Graph(path, RuntimeOptions())
    return {path.name: round(time.perf_counter() - t, 2)}


def stand_in_unet(folder: str, out: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    class Step(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.u = unet

        def forward(self, x, t, c):
            return self.u(x, t, encoder_hidden_states=c, return_dict=False)[0]

    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    args = (torch.randn(1, unet.config.in_channels, side, side), torch.tensor([500]), torch.randn(1, 77, width))
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(Step(unet), args, str(out / "unet.onnx"), input_names=["x", "t", "c"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "c": {0: "batch"}, "y": {0: "batch"}}, opset_version=17,
                          dynamo=False, external_data=True)


def _load_run(export: Path, home: Path, mode: str, graph: bool = False) -> dict:
    if mode == "save":
        shutil.rmtree(home / "ort-optimized", ignore_errors=True)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--worker-graph" if graph else "--worker-load", str(export)],
                       env=_env(home, mode != "cold"),
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr)
    graphs = json.loads(r.stdout.strip().splitlines()[-1])
    result = {"mode": mode, "process_s": round(time.perf_counter() - t, 1), "graphs_s": round(sum(graphs.values()), 1),
              "per_graph_s": graphs}
    print(f"load {mode:>5}: graphs {result['graphs_s']:.1f} s (process {result['process_s']:.1f} s) "
          f"{graphs}", flush=True)
    return result


def _ready(target: str, heads: Path, home: Path, saved: bool) -> float:
    from benchmarks.service import _start

    proc, _, ready = _start(["--heads", str(heads), "--db", str(home / "evidence.db")], home, env=_env(home, saved),
                            target=target)
    proc.terminate()
    proc.wait(120)
    print(f"serve ready ({'saved' if saved else 'cold'}, {target}): {ready:.1f} s", flush=True)
    return round(ready, 1)


def _check(target: str, heads: Path, image: Path, caption: str, home: Path, saved: bool) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "audit.cli", "check", str(image), "--caption", caption, "--target", target,
                    "--heads", str(heads), "--json"], env=_env(home, saved), check=True, capture_output=True)
    s = time.perf_counter() - t
    print(f"check ({'saved' if saved else 'cold'}, {target}): {s:.1f} s", flush=True)
    return round(s, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, help="An `audit export` folder.")
    ap.add_argument("--graph", type=Path, help="One ONNX graph file, in place of --export.")
    ap.add_argument("--stand-in-unet", help="Write a diffusers UNet folder's stand-in graph to --out, then stop.")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--heads", type=Path, help="Heads for its target: also time serve and check.")
    ap.add_argument("--torch", help="The folder the export was made from: also time check on it.")
    ap.add_argument("--image", type=Path, help="Image to check (default: a toy scene).")
    ap.add_argument("--caption", default="a photograph of a red bicycle leaning on a wall")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--home", type=Path, help="AUDIT_HOME to use (default: a temporary one, removed afterwards).")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker-load", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--worker-graph", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker_load or a.worker_graph:
        print(json.dumps(worker_load(a.worker_load) if a.worker_load else worker_graph(a.worker_graph)))
        return
    if a.stand_in_unet:
        if not a.out:
            ap.error("--stand-in-unet needs --out")
        stand_in_unet(a.stand_in_unet, a.out)
        return
    if not (a.export or a.graph):
        ap.error("--export or --graph is required")
    source, graph = (a.graph, True) if a.graph else (a.export, False)
    with tempfile.TemporaryDirectory(prefix="audit-bench-startup-") as tmp:
        home = a.home or Path(tmp) / "home"
        home.mkdir(parents=True, exist_ok=True)
        loads = [_load_run(source, home, "save", graph)]
        for _ in range(a.rounds):
            loads += [_load_run(source, home, "cold", graph), _load_run(source, home, "saved", graph)]
        result: dict = {"export": str(source), "loads": loads}
        if a.heads and a.export:
            image = a.image or _toy_image(Path(tmp))
            result["serve_ready_s"] = {"cold": _ready(str(a.export), a.heads, home, False),
                                       "saved": _ready(str(a.export), a.heads, home, True)}
            result["check_s"] = {"export_cold": _check(str(a.export), a.heads, image, a.caption, home, False),
                                 "export_saved": _check(str(a.export), a.heads, image, a.caption, home, True)}
            if a.torch:
                result["check_s"]["torch"] = _check(a.torch, a.heads, image, a.caption, home, False)
        result["load_average"] = [round(x, 1) for x in os.getloadavg()]
        result["cpus"] = os.cpu_count()
    print(markdown(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


def _toy_image(folder: Path) -> Path:
    from PIL import Image

    from audit.toy import scenes

    images, _ = scenes.scene_images(11, "members", 1)
    path = folder / "query.png"
    Image.fromarray(images[0]).save(path)
    return path


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def markdown(result: dict) -> str:
    by = {m: [r for r in result["loads"] if r["mode"] == m] for m in ("save", "cold", "saved")}
    graphs = list(by["cold"][0]["per_graph_s"])
    lines = ["| graph | optimised at load (s) | first load, saving (s) | from the saved graph (s) |", "|---|---|---|---|"]
    for g in [*graphs, "all graphs"]:
        def cell(rs):
            return _median([r["graphs_s"] if g == "all graphs" else r["per_graph_s"][g] for r in rs])
        lines.append(f"| {g} | {cell(by['cold']):.1f} | {cell(by['save']):.1f} | {cell(by['saved']):.1f} |")
    lines.append("")
    lines.append(f"Medians of {len(by['cold'])} alternating rounds, one process each; load average "
                 f"{result['load_average']} on {result['cpus']} CPUs.")
    if "serve_ready_s" in result:
        s, c = result["serve_ready_s"], result["check_s"]
        lines.append(f"Time to ready (`audit serve`): {s['cold']:.0f} s optimising at load, {s['saved']:.0f} s from "
                     f"saved graphs. One `audit check` process, one image: export {c['export_cold']:.0f} s / "
                     f"{c['export_saved']:.0f} s" + (f", torch folder {c['torch']:.0f} s" if "torch" in c else "")
                     + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
