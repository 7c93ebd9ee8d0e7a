"""Hot numeric work outside the networks, each op with a reference torch implementation and accelerated ones.

- ``cfg_ddim_step``: classifier-free-guidance combine fused with the DDIM update (``guidance``)
- ``preprocess_images`` / ``ImageTransform``: uint8 images -> normalised model inputs like HF processors (``preprocess``)
- ``cosine_matrix`` / ``sqdist_matrix``: pairwise similarities and distances of features (``distances``)

Every op takes ``impl=``: ``reference`` (torch), ``numpy``, ``onnx`` (a small fused onnxruntime graph) or
``triton`` (a GPU kernel; runs on CPU tensors under ``TRITON_INTERPRET=1`` for tests). ``DEFAULT_IMPLS`` is what
the runtime uses on the CPU, chosen by ``benchmarks/runtime.py`` (see benchmarks/README.md).
"""

from ._impls import IMPLS, triton_status
from .distances import cosine_matrix, sqdist_matrix
from .guidance import DdimCoefficients, cfg_ddim_step
from .preprocess import ImageTransform, preprocess_images

DEFAULT_IMPLS = {"cfg_ddim_step": "numpy", "preprocess_images": "numpy", "pairwise": "numpy"}

__all__ = ["IMPLS", "DEFAULT_IMPLS", "DdimCoefficients", "ImageTransform", "cfg_ddim_step", "cosine_matrix",
           "preprocess_images", "sqdist_matrix", "triton_status"]
