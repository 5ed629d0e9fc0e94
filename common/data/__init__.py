"""The data side: the canonical event table, file formats and adapters, synthetic data, the
platform catalog, partitioning into clients, and per-user sequences."""
