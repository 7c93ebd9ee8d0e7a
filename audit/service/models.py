"""The models the service holds: one loaded ``Auditor`` per target, and variants of it for a request's own
heads, attack or budget that share the loaded target, embedder and captioner."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import UnknownNameError
from .config import ServiceConfig


class Models:
    """``auditor(target, heads, attack, max_fpr, tier)``: the Auditor that scores a request. ``lock`` is held
    around every model call (checks and scan jobs share the models; the backends are not thread-safe)."""

    def __init__(self, auditors: dict[str, object], max_fpr: float = 0.01, sources: dict | None = None):
        self.defaults = dict(auditors)  # target name as given -> Auditor
        # target name as given -> the embedder and captioner it was loaded with, as Ray workers load them
        self.sources = sources or {}
        self.default_target = next(iter(self.defaults))
        self.max_fpr = max_fpr
        self.lock = threading.Lock()
        self._variants: OrderedDict = OrderedDict()
        self._variants_lock = threading.Lock()

    @classmethod
    def load(cls, config: ServiceConfig) -> "Models":
        from ..auditor import Auditor

        auditors, sources = {}, {}
        for i, target in enumerate(config.targets):
            sources[target] = {role: model_spec(config.for_target(role, i)) for role in ("embedder", "captioner")}
            auditors[target] = Auditor(target, config.heads_for(i), config.for_target("embedder", i),
                                       config.for_target("captioner", i), device=config.device,
                                       batch_size=config.scan_batch_size, max_fpr=config.max_fpr,
                                       reference=config.for_target("reference", i))
        return cls(auditors, config.max_fpr, sources)

    def source(self, target: str, role: str) -> str | None:
        return self.sources.get(target, {}).get(role)

    def heads_names(self, target: str) -> dict[str, str]:
        """The heads a request may name for ``target``: by folder name or full path -> path."""
        path = self.defaults[target].heads_path
        return {Path(path).name: path, path: path}

    def auditor(self, target: str | None = None, heads: str | None = None, attack: str | None = None,
                max_fpr: float | None = None, tier: str | None = None):
        target = target or self.default_target
        if target not in self.defaults:
            raise UnknownNameError(f"unknown target {target!r}; this service holds: {', '.join(self.defaults)}")
        base = self.defaults[target]
        if heads is not None and heads not in self.heads_names(target):
            raise UnknownNameError(f"unknown heads {heads!r} for target {target}; this service holds: "
                                   f"{Path(base.heads_path).name}")
        key = (target, attack, self.max_fpr if max_fpr is None else float(max_fpr), tier)
        if key[1:] == (None, self.max_fpr, None) or key[1:] == (base.attack, self.max_fpr, None):
            return base
        return self._variant(base, key)

    def _variant(self, base, key):
        from ..auditor import Auditor

        with self._variants_lock:
            if key in self._variants:
                self._variants.move_to_end(key)
                return self._variants[key]
        made = Auditor(key[0], base.heads_path, attack=key[1], max_fpr=key[2], tier=key[3], models=base.models,
                       batch_size=base.config.batch_size, reference=base.config.reference or None)
        with self._variants_lock:
            self._variants[key] = made
            while len(self._variants) > 16:
                self._variants.popitem(last=False)
        return made

    def info(self) -> list[dict]:
        from ..evidence.log import heads_digest

        out = []
        for name, a in self.defaults.items():
            ids = a.models.identities()
            out.append({"name": name, "target": ids["target"], "reference": ids.get("reference"),
                        "embedder": ids["embedder"], "captioner": ids["captioner"], "heads": {"path": a.heads_path,
                                                                 "sha256": heads_digest(a.heads_path),
                                                                 "attacks": list(a.heads.attacks)},
                        "attack": a.attack, "tiers": sorted({a.heads.tier(x) for x in a.heads.attacks}),
                        "decision": a.decision.to_dict(), "features": a.config.for_store()})
        return out


def model_spec(spec: str | None) -> str | None:
    """A model spec as another process loads it: an existing folder made absolute."""
    if not spec:
        return None
    return str(Path(spec).resolve()) if Path(spec).is_dir() else spec
