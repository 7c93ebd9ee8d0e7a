"""Export targets, embedders and captioners to validated ONNX graphs (``audit export``).

Public: ``export_all(ExportConfig, out)``, ``ExportConfig``; the per-graph ``specs`` and ``convert`` helpers.
"""

from .components import ExportConfig, export_all

__all__ = ["ExportConfig", "export_all"]
