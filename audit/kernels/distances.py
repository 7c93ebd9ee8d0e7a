"""Pairwise cosine similarities and squared Euclidean distances between feature sets.

``cosine_matrix(a, b)`` and ``sqdist_matrix(a, b)`` take ``a`` [..., N, D] and ``b`` [..., M, D] (the same leading
batch dims, e.g. one row per query) and return [..., N, M] float32. Cosines normalise like ``F.normalize``
(x / max(|x|, 1e-12)); squared distances expand |a|^2 - 2 a.b + |b|^2 and clamp at 0.

Implementations (``impl=``): ``reference`` (torch), ``numpy`` (the default), ``onnx`` (one fused graph),
``triton`` (a tiled kernel).
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import UsageError
from ._impls import OnnxKernel, check_impl, make_model, require_triton, triton_device

EPS = 1e-12
KINDS = ("cosine", "sqdist")


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise UsageError(f"feature shapes {a.shape} and {b.shape} do not pair up ([..., N, D] and [..., M, D])")
    return a, b


def cosine_matrix(a, b, impl: str = "numpy") -> np.ndarray:
    return _pairwise("cosine", a, b, impl)


def sqdist_matrix(a, b, impl: str = "numpy") -> np.ndarray:
    return _pairwise("sqdist", a, b, impl)


def _pairwise(kind: str, a, b, impl: str) -> np.ndarray:
    check_impl(impl)
    a, b = _check(a, b)
    if impl == "numpy":
        return _numpy(kind, a, b)
    if impl == "reference":
        return _torch(kind, a, b)
    if impl == "onnx":
        return _onnx_kernel(kind, a.ndim)(a=np.ascontiguousarray(a), b=np.ascontiguousarray(b))[0]
    return _triton(kind, a, b)


def _numpy(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if kind == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), EPS)
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), EPS)
        return (a @ np.swapaxes(b, -1, -2)).astype(np.float32)
    aa = (a * a).sum(-1)[..., :, None]
    bb = (b * b).sum(-1)[..., None, :]
    return np.maximum(aa - 2 * (a @ np.swapaxes(b, -1, -2)) + bb, 0).astype(np.float32)


def _torch(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if kind == "cosine":
        return (F.normalize(ta, dim=-1, eps=EPS) @ F.normalize(tb, dim=-1, eps=EPS).transpose(-1, -2)).numpy()
    return (ta.unsqueeze(-2) - tb.unsqueeze(-3)).pow(2).sum(-1).numpy()


@functools.lru_cache(maxsize=None)
def _onnx_kernel(kind: str, rank: int) -> OnnxKernel:
    return OnnxKernel(lambda: _build_graph(kind, rank))


def _build_graph(kind: str, rank: int):
    from onnx import TensorProto, helper

    swap = list(range(rank - 2)) + [rank - 1, rank - 2]  # transpose the last two axes
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("a", f, None), helper.make_tensor_value_info("b", f, None)]
    inits = [helper.make_tensor("last", TensorProto.INT64, [1], [-1]), helper.make_tensor("eps", f, [], [EPS]),
             helper.make_tensor("zero", f, [], [0.0]), helper.make_tensor("two", f, [], [2.0])]
    nodes = []
    if kind == "cosine":
        for x in ("a", "b"):
            nodes += [helper.make_node("ReduceL2", [x, "last"], [f"{x}_norm"], keepdims=1),
                      helper.make_node("Max", [f"{x}_norm", "eps"], [f"{x}_safe"]),
                      helper.make_node("Div", [x, f"{x}_safe"], [f"{x}_unit"])]
        nodes += [helper.make_node("Transpose", ["b_unit"], ["bt"], perm=swap),
                  helper.make_node("MatMul", ["a_unit", "bt"], ["out"])]
    else:
        nodes += [helper.make_node("ReduceSumSquare", ["a", "last"], ["aa"], keepdims=1),  # [..., N, 1]
                  helper.make_node("ReduceSumSquare", ["b", "last"], ["bb_col"], keepdims=1),  # [..., M, 1]
                  helper.make_node("Transpose", ["bb_col"], ["bb"], perm=swap),
                  helper.make_node("Transpose", ["b"], ["bt"], perm=swap),
                  helper.make_node("MatMul", ["a", "bt"], ["ab"]),
                  helper.make_node("Mul", ["two", "ab"], ["ab2"]),
                  helper.make_node("Sub", ["aa", "ab2"], ["partial"]),
                  helper.make_node("Add", ["partial", "bb"], ["raw"]),
                  helper.make_node("Max", ["raw", "zero"], ["out"])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("out", f, None)], inits, name=f"pairwise_{kind}")


# --- Triton ---------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def pairwise_kernel(a_ptr, b_ptr, out_ptr, n, m, d, eps, COSINE: tl.constexpr, BN: tl.constexpr,
                        BM: tl.constexpr, BD: tl.constexpr):
        # Grid: (batch, row blocks, column blocks); each program accumulates a BN x BM tile over D.
        z, pi, pj = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pi * BN + tl.arange(0, BN)
        cols = pj * BM + tl.arange(0, BM)
        a_base = a_ptr + z * n * d
        b_base = b_ptr + z * m * d
        acc = tl.zeros((BN, BM), dtype=tl.float32)
        aa = tl.zeros((BN,), dtype=tl.float32)
        bb = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, d, BD):
            ks = k0 + tl.arange(0, BD)
            a = tl.load(a_base + rows[:, None] * d + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < d), other=0.0)
            b = tl.load(b_base + cols[:, None] * d + ks[None, :], mask=(cols[:, None] < m) & (ks[None, :] < d), other=0.0)
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
            aa += tl.sum(a * a, axis=1)
            bb += tl.sum(b * b, axis=1)
        if COSINE:
            out = acc / (tl.maximum(tl.sqrt(aa), eps)[:, None] * tl.maximum(tl.sqrt(bb), eps)[None, :])
        else:
            out = tl.maximum(aa[:, None] - 2.0 * acc + bb[None, :], 0.0)
        tl.store(out_ptr + z * n * m + rows[:, None] * m + cols[None, :], out,
                 mask=(rows[:, None] < n) & (cols[None, :] < m))

    return pairwise_kernel


def _triton(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch
    import triton

    require_triton()
    dev = triton_device()
    lead = a.shape[:-2]
    n, m, d = a.shape[-2], b.shape[-2], a.shape[-1]
    ta = torch.from_numpy(np.ascontiguousarray(a.reshape(-1, n, d))).to(dev)
    tb = torch.from_numpy(np.ascontiguousarray(b.reshape(-1, m, d))).to(dev)
    out = torch.empty((ta.shape[0], n, m), dtype=torch.float32, device=dev)
    bn = bm = 16  # tl.dot needs tiles of at least 16
    grid = (ta.shape[0], triton.cdiv(n, bn), triton.cdiv(m, bm))
    _triton_kernel()[grid](ta, tb, out, n, m, d, EPS, COSINE=kind == "cosine", BN=bn, BM=bm, BD=32)
    return out.cpu().numpy().reshape(*lead, n, m)
