"""The bulk jobs of the CLI, on top of the two clients, sharing one engine:

- `index_folder`: every image under a folder, streamed through EmbedStream
  straight into Upsert;
- `query_folder`: every image under a folder, streamed through EmbedStream
  straight into SearchStream; returns each query's ranked matches.

The engine cuts the folder's images into chunks, one pair of streams per
chunk, several chunks at a time (so round_robin spreads them over embedder
replicas). Vectors go from the embedder's answer to the ranker's request as
the same float32 arrays. Bad files never stop a job: each is reported as a
typed Failure. A failing service stops starting new chunks; what was not done
is listed, so a re-run (which replaces rather than duplicates) completes the job."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import grpc

from clients.cli.incremental import extra_attributes, make_plan
from clients.embedder import EmbedderClient, file_source
from clients.errors import ClientError, UsageError
from clients.options import above
from clients.files import IMAGE_EXTENSIONS, FolderListing, list_images
from clients.ranker import REINDEX, RankerClient
from clients.types import CollectionStats, Embedding, Failure, KReciprocal, Match, QueryExpansion

log = logging.getLogger(__name__)


@dataclasses.dataclass
class JobReport:
    folder: Path
    total_images: int = 0
    done: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # not images at all
    failed: dict[str, Failure] = dataclasses.field(default_factory=dict)      # images not done
    service_error: str = ""          # a service failed: the job is incomplete through no fault of the input
    seconds: float = 0.0

    @property
    def runtime_failures(self) -> dict[str, Failure]:
        """Failures caused by a service (down, timed out, erroring)."""
        return {n: f for n, f in self.failed.items() if not f.is_input_error}


@dataclasses.dataclass
class IndexReport(JobReport):
    collection: str = ""
    inserted: int = 0
    replaced: int = 0
    unchanged: int = 0   # same name, size and mtime: not embedded, not even hashed
    renamed: int = 0     # re-keyed from a gone file with the same content: not embedded
    retagged: int = 0    # same content, attributes refreshed from the stored vector: not embedded
    gone: list[str] = dataclasses.field(default_factory=list)  # stored items whose files are gone
    deleted: int = 0     # of those, deleted (--sync)
    hashed: int = 0      # files whose sha256 was computed
    vanished: list[str] = dataclasses.field(default_factory=list)  # listed, then gone before they were read


@dataclasses.dataclass
class QueryReport(JobReport):
    collection: str = ""
    top_k: int = 10
    results: dict[str, list[Match]] = dataclasses.field(default_factory=dict)

    def names(self) -> dict[str, list[str]]:
        """The competition JSON: {query file: [ranked gallery files]}."""
        return {q: [m.name for m in ms] for q, ms in sorted(self.results.items())}


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool | None):
        self._bar = None
        self._lock = threading.Lock()
        if enabled is not False and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                             disable=None if enabled is None else False, leave=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None and n:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def embedder_for(embedder: EmbedderClient, ranker: RankerClient, collection: str, *,
                 must_exist: bool) -> Iterator[tuple[EmbedderClient, CollectionStats | None]]:
    """(the client that embeds for `collection` (or an alias's target), its
    stats): `embedder`, or the model it also serves whose fingerprint the
    collection holds. Early, clear errors: an unknown collection (for
    queries), or a model not served."""
    found = ranker.collection(collection)
    info = embedder.model_info()
    if found is None:
        if must_exist:
            names = ", ".join(c.name for c in ranker.stats().collections) or "none"
            raise UsageError(f"collection {collection!r} does not exist on the ranker at {ranker.address} "
                             f"(it has: {names}); index a gallery first: "
                             f"imagesearch index GALLERY_DIR --collection {collection}")
    elif found.fingerprint and info.fingerprint and found.fingerprint != info.fingerprint:
        served = next((m for m in embedder.models() if m.fingerprint == found.fingerprint), None)
        if served is None:
            raise UsageError(
                f"collection {collection!r} on the ranker at {ranker.address} was indexed with another model "
                f"(fingerprint {found.fingerprint[:12]}) than the embedder at {embedder.address} serves "
                f"({info.backbone}, {info.weights}, fingerprint {info.fingerprint[:12]}): serve the model it was "
                f"indexed with, or move the gallery to this model without downtime: {REINDEX}")
        with embedder.with_model(served.model) as other:
            yield other, found
        return
    yield embedder, found


def _error_failure(name: str, exc: ClientError | None, prefix: str) -> Failure:
    if exc is None:
        return Failure(name, grpc.StatusCode.UNKNOWN, prefix + "no answer")
    return Failure(name, exc.code or grpc.StatusCode.UNKNOWN, prefix + str(exc))


class _Chunk:
    """One chunk's outcome: what was sent on to the ranker, what the ranker
    answered, what failed, and the first error of each stream."""

    def __init__(self, names: list[str], bar: _Progress):
        self.names = names
        self.bar = bar
        self.sent: list[str] = []
        self.done: set[str] = set()
        self.failed: dict[str, Failure] = {}
        self.embed_error: ClientError | None = None
        self.ranker_error: ClientError | None = None
        self.counted = 0

    def count(self, n: int = 1) -> None:
        self.counted += n
        self.bar.update(n)

    def fail(self, failure: Failure) -> None:
        self.failed[failure.name] = failure
        self.count()

    def embeddings(self, embedder: EmbedderClient, sources, *, count_sent: bool) -> Iterator[Embedding]:
        """The chunk's EmbedStream: Embeddings go on, Failures are kept."""
        try:
            for result in embedder.embed_stream(sources):
                if result.ok:
                    self.sent.append(result.name)
                    if count_sent:
                        self.count()
                    yield result
                else:
                    self.fail(result)
        except ClientError as exc:
            self.embed_error = exc


# A job's ranker step: sends the chunk's embeddings on and marks what the
# ranker confirmed (chunk.done) or refused (chunk.fail); returns nothing.
Step = Callable[[_Chunk, Iterator[Embedding], float], None]


class _Job:
    """The image listing, the report, the progress bar, the lock over the
    report, and stopping new chunks once a service has failed."""

    def __init__(self, embedder: EmbedderClient, ranker: RankerClient, listing: FolderListing, report: JobReport,
                 desc: str, progress: bool | None):
        self.start = time.monotonic()
        if not listing.images:
            raise UsageError(f"no images under {listing.root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.embedder, self.ranker = embedder, ranker
        self.images = listing.images
        self.report = report
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.bar = _Progress(len(listing.images), desc, progress)

    def run(self, step: Step, *, count_sent: bool, unanswered: str, chunk_size: int,
            concurrency: int | None) -> JobReport:
        """Every chunk through EmbedStream into `step`. `count_sent`: the bar
        counts an image once embedded (else once the ranker answered it);
        `unanswered` starts the reason of an image sent but not confirmed."""
        max_bytes = self.embedder.model_info().max_image_bytes

        def worker(chunk: list[tuple[str, Path]]) -> None:
            state = _Chunk([name for name, _ in chunk], self.bar)
            if self._skipped_after_failure(state.names):
                return
            sources = [file_source(name, path, max_bytes) for name, path in chunk]
            try:
                step(state, state.embeddings(self.embedder, sources, count_sent=count_sent),
                     self.embedder.stream_deadline(len(chunk)) + self.ranker.timeout)
            except ClientError as exc:
                state.ranker_error = exc
            self._record(state, unanswered)

        size = max(1, chunk_size)
        chunks = [self.images[i:i + size] for i in range(0, len(self.images), size)]
        try:
            _run_chunks(chunks, worker, concurrency=concurrency or 2 * self.embedder.replicas)
        finally:
            self.bar.close()
        self.report.seconds = time.monotonic() - self.start
        return self.report

    def _skipped_after_failure(self, names: list[str]) -> bool:
        """True (and the names reported as not done) once a service has failed."""
        if not self.stop.is_set():
            return False
        with self.lock:
            self.report.failed.update({n: Failure(n, grpc.StatusCode.ABORTED, "not done: stopped after an "
                                                  f"earlier error ({self.report.service_error})") for n in names})
        self.bar.update(len(names))
        return True

    def _record(self, state: _Chunk, unanswered: str) -> None:
        cause = state.embed_error or state.ranker_error
        with self.lock:
            self.report.done += len(state.done)
            for name in state.names:
                if name in state.done:
                    continue
                if name in state.failed:
                    self.report.failed[name] = state.failed[name]
                elif state.ranker_error is not None and name in state.sent:
                    self.report.failed[name] = _error_failure(name, state.ranker_error, unanswered)
                else:
                    self.report.failed[name] = _error_failure(name, cause, "not done: ")
            if cause is not None:
                if not self.report.service_error:
                    self.report.service_error = str(cause)
                self.stop.set()
        state.count(len(state.names) - state.counted)


class _Kept:
    """An iterator that remembers what it gave. gRPC reads a request iterator
    from a thread of its own, which may still be inside `next` when the call
    has failed: `all()` waits for it, then returns every item, read or not."""

    def __init__(self, items: Iterator[Embedding]):
        self._items, self._given, self._lock = items, [], threading.Lock()

    def __iter__(self):
        return self

    def __next__(self) -> Embedding:
        with self._lock:
            item = next(self._items)
            self._given.append(item)
            return item

    def all(self) -> list[Embedding]:
        with self._lock:
            return self._given + list(self._items)


def _run_chunks(chunks: list[list], worker: Callable[[list], None], *, concurrency: int) -> None:
    pool = futures.ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="chunk")
    try:
        # Each worker runs in a copy of this thread's context (a trace's current span goes along).
        for f in [pool.submit(contextvars.copy_context().run, worker, chunk) for chunk in chunks]:
            f.result()
    except BaseException:
        # Ctrl-C: do not wait for running streams here; the caller closes the
        # channels on its way out, which cancels them.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _listing(folder: str | Path | FolderListing, what: str) -> FolderListing:
    return folder if isinstance(folder, FolderListing) else list_images(folder, what=what)


RENAME_BATCH = 1000
# Deadline allowance per stored item for listing the collection (without, with vectors).
LIST_S, LIST_VECTORS_S = 0.001, 0.01


def index_folder(embedder: EmbedderClient, ranker: RankerClient, folder: str | Path | FolderListing, *,
                 collection: str, chunk_size: int = 32, concurrency: int | None = None,
                 progress: bool | None = None, attributes: Mapping[str, str] | Callable[[str], dict] | None = None,
                 attributes_from_folders: bool = False, sync: bool = False, full: bool = False) -> IndexReport:
    """Bring `collection` (or an alias's target) in step with the images under
    `folder` (or of a listing already made by clients.files.list_images, so
    that a folder is listed once): embed only new and changed files, re-key
    renamed ones, refresh attributes, and with `sync` delete items whose files
    are gone (see clients.cli.incremental). `full` embeds every file again.
    `attributes`: one map for every file, or a function of the file's name."""
    listing = _listing(folder, "gallery folder")
    report = IndexReport(folder=listing.root, total_images=len(listing.images), skipped=listing.skipped,
                         collection=collection)
    if not listing.images:
        raise UsageError(f"no images under {listing.root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    extra = attributes if callable(attributes) else extra_attributes(attributes or {}, attributes_from_folders)
    start = time.monotonic()
    with embedder_for(embedder, ranker, collection, must_exist=False) as (model, found):
        # An alias is resolved once: the whole run writes to the collection it names now.
        collection = found.name if found is not None else collection
        count = found.count if found is not None else 0
        stored = ({item.name: item for item in ranker.list_items(collection, timeout=ranker.timeout + count * LIST_S)}
                  if found is not None else {})
        plan = make_plan(listing.images, stored, extra, full=full)
        report.unchanged, report.gone, report.hashed = len(plan.unchanged), plan.gone, plan.hashed
        report.vanished = plan.vanished
        report.total_images -= len(plan.vanished)
        report.failed.update({n: Failure(n, grpc.StatusCode.INVALID_ARGUMENT, why)
                              for n, why in plan.unreadable.items()})
        for i in range(0, len(plan.renames), RENAME_BATCH):
            report.renamed += ranker.rename(collection, plan.renames[i:i + RENAME_BATCH]).renamed
        if plan.retag:
            wanted = set(plan.retag)
            items = [Embedding(i.name, i.vector, i.fingerprint)
                     for i in ranker.list_items(collection, with_vectors=True,
                                                timeout=ranker.timeout + count * LIST_VECTORS_S)
                     if i.name in wanted]
            report.retagged = ranker.upsert(collection, items, attributes=plan.attributes.get).upserted
        if sync and plan.gone:
            report.deleted = ranker.delete(collection, plan.gone).deleted
        if plan.embed:
            _embed_and_store(model, ranker, FolderListing(listing.root, plan.embed, []), report, plan.attributes,
                             collection=collection, chunk_size=chunk_size, concurrency=concurrency,
                             progress=progress)
    report.seconds = time.monotonic() - start
    return report


def _embed_and_store(embedder: EmbedderClient, ranker: RankerClient, listing: FolderListing, report: IndexReport,
                     attributes: Mapping[str, Mapping[str, str]], *, collection: str, chunk_size: int,
                     concurrency: int | None, progress: bool | None) -> None:
    job = _Job(embedder, ranker, listing, report, "indexing", progress)

    def store(items: Iterable[Embedding], timeout: float) -> None:
        reply = ranker.upsert(collection, items, attributes=attributes.get, timeout=timeout)
        with job.lock:
            report.inserted += reply.inserted
            report.replaced += reply.replaced

    def step(chunk: _Chunk, embeddings: Iterator[Embedding], timeout: float) -> None:
        items = _Kept(embeddings)
        try:
            store(items, timeout)
        except ClientError as exc:
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # One item the ranker refuses (a name it does not store, say) fails
            # the whole call: store the chunk's items one by one, so that only
            # the refused ones fail, each with the ranker's reason.
            for item in items.all():
                try:
                    store([item], ranker.timeout)
                except ClientError as one:
                    if one.code != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    chunk.failed[item.name] = Failure(item.name, one.code, str(one))
        chunk.done.update(n for n in chunk.sent if n not in chunk.failed)

    job.run(step, count_sent=True, unanswered="not confirmed by the ranker: ", chunk_size=chunk_size,
            concurrency=concurrency)


def query_folder(embedder: EmbedderClient, ranker: RankerClient, folder: str | Path | FolderListing, *,
                 collection: str, top_k: int = 10, chunk_size: int = 32, concurrency: int | None = None,
                 progress: bool | None = None, filters: Mapping[str, Sequence[str]] | None = None,
                 min_score: float | None = None, query_expansion: QueryExpansion | None = None,
                 k_reciprocal: KReciprocal | None = None) -> QueryReport:
    """Rank the gallery in `collection` for every image under `folder` (or of
    a listing): only items passing `filters` (applied before top_k), only
    matches scoring at least `min_score`."""
    listing = _listing(folder, "query folder")
    report = QueryReport(folder=listing.root, total_images=len(listing.images), skipped=listing.skipped,
                         collection=collection, top_k=top_k)

    def step(chunk: _Chunk, embeddings: Iterator[Embedding], timeout: float) -> None:
        for answer in ranker.search_stream(target, embeddings, top_k=top_k, filters=filters, timeout=timeout,
                                           query_expansion=query_expansion, k_reciprocal=k_reciprocal):
            if answer.ok:
                with job.lock:
                    report.results[answer.name] = above(answer.matches, min_score)
                chunk.done.add(answer.name)
                chunk.count()
            else:
                chunk.fail(answer)

    with embedder_for(embedder, ranker, collection, must_exist=True) as (model, found):
        target = found.name  # an alias resolved once: every answer comes from one collection
        job = _Job(model, ranker, listing, report, "querying", progress)
        job.run(step, count_sent=False, unanswered="not done: ", chunk_size=chunk_size, concurrency=concurrency)
    return report

