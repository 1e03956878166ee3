"""In-RAM indexes: the Collection protocol, the exact and FAISS kinds, the registry, background upkeep."""
