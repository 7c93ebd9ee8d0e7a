"""The service's settings: one typed config, from flags or a JSON file (``audit serve --config FILE``)."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from ..config import Config
from ..errors import UsageError


@dataclasses.dataclass
class ServiceConfig(Config):
    """``targets``: the targets to load (the first is the default); ``heads``: one heads folder for every target,
    one per target, or none (each target's registered heads). ``db``: evidence database (file or URL; default
    ``$AUDIT_HOME/evidence.db``). ``api_keys``: a file of SHA-256-hashed keys (``AUDIT_API_KEYS`` may hold them
    too); required on any address but loopback. ``data_roots``: folders that scan jobs may read. ``reference``,
    ``embedder``, ``captioner``: as heads, one for every target or one per target (default: none, and each target's
    own embedder and captioner); heads trained with a reference model need it. ``ray``: a Ray address (``local``,
    ``auto``, ``ray://HEAD:10001`` or ``HOST:PORT``) to run scan jobs on, with ``ray_workers`` actors of
    ``ray_threads`` threads each (0: this machine's single-process count); checks stay in this process."""

    targets: list[str] = dataclasses.field(default_factory=lambda: ["toy"])
    heads: list[str] = dataclasses.field(default_factory=list)
    reference: list[str] = dataclasses.field(default_factory=list)
    embedder: list[str] = dataclasses.field(default_factory=list)
    captioner: list[str] = dataclasses.field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    db: str | None = None
    api_keys: str | None = None
    data_roots: list[str] = dataclasses.field(default_factory=list)
    state_dir: str | None = None  # scan jobs' results and extracted uploads (default: $AUDIT_HOME/service)
    max_batch_size: int = 8
    max_wait_ms: float = 20.0
    queue_size: int = 64
    max_body_bytes: int = 32 * 2**20
    max_caption_chars: int = 2000
    rate_limit_per_minute: int = 600  # per API key (or per client address without keys); 0: no limit
    max_archive_bytes: int = 512 * 2**20
    max_archive_members: int = 20_000
    scan_batch_size: int = 8
    device: str = "cpu"
    max_fpr: float = 0.01
    ray: str | None = None
    ray_workers: int = 1
    ray_threads: int = 0

    def validate(self) -> "ServiceConfig":
        for name in ("targets", "heads", "reference", "embedder", "captioner", "data_roots"):
            if isinstance(getattr(self, name), str):  # a config file's "reference": "toy-base"
                setattr(self, name, [getattr(self, name)])
        if not self.targets:
            raise UsageError("give at least one --target")
        for name in ("heads", "reference", "embedder", "captioner"):
            given = getattr(self, name)
            if given and len(given) not in (1, len(self.targets)):
                raise UsageError(f"--{name}: give one for every target or one per target ({len(self.targets)} "
                                 f"targets, {len(given)} given)")
        if self.ray is not None:
            self.cluster()
        for name in ("max_batch_size", "queue_size", "max_body_bytes", "max_caption_chars", "scan_batch_size",
                     "max_archive_bytes", "max_archive_members"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.rate_limit_per_minute < 0:
            raise UsageError("--max-wait-ms and the rate limit must be >= 0")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0-65535, got {self.port}")
        for root in self.data_roots:
            if not Path(root).is_dir():
                raise UsageError(f"--data-root {root}: not a folder")
        return self

    @property
    def loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def heads_for(self, i: int) -> str | None:
        return self.for_target("heads", i)

    def for_target(self, name: str, i: int) -> str | None:
        """Target ``i``'s ``heads``, ``reference``, ``embedder`` or ``captioner`` (None: not given)."""
        given = getattr(self, name)
        if not given:
            return None
        return (given[0] if len(given) == 1 else given[i]) or None

    def cluster(self):
        """The Ray cluster scan jobs run on (None without ``ray``); Ray Data must be installed."""
        if self.ray is None:
            return None
        from ..cluster.ray_driver import ClusterConfig, import_ray

        cluster = ClusterConfig(address=self.ray, workers=self.ray_workers, threads=self.ray_threads,
                                device=self.device).validate()
        import_ray()
        return cluster

    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        from ..attacks.heads import audit_home

        return audit_home() / "service"
