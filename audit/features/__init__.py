"""Per-query features and the HDF5 feature store (the contract between feature computation and the attacks)."""

from .compute import FeaturesConfig, Models, batch_slices, compute_store, featurize_rows
from .store import KEYS, FeatureStore, FeatureWriter

__all__ = ["Models", "FeaturesConfig", "batch_slices", "compute_store", "featurize_rows", "KEYS", "FeatureStore",
           "FeatureWriter"]
