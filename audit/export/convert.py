"""Export one spec to ONNX with the dynamo exporter, then validate it against PyTorch in onnxruntime."""

from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError
from ..manifest import file_sha256
from .specs import ONNX_TRANSLATIONS, ExportSpec

log = logging.getLogger(__name__)

# 20: ONNX Gelu is one onnxruntime kernel (at 18 it decomposes into Div/Erf/Add/Mul): toy UNet step 3-4% and BLIP
# 8-12% faster, the other graphs unchanged. (23 was slower: its Attention/GroupNormalization ops.)
OPSET = 20
# Graphs whose weights exceed this are written as ``NAME.onnx`` + ``NAME.onnx.data`` (ONNX external data) whatever
# their precision: a protobuf file cannot pass 2 GiB, and an fp16 SD UNet (1.7 GB) should not sit just under it.
EXTERNAL_DATA_BYTES = 1 << 30
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _dims(spec: ExportSpec) -> dict[str, torch.export.Dim]:
    bounds = spec.dim_bounds()
    names = {name for axes in spec.inputs.values() for name in axes.values()}
    dims = {}
    for name in sorted(names):
        lo, hi = bounds.get(name, (1, 4096))
        dims[name] = torch.export.Dim(name.replace("+", "_plus_"), min=lo, max=hi)
    return dims


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's optimiser passes log every rewrite at INFO; keep -v output about audit's own progress."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def exact_fp32():
    """PyTorch on CUDA without TF32 while exporting and validating: the reference must be true fp32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _group_varargs(module: torch.nn.Module, per_input: list) -> tuple:
    """torch.export wants ``*args`` of ``forward`` as one nested entry of ``dynamic_shapes``."""
    params = list(inspect.signature(module.forward).parameters.values())
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return (*per_input[: len(named)], tuple(per_input[len(named):]))
    return tuple(per_input)


def _cast(feeds: dict[str, torch.Tensor], device: str, precision: str) -> dict[str, torch.Tensor]:
    dtype = _DTYPES[precision]
    return {k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in feeds.items()}


def prepare_module(spec: ExportSpec, device: str = "cpu", precision: str = "fp32") -> torch.nn.Module:
    """The module to export, on ``device`` in ``precision``. Casting to fp16 works on a copy: ``.to()`` is in
    place, and the torch models still serve as the reference of the end-to-end checks."""
    module = spec.module().eval()
    if precision != "fp32":
        module = copy.deepcopy(module)
    return module.to(device=device, dtype=_DTYPES[precision])


def export_spec(spec: ExportSpec, folder: Path, device: str = "cpu", precision: str = "fp32",
                opset: int = OPSET, module: torch.nn.Module | None = None) -> dict:
    """Write ``folder/<spec.name>.onnx`` (plus ``.onnx.data`` for graphs over 2 GB) and return its record."""
    path = folder / f"{spec.name}.onnx"
    module = module if module is not None else prepare_module(spec, device, precision)
    example = _cast(spec.example_inputs(2), device, precision)
    dims = _dims(spec)
    dynamic_shapes = _group_varargs(module, [{axis: dims[name] for axis, name in spec.inputs[k].items()}
                                             for k in spec.inputs])
    start = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's concern
        program = torch.onnx.export(module, tuple(example[k] for k in spec.inputs), dynamo=True,
                                    dynamic_shapes=dynamic_shapes, input_names=list(spec.inputs),
                                    output_names=list(spec.outputs), opset_version=opset, optimize=True,
                                    custom_translation_table=ONNX_TRANSLATIONS, verbose=False)
    if program is None:
        raise ArtifactError(f"{path}: the ONNX exporter returned no program for {spec.name}")
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    program.save(str(path), external_data=weights > EXTERNAL_DATA_BYTES)
    del program  # the exported program holds a graph as large as the weights; validation needs the room
    _forget_last_matches()
    seconds = time.perf_counter() - start
    files = [p.name for p in (path, path.with_name(path.name + ".data")) if p.exists()]
    log.info("exported %s in %.1f s", path, seconds)
    return {
        "file": path.name,
        "files": {name: file_sha256(folder / name) for name in files},
        "opset": opset,
        "precision": precision,
        "input_names": list(spec.inputs),  # graph order (the dicts below are saved with sorted keys)
        "output_names": list(spec.outputs),
        "inputs": {k: _describe(example[k], spec.inputs[k]) for k in spec.inputs},
        "outputs": {k: {"dynamic_axes": {str(a): n for a, n in spec.outputs[k].items()}} for k in spec.outputs},
        "tolerance": spec.tolerance(precision),
        "export_seconds": round(seconds, 2),
    }


def _forget_last_matches() -> None:
    """Let go of the exported graph for good. onnxscript's optimiser rules are module-level objects whose pattern
    matchers keep their last match (graph, nodes, bindings), and through it every initializer of the model just
    exported: the torch weights stayed alive until the next export (SD's UNet: 3.4 GB through its validation and
    the VAE's export)."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, PatternMatcher):
            for attr in ("_graph", "_tracer", "_match"):  # each set afresh at the start of a match
                obj.__dict__.pop(attr, None)
            if "_current_node" in obj.__dict__:
                obj._current_node = None
    gc.collect()


def _describe(t: torch.Tensor, axes: dict[int, str]) -> dict:
    shape = [axes.get(i, int(s)) for i, s in enumerate(t.shape)]
    return {"shape": shape, "dtype": str(t.dtype).replace("torch.", ""),
            "dynamic_axes": {str(a): n for a, n in axes.items()}}


def reference_outputs(spec: ExportSpec, module: torch.nn.Module, device: str = "cpu",
                      precision: str = "fp32") -> list[tuple[dict, tuple]]:
    """(inputs, PyTorch's outputs) for every validation input of ``spec``: computed before the graph is loaded, so
    that the caller can free the module first and the export holds one copy of the weights at a time."""
    refs = []
    for feeds in spec.validation_inputs():
        feeds = _cast(feeds, device, precision)
        refs.append((feeds, tuple(e.float().cpu() for e in _reference(module, spec, feeds))))
    return refs


def validate_spec(spec: ExportSpec, folder: Path, record: dict, session_factory, device: str = "cpu",
                  precision: str = "fp32", module: torch.nn.Module | None = None,
                  references: list[tuple[dict, tuple]] | None = None) -> dict:
    """Run the graph and PyTorch on inputs of other sizes than traced; every output within tolerance or raise.
    ``references`` (``reference_outputs``) are PyTorch's outputs made beforehand; without them they are made now
    from ``module``. On the CPU each graph call's peak memory is measured too (``record["memory"]``, see
    ``runtime.memory``)."""
    from ..runtime.memory import linear_fit, measure_peak, release_free_heap

    path = folder / record["file"]
    if references is None:
        module = module if module is not None else prepare_module(spec, device, precision)
        references = reference_outputs(spec, module, device, precision)
        release_free_heap()  # PyTorch's freed buffers must not serve the graph's calls whose peaks are measured
    session = session_factory(path)
    tol = record["tolerance"]
    worst = 0.0
    runs, rows, peaks = [], [], []
    for feeds, expected in references:
        got, peak, _ = measure_peak(lambda: session.run(None, {k: v.cpu().numpy() for k, v in feeds.items()}))
        for name, e, g in zip(spec.outputs, expected, got):
            e = e.numpy()
            g = np.asarray(g, np.float32)
            if e.shape != g.shape:
                raise ArtifactError(f"{path}: output {name} has shape {g.shape}, PyTorch gives {e.shape}")
            err = np.abs(g - e)
            bound = tol["atol"] + tol["rtol"] * np.abs(e)
            if not np.all(err <= bound) or not np.isfinite(g).all():
                raise ArtifactError(
                    f"{path}: output {name} differs from PyTorch by up to {float(err.max()):.3g} "
                    f"(tolerance atol {tol['atol']}, rtol {tol['rtol']}) on inputs "
                    f"{ {k: tuple(v.shape) for k, v in feeds.items()} }")
            worst = max(worst, float(err.max()) if err.size else 0.0)
        first = next(iter(spec.inputs))
        runs.append({first: list(feeds[first].shape)})
        rows.append(_rows(feeds, spec))
        peaks.append(peak)
    out = {**record, "validation": {"max_abs_err": worst, "passed": True, "inputs": runs, "device": device}}
    if device == "cpu" and None not in peaks:
        order = sorted(range(len(rows)), key=rows.__getitem__)
        out["memory"] = {"rows": [rows[i] for i in order], "peak_mib": [round(peaks[i] / 2**20, 1) for i in order],
                         **linear_fit([rows[i] for i in order], [peaks[i] for i in order])}
    return out


def _batch_axis(axes: dict[int, str]) -> int | None:
    return next((a for a, name in axes.items() if name == "batch"), None)


@torch.no_grad()
def _reference(module: torch.nn.Module, spec: ExportSpec, feeds: dict[str, torch.Tensor]) -> tuple:
    """PyTorch's outputs for ``feeds``, computed one batch row at a time: each graph is a function of each row
    alone, and the reference then needs one row's activations, not the whole batch's (at 512 px a VAE decode
    takes ~1.5 GB per image, on top of the compiled graph's own run)."""
    def call(part):
        out = module(*(part[k] for k in spec.inputs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    n = _rows(feeds, spec)
    if n <= 1:
        return call(feeds)
    rows = []
    for i in range(n):
        part = {}
        for k, v in feeds.items():
            axis = _batch_axis(spec.inputs.get(k, {}))
            part[k] = v if axis is None else v.narrow(axis, i, 1)
        rows.append(call(part))
    out = []
    for j, name in enumerate(spec.outputs):
        axis = _batch_axis(spec.outputs[name])
        out.append(rows[0][j] if axis is None else torch.cat([r[j] for r in rows], dim=axis))
    return tuple(out)


def _rows(feeds: dict[str, torch.Tensor], spec: ExportSpec) -> int:
    """The batch of a validation call: the size of the axis its inputs name ``batch``."""
    for name, axes in spec.inputs.items():
        axis = _batch_axis(axes)
        if axis is not None:
            return int(feeds[name].shape[axis])
    return 1
