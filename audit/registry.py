"""Registries of targets, embedders and captioners, and the one parser of model specs.

A spec is a registered name (``toy``, ``sd-1.5``, ``toy-clip``), a local folder (a diffusers/transformers
folder or an ``audit export`` folder), or an ``http(s)://`` URL (black-box targets). ``parse_model_ref``
decides which; nothing else dispatches on the spelling of a spec.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from .errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    loader: Callable[..., Any]  # loader(**options) -> backend object
    source: str  # where it loads from, for `audit targets`
    description: str = ""
    family: str = ""
    defaults: dict = dataclasses.field(default_factory=dict)  # e.g. the default embedder/captioner of a target


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, loader: Callable[..., Any], source: str, description: str = "", family: str = "",
                 **defaults: Any) -> None:
        self._entries[name] = Entry(name, loader, source, description, family, defaults)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s are: {', '.join(sorted(self._entries))} "
                f"(or pass a local folder{' or an http(s):// URL' if self.kind == 'target' else ''})"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in sorted(self._entries)]


TARGETS = Registry("target")
EMBEDDERS = Registry("embedder")
CAPTIONERS = Registry("captioner")


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A parsed spec. ``kind`` is one of: registered, folder, export, http."""

    kind: str
    value: str


def parse_model_ref(spec: str, registry: Registry) -> ModelRef:
    spec = str(spec).strip()
    if spec.startswith(("http://", "https://")):
        return ModelRef("http", spec.rstrip("/"))
    if spec in registry:
        return ModelRef("registered", spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "export.json").is_file():
            return ModelRef("export", str(path.resolve()))
        return ModelRef("folder", str(path.resolve()))
    if any(sep in spec for sep in ("/", "\\")) and not path.exists() and spec.count("/") != 1:
        from .errors import InputError

        raise InputError(f"{spec}: no such folder")
    # Either a typo'd name or a hub id (org/name) that may sit in the local HF cache: the registry error lists
    # the valid names; hub ids are resolved by the family loaders.
    if spec.count("/") == 1 and not path.exists():
        return ModelRef("hub", spec)
    registry.get(spec)  # raises UnknownNameError listing valid names
    raise AssertionError("unreachable")
