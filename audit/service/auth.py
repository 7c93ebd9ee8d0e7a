"""API keys and the per-key rate limit.

Keys are stored hashed: a keys file holds one ``sha256:HEX`` (or bare 64-hex) digest per line, optionally
followed by a space and a name; ``AUDIT_API_KEYS`` may hold the same entries separated by commas. A request
presents ``Authorization: Bearer KEY``; its SHA-256 is compared with every stored digest in constant time. A
key's id (the name, else the digest's first 12 hex digits) is what evidence records hold, never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import threading
import time
from pathlib import Path

from ..errors import UsageError

_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")


class AuthError(Exception):
    """A missing or unknown key: 401."""


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"rate limit exceeded; retry after {math.ceil(retry_after)} s")
        self.retry_after = retry_after


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(lines: list[str], where: str) -> dict[str, str]:
    """digest -> key id, from ``DIGEST [NAME]`` entries (blank lines and ``#`` comments skipped)."""
    keys = {}
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        m = _DIGEST.match(digest)
        if not m:
            raise UsageError(f"{where}:{n}: not a SHA-256 key digest (expected sha256:<64 hex> [name]; store "
                             "hashes, never keys)")
        keys[m.group(1).lower()] = name.strip() or m.group(1).lower()[:12]
    return keys


def load_keys(path: str | None) -> dict[str, str]:
    """The keys of ``--api-keys FILE`` and ``AUDIT_API_KEYS``; empty when neither is given."""
    keys = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--api-keys {path}: no such file")
        keys.update(parse_keys(p.read_text(encoding="utf-8").splitlines(), str(path)))
    env = os.environ.get("AUDIT_API_KEYS", "")
    if env.strip():
        keys.update(parse_keys(env.split(","), "AUDIT_API_KEYS"))
    return keys


class KeyRing:
    def __init__(self, keys: dict[str, str]):
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | None) -> str | None:
        """The key id of a request's ``Authorization`` header; None with keys off; AuthError otherwise."""
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("missing API key: send Authorization: Bearer KEY")
        digest = hash_key(token.strip())
        found = None
        for stored, name in self.keys.items():  # every digest compared, so the time does not tell which matched
            if hmac.compare_digest(stored, digest):
                found = name
        if found is None:
            raise AuthError("unknown API key")
        return found


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests a minute, bursts up to that many."""

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, who: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(who, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1:
                self.buckets[who] = (tokens, now)
                raise RateLimited((1 - tokens) / self.rate)
            self.buckets[who] = (tokens - 1, now)
