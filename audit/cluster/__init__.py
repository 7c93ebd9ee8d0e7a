"""Scale-out: `audit features` and `audit scan` with their batches computed on a Ray cluster (Ray Data actors).

Importing this package does not import Ray; ``featurize_on_ray`` and ``scan_on_ray`` do, and without it fail
with one line naming the extra (``pip install 'audit[ray]'``).
"""

from .ray_driver import ClusterConfig, featurize_on_ray, scan_on_ray

__all__ = ["ClusterConfig", "featurize_on_ray", "scan_on_ray"]
