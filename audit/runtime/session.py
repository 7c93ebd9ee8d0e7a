"""onnxruntime sessions: providers for a device, explicit thread counts, inputs cast to what the graph takes."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from ..config import Config, check_device
from ..errors import ArtifactError, UsageError

log = logging.getLogger(__name__)

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass
class RuntimeOptions(Config):
    """How sessions run. ``intra_op_threads`` 0 means $AUDIT_THREADS if set, else one per usable core; inter-op
    parallelism is off (the graphs are sequential chains, and a second pool only competes for the same cores)."""

    device: str = "cpu"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    tensorrt: bool = True  # with --device cuda, use TensorRT first when onnxruntime offers it
    # onnxruntime's CPU memory arena: ~10% faster on the toy benchmark (many small tensors), but each session keeps
    # its own high-water mark for good, so the peaks of all graphs add up instead of the largest counting. At SD's
    # shape one UNet step at batch 4 kept 7.8 GiB and the VAE decoder 2.5 GiB per 512 px image. So only small
    # graphs use it (see ``small``: the toy's); larger ones allocate per call and free at its end. False, or
    # $AUDIT_MEMORY_ARENA=0, turns it off everywhere.
    memory_arena: bool = True
    # Idle intra-op threads spin by default in onnxruntime. On a shared machine that burns the cores other work
    # needs: with the load of a few other processes on two cores, not spinning made the toy benchmark ~1.7x faster.
    spin: bool = False
    trt_cache_dir: str = ""  # TensorRT engine cache; default ~/.cache/audit/tensorrt
    # CUDA: TF32 matmuls/convs are faster on Ampere and later but round to 10-bit mantissas; off by default so the
    # GPU runtime reproduces the fp32 torch path.
    tf32: bool = False
    # CPU data parallelism: a graph whose every input and output leads with one shared dynamic batch axis runs as
    # this many sessions of threads/replicas intra-op threads each, on slices of the batch at once. One session
    # with N threads synchronises its pool on each of ~500 small ops of the toy UNet; N sessions of one thread
    # never wait for each other (UNet 90 vs 105 ms at batch 64 on 2 cores, VAE 120 vs 134, outputs bit-identical).
    # Each replica holds its own copy of the weights (and onnxruntime's pre-packed forms) and its own rows'
    # activations, so 0 (auto) replicates only small graphs (see ``small``); 1 turns it off; 0 reads $AUDIT_REPLICAS
    # if set.
    replicas: int = 0
    # A graph is small, and gets the arena and replicas, when its weights are under ``replicate_below_mib`` on disk
    # and the activations export measured per batch row under ``activations_below_mib``. SD's VAE decoder has
    # 198 MB of weights but needs 1.1 GiB per 512 px image: as two one-thread replicas it decoded one image a call
    # on one thread (25.4 s), as one session on two (see benchmarks/README.md).
    replicate_below_mib: int = 256
    activations_below_mib: int = 64
    # CPU: keep onnxruntime's optimised form of each graph of at least ``save_above_mib`` under
    # $AUDIT_HOME/ort-optimized and open that, with optimisation off, next time (``runtime.optimized``). A
    # full-size SD-1.5 UNet (3.4 GB) then loaded in 15 s instead of 56; the toy's graphs (13 MB and less) gained
    # nothing measurable, so they are not saved. $AUDIT_SAVED_GRAPHS=1 saves every graph, 0 none.
    saved_graphs: bool = True
    save_above_mib: int = 256

    def saves_graphs(self, graph_bytes: int) -> bool:
        env = os.environ.get("AUDIT_SAVED_GRAPHS", "")
        if env not in ("", "0", "1"):
            raise UsageError(f"AUDIT_SAVED_GRAPHS must be 0 or 1, got {env!r}")
        if self.device != "cpu":
            return False
        return env == "1" if env else self.saved_graphs and graph_bytes >= self.save_above_mib * 2**20

    def threads(self) -> int:
        return self.intra_op_threads if self.intra_op_threads > 0 else _env_count("AUDIT_THREADS") or usable_cores()

    def small(self, graph_bytes: int, per_item_mib: float | None = None) -> bool:
        return graph_bytes < self.replicate_below_mib * 2**20 and (per_item_mib or 0) < self.activations_below_mib

    def replicas_for(self, graph_bytes: int, per_item_mib: float | None = None) -> int:
        """Sessions for a splittable graph of this size: ``replicas``, else $AUDIT_REPLICAS, else automatic."""
        if self.device != "cpu":
            return 1
        chosen = self.replicas if self.replicas > 0 else _env_count("AUDIT_REPLICAS")
        if chosen:
            return min(chosen, self.threads())
        return self.threads() if self.small(graph_bytes, per_item_mib) else 1


def _env_count(name: str) -> int:
    """A positive integer from the environment, 0 when unset; a usage error naming the variable otherwise."""
    env = os.environ.get(name, "")
    if env and (not env.isdigit() or int(env) < 1):
        raise UsageError(f"{name} must be a positive integer, got {env!r}")
    return int(env) if env else 0


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def providers_for(options: RuntimeOptions) -> list:
    """Execution providers in priority order; a clear error when --device cuda cannot be honoured."""
    check_device(options.device)
    if options.device == "cpu":
        return ["CPUExecutionProvider"]
    have = available_providers()
    if "CUDAExecutionProvider" not in have:
        raise UsageError(
            "--device cuda needs onnxruntime-gpu and a CUDA GPU; this onnxruntime offers only "
            f"{', '.join(have)} (pip install 'audit[gpu]' in place of onnxruntime, on a machine with a GPU)")
    providers: list = []
    if options.tensorrt and "TensorrtExecutionProvider" in have:
        cache = Path(options.trt_cache_dir or Path.home() / ".cache" / "audit" / "tensorrt")
        cache.mkdir(parents=True, exist_ok=True)
        providers.append(("TensorrtExecutionProvider", {"trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache),
                                                        "trt_fp16_enable": True}))
    providers += [("CUDAExecutionProvider", {"use_tf32": int(options.tf32)}), "CPUExecutionProvider"]
    return providers


class Graph:
    """One graph on onnxruntime; ``run(**feeds)`` casts inputs to the graph's types and returns named outputs.

    On the CPU a graph that splits along a shared batch axis runs as ``options.replicas_for(size)`` sessions on
    slices of the batch, in parallel (onnxruntime releases the GIL while it runs). ``per_item_mib``: the
    activations per batch row that export measured (``runtime.memory``), when known."""

    def __init__(self, path: str | Path, options: RuntimeOptions | None = None, per_item_mib: float | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: graph file missing from the export folder")
        options = options or RuntimeOptions()
        size = _graph_bytes(self.path)
        n = options.replicas_for(size, per_item_mib)
        if n > 1 and not _splits_on_batch(self.path):
            n = 1
        per = max(1, options.threads() // n)  # a batch too small to split runs on the first replica
        # A large graph's activations are freed after each call; glibc keeps what it gets back in its heap unless
        # asked, and the next graph's call would then come on top of it.
        self.small = options.small(size, per_item_mib)
        arena = options.memory_arena and self.small
        self.replicas = [_session(self.path, options, per, arena, size) for _ in range(n)]
        self.session = self.replicas[0]
        self.input_types = {i.name: _NP_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self._pool = None

    def run(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        missing = sorted(set(self.input_types) - set(feeds))
        if missing:
            raise ArtifactError(f"{self.path}: graph inputs {missing} were not given")
        cast = {k: np.ascontiguousarray(v, dtype=t) for k, t in self.input_types.items() for v in (feeds[k],)}
        # Splittable graphs have a batch axis first on every input (the others never get replicas).
        rows = len(next(iter(cast.values()))) if len(self.replicas) > 1 else 1
        n = min(len(self.replicas), rows)
        outs = self._run_split(cast, rows, n) if n >= 2 else self.session.run(self.output_names, cast)
        if not self.small:
            from .memory import release_free_heap

            release_free_heap()
        return {k: (o.astype(np.float32) if o.dtype == np.float16 else o) for k, o in zip(self.output_names, outs)}

    def _run_split(self, cast: dict[str, np.ndarray], rows: int, n: int) -> list[np.ndarray]:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None or self._pool[0] != os.getpid():  # a forked child has none of the parent's threads
            self._pool = (os.getpid(), ThreadPoolExecutor(len(self.replicas), thread_name_prefix="audit-graph"))
        bounds = np.linspace(0, rows, n + 1).astype(int)
        parts = [{k: v[a:b] for k, v in cast.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        results = list(self._pool[1].map(lambda job: job[0].run(self.output_names, job[1]), zip(self.replicas, parts)))
        return [np.concatenate(group) for group in zip(*results)]


def _session(path: Path, options: RuntimeOptions, threads: int, arena: bool = True, size: int = 0):
    import onnxruntime as ort

    providers = providers_for(options)
    if options.saves_graphs(size):
        from . import optimized

        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        entry = optimized.entry_for(path, providers, str(level))
        if entry.is_dir():
            if optimized.valid(entry):
                try:
                    return _open(entry / optimized.GRAPH, _session_options(options, threads, arena, False), providers)
                except ArtifactError:
                    pass
            optimized.discard(entry)
        so = _session_options(options, threads, arena)
        scratch = optimized.save_here(so, entry)
        try:
            session = _open(path, so, providers)
        except BaseException:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
            raise
        optimized.commit(scratch, entry)
        return session
    return _open(path, _session_options(options, threads, arena), providers)


def _session_options(options: RuntimeOptions, threads: int, arena: bool, optimise: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = max(1, options.inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena and os.environ.get("AUDIT_MEMORY_ARENA", "1") != "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
    return so


def _open(path: Path, so, providers: list):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt or foreign graphs
        raise ArtifactError(f"{path}: onnxruntime cannot load this graph ({str(exc).splitlines()[0]})") from None


def _splits_on_batch(path: Path) -> bool:
    """Whether every input and output leads with the same named dynamic axis: a batch the graph can be split on
    (the DALL-E decoder step's cache leads with its layers, so it is not split). Unreadable files say no and are
    left to onnxruntime to report."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 (any parse failure: the session will name the problem)
        return False
    weights = {t.name for t in graph.initializer}  # old IRs list initializers among the inputs
    heads = []
    for value in (*(i for i in graph.input if i.name not in weights), *graph.output):
        dims = value.type.tensor_type.shape.dim
        heads.append(dims[0].dim_param if dims else "")
    return bool(heads) and heads[0] != "" and all(h == heads[0] for h in heads)


def _graph_bytes(path: Path) -> int:
    """The graph's file and every file its initializers are stored in."""
    from .optimized import graph_files

    return sum(f.stat().st_size for f in graph_files(path))
