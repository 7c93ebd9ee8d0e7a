"""Model builders for tests and benchmarks: tiny same-architecture models (``tiny``) and random-weight
models with the published architectures (``fullsize``). Not used by the product's pipeline."""
