"""The ranker's own Prometheus metrics, on top of the per-RPC ones
(imagesearch.serving.metrics); docs/operations.md#metrics lists them.
Per-collection figures (vectors, memory, derived data) are read from the
backend at scrape time (a collector, so nothing is kept in step by hand);
rows upserted and deleted and search durations by `MeteredBackend`, a proxy
in front of the backend the servicer uses.

Collection names are labels only where the operator allows it
(`--metrics-collections names`); `hashed` puts the first 12 hex digits of
each name's sha256 instead, and is what `auto` means on a server with a
token (whoever can reach the metrics port does not learn what it holds).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imagesearch import errors
from imagesearch.serving.metrics import ServiceMetrics
from ranker_service.backend import RankerBackend
from ranker_service.types import DeleteResult, Match, Query, UpsertResult

PREFIX = "imagesearch_ranker"


COLLECTION_LABELS = ("auto", "names", "hashed")


def collection_label(policy: str, has_token: bool) -> Callable[[str], str]:
    """The label a collection's metrics carry, under `--metrics-collections`."""
    if policy == "names" or (policy == "auto" and not has_token):
        return str
    return lambda name: hashlib.sha256(name.encode()).hexdigest()[:12]


class CollectionsCollector(Collector):
    def __init__(self, backend: RankerBackend, db_path: Path | None, label: Callable[[str], str] = str):
        self.backend = backend
        self.db_path = db_path
        self.label = label

    def collect(self):
        vectors = GaugeMetricFamily(f"{PREFIX}_vectors", "Vectors stored per collection", labels=["collection", "kind"])
        memory = GaugeMetricFamily(f"{PREFIX}_memory_bytes", "Bytes held in memory per collection",
                                   labels=["collection", "kind"])
        try:
            stats = self.backend.stats() if self.backend.ready else []
        except errors.ImageSearchError:
            stats = []
        current = GaugeMetricFamily(f"{PREFIX}_derived_current", "1 when the derived re-ranking data is built from "
                                    "the collection's last write", labels=["collection"])
        rebuilding = GaugeMetricFamily(f"{PREFIX}_derived_rebuilding", "1 while the derived re-ranking data is "
                                       "being rebuilt", labels=["collection"])
        seconds = GaugeMetricFamily(f"{PREFIX}_derived_build_seconds", "How long the last rebuild of the derived "
                                    "re-ranking data took", labels=["collection"])
        for s in stats:
            name = self.label(s.name)
            vectors.add_metric([name, s.spec.kind], s.count)
            memory.add_metric([name, s.spec.kind], s.memory_bytes)
            derived = s.derived
            if derived is not None and derived.state != "none":
                current.add_metric([name], float(derived.state == "current"))
                rebuilding.add_metric([name], float(derived.state == "rebuilding"))
                seconds.add_metric([name], derived.last_build_seconds)
        yield vectors
        yield memory
        yield current
        yield rebuilding
        yield seconds
        if self.db_path is not None:
            size = sum(p.stat().st_size for p in (self.db_path, Path(f"{self.db_path}-wal")) if p.exists())
            yield GaugeMetricFamily(f"{PREFIX}_database_bytes", "The SQLite database and its WAL on disk",
                                    value=size)


class _CountingJob:
    """An Upsert job that adds the rows each of its commits wrote to `counter`
    (so a call that fails after some batches counts those it committed)."""

    def __init__(self, job, counter):
        self._job = job
        self._counter = counter
        self._counted = 0

    def __getattr__(self, name):
        return getattr(self._job, name)

    def _count(self) -> None:
        committed = self._job.committed
        if committed > self._counted:
            self._counter.inc(committed - self._counted)
            self._counted = committed

    def flush(self) -> None:
        try:
            self._job.flush()
        finally:
            self._count()

    def finish(self) -> UpsertResult:
        try:
            return self._job.finish()
        finally:
            self._count()


class MeteredBackend:
    """The backend, counting what it commits and timing searches by index kind."""

    def __init__(self, backend: RankerBackend, metrics: ServiceMetrics, db_path: Path | None = None,
                 label: Callable[[str], str] = str):
        self._backend = backend
        self.upserted = metrics.counter("upserted_rows", "Rows committed by Upsert calls")
        self.deleted = metrics.counter("deleted_rows", "Rows removed by Delete")
        self.search_seconds = metrics.histogram("search_duration_seconds",
                                                "Ranking one query, by the collection's index kind", ["kind"])
        self._kinds: dict[str, str] = {}
        metrics.registry.register(CollectionsCollector(backend, db_path, label))

    def __getattr__(self, name):  # everything not measured goes straight through
        return getattr(self._backend, name)

    def _kind(self, collection: str) -> str:
        kind = self._kinds.get(collection)
        if kind is None:
            try:
                (stats,) = self._backend.stats(collection)
                kind = self._kinds[collection] = stats.spec.kind
            except (errors.ImageSearchError, ValueError):
                return "unknown"
        return kind

    def upsert_job(self):  # (the servicer upserts through a job)
        return _CountingJob(self._backend.upsert_job(), self.upserted)

    def delete(self, collection: str, names: Sequence[str]) -> DeleteResult:
        result = self._backend.delete(collection, names)
        self.deleted.inc(result.deleted)
        return result

    def search(self, query: Query) -> list[Match]:
        started = time.perf_counter()
        matches = self._backend.search(query)
        self.search_seconds.labels(self._kind(query.collection)).observe(time.perf_counter() - started)
        return matches

    def search_many(self, queries: Sequence[Query]):
        started = time.perf_counter()
        results = self._backend.search_many(queries)
        share = (time.perf_counter() - started) / max(1, len(queries))
        for query, result in zip(queries, results):
            if not isinstance(result, errors.ImageSearchError):
                self.search_seconds.labels(self._kind(query.collection)).observe(share)
        return results

    def create_collection(self, *args, **kwargs):
        self._kinds.clear()
        return self._backend.create_collection(*args, **kwargs)

    def drop_collection(self, collection: str) -> int:
        self._kinds.pop(collection, None)
        return self._backend.drop_collection(collection)


def metered(backend: RankerBackend, metrics: ServiceMetrics | None, db_path: Path | None,
            label: Callable[[str], str] = str):
    """`backend` behind a MeteredBackend when the server has metrics, else itself."""
    return backend if metrics is None else MeteredBackend(backend, metrics, db_path, label)
