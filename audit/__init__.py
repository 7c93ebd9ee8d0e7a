"""audit: membership inference against text-to-image generators (Wu et al. 2022, and beyond)."""

__version__ = "0.1.0"

# Schema of every artifact this version writes (export folders, feature stores, heads).
SCHEMA_VERSION = 1
