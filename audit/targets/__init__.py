"""Targets (text-to-image generators) and the loaders of every model the tool runs."""

from .builtin import default_models, load_captioner, load_embedder, load_target

__all__ = ["default_models", "load_captioner", "load_embedder", "load_target"]
