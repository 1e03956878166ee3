"""Re-ranking: the maths (query expansion, k-reciprocal) and the per-generation cache of derived data."""
