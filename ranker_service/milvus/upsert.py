"""The Milvus backend's Upsert job (ranker_service/backend.py's `UpsertJob`)."""

from __future__ import annotations

from imagesearch import errors
from ranker_service import validation
from ranker_service.backend import UpsertJob
from ranker_service.milvus.schema import MAX_NAME_BYTES, Coll
from ranker_service.types import IndexSpec, Pending, UpsertItem


class MilvusUpsertJob(UpsertJob):
    """The Milvus backend's upsert job (backend.py): a flush is also due
    when an item names a collection that does not exist yet (it is created,
    with the first item's dimension and fingerprint, as the batch commits)."""

    def _prepare(self, index: int, item: UpsertItem) -> Pending:
        p = validation.pending_item(index, item)
        if len(p.name.encode("utf-8")) > MAX_NAME_BYTES:
            raise errors.InvalidArgument(f"{p.what}: the name takes more than {MAX_NAME_BYTES} bytes in UTF-8")
        return p

    def __init__(self, backend):
        super().__init__(backend)
        self._known: dict[str, Coll] = {}  # collections this call found: read once per call

    def _find(self, collection: str) -> Coll | None:
        coll = self._known.get(collection)
        if coll is None:
            coll = self._backend._find(collection)
            if coll is not None:
                self._known[collection] = coll
        return coll

    def _due(self, p: Pending) -> bool:
        return self._find(p.collection) is None

    def _commit(self, batch: list[Pending]) -> None:
        if batch:
            self._commit_batch(batch, self._backend._commit)

    def flush(self) -> None:
        backend, batch = self._backend, []
        pending, self._pending = self._pending, []
        for p in pending:
            with backend._lock:
                coll = self._find(p.collection)
                if coll is None:
                    self._commit(batch)
                    batch = []
                    coll = self._known[p.collection] = backend._create(p.collection, p.vector.shape[0],
                                                                       p.fingerprint, IndexSpec())
            try:
                validation.check_fits(p.collection, coll.dim, coll.fingerprint, p)
            except errors.ImageSearchError as exc:
                self.fail(exc)
                break
            batch.append(p)
        self._commit(batch)
