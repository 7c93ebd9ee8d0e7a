"""Plumbing shared by the kernels: small ONNX graphs run in onnxruntime, and lazy Triton availability."""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np

from ..errors import UsageError

OPSET = 18
IMPLS = ("numpy", "reference", "onnx", "triton")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise UsageError(f"unknown kernel implementation {impl!r}; valid implementations are {', '.join(IMPLS)}")


def kernel_threads() -> int:
    """Threads for the small kernel sessions: the usable cores, like the model sessions."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OnnxKernel:
    """A small fused ONNX graph built once and run in an onnxruntime CPU session.

    ``build`` returns an ``onnx.ModelProto``; the session is created lazily so importing a kernel costs nothing.
    """

    def __init__(self, build: Callable[[], "object"], threads: int | None = None):
        self._build = build
        self._threads = threads
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self._threads or kernel_threads()
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see runtime.session
            self._session = ort.InferenceSession(self._build().SerializeToString(), opts,
                                                 providers=["CPUExecutionProvider"])
        return self._session

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, feeds)


def make_model(nodes, inputs, outputs, initializers=(), name: str = "kernel"):
    from onnx import helper

    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="audit.kernels")
    # onnxruntime releases lag onnx's newest IR version; onnxruntime validates the graph when it loads it.
    model.ir_version = min(model.ir_version, 9)
    return model


def scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(usable, why not). Triton needs a GPU driver, or TRITON_INTERPRET=1 to run on CPU tensors (tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    import torch

    if not torch.cuda.is_available():
        return False, "triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 to run them on the CPU for testing)"
    return True, ""


def require_triton() -> None:
    ok, why = triton_status()
    if not ok:
        raise UsageError(why)


def triton_device() -> str:
    """Where Triton kernels take their tensors: the GPU, or the CPU under TRITON_INTERPRET=1."""
    import torch

    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"
