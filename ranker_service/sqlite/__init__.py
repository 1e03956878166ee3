"""The default backend: SQLite as the source of truth, the in-memory indexes kept in step, files on disk."""
