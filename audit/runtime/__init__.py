"""The compiled runtime: exported graphs on onnxruntime behind the Generator / Embedder / Captioner protocols.

``load_target(DIR)`` and friends in ``audit.targets`` dispatch here for ``audit export`` folders; the attacks
never see which implementation they got.
"""

from .captioner import OnnxCaptioner
from .embedder import OnnxEmbedder
from .folder import ExportFolder, bundled_models
from .generator import OnnxGenerator, initial_latents
from .scheduler import DdimSchedule
from .session import Graph, RuntimeOptions

__all__ = ["DdimSchedule", "ExportFolder", "Graph", "OnnxCaptioner", "OnnxEmbedder", "OnnxGenerator",
           "RuntimeOptions", "bundled_models", "initial_latents"]
