"""Embedders (CLIP) and captioners (BLIP) on the torch path, behind the interface of ``targets.base``."""
