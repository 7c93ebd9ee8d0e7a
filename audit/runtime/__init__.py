"""The compiled runtime: exported graphs on onnxruntime behind the Generator / Embedder / Captioner protocols.

``load_target(DIR)`` and friends in ``audit.targets`` dispatch here for ``audit export`` folders; the attacks
never see which implementation they got.
"""

from pathlib import Path

from .captioner import OnnxCaptioner
from .embedder import OnnxEmbedder
from .folder import ExportFolder, bundled_models
from .generator import OnnxGenerator, initial_latents
from .scheduler import DdimSchedule
from .session import Graph, RuntimeOptions

__all__ = ["DdimSchedule", "ExportFolder", "Graph", "OnnxCaptioner", "OnnxDalleGenerator", "OnnxEmbedder",
           "OnnxGenerator", "RuntimeOptions", "bundled_models", "initial_latents", "onnx_generator"]


def onnx_generator(path: str | Path, options: RuntimeOptions | None = None, **kw):
    """The runtime generator for an exported target (a bundle or its target folder), by the family it records."""
    folder = ExportFolder(path).component_folder("target")
    if folder.info.get("family") == "dalle":
        from .dalle import OnnxDalleGenerator

        return OnnxDalleGenerator(folder.path, options, **kw)
    return OnnxGenerator(folder.path, options, **kw)


def __getattr__(name: str):
    if name == "OnnxDalleGenerator":  # imports torch-side DALL-E code only when asked for
        from .dalle import OnnxDalleGenerator

        return OnnxDalleGenerator
    raise AttributeError(name)
