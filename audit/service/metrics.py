"""Prometheus metrics, in base units and the usual names, on a registry of the app's own (two apps in one
process, as in the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .. import __version__


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.check_duration = Histogram(
            "audit_check_duration_seconds", "Time to answer POST /v1/checks, from request to verdict.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=self.registry)
        self.checks = Counter("audit_checks", "Checks answered with a verdict.", ["verdict", "tier"],
                              registry=self.registry)
        self.batch_size = Histogram("audit_batch_size", "Rows per batched model call of the check queue.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.queue_depth = Gauge("audit_queue_depth", "Checks waiting in the batching queue.",
                                 registry=self.registry)
        self.scan_jobs = Gauge("audit_scan_jobs", "Scan jobs by state.", ["state"], registry=self.registry)
        self.build = Info("audit_build", "The auditing service's version.", registry=self.registry)
        self.build.info({"version": __version__})
