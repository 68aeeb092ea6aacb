"""State that outlives a request: shared item-side views, RocksDB stores, the ANN index."""
