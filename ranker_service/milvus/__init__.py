"""The ranker's Milvus backend (`--backend milvus`): `MilvusBackend` in
backend.py, the data layout in schema.py, the connection and its health in
link.py. It never imports the SQLite backend or the in-memory indexes."""

from ranker_service.milvus.backend import MilvusBackend

__all__ = ["MilvusBackend"]
