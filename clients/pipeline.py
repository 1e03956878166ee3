"""The bulk jobs of the CLI, on top of the two clients:

- `index_folder`: every image under a folder, streamed through EmbedStream
  straight into Upsert (one pair of streams per chunk, several chunks at a
  time so round_robin spreads them over embedder replicas).
- `query_folder`: every image under a folder, streamed through EmbedStream
  straight into SearchStream; returns each query's ranked matches.

Bad files never stop a job: each is reported with its reason. A failing
service stops starting new chunks; what was not done is listed, so a re-run
(which replaces rather than duplicates) completes the job."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable, Sequence

import grpc

from clients.embedder import EmbedderClient, file_source
from clients.errors import ClientError, UsageError
from clients.files import IMAGE_EXTENSIONS, list_images
from clients.ranker import Match, RankerClient
from imagesearch.v1 import ranker_pb2

log = logging.getLogger(__name__)

# Per-item codes that mean "this file is bad", not "a service is in trouble".
INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}


@dataclasses.dataclass
class JobReport:
    folder: Path
    total_images: int = 0
    done: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # not images at all
    failed: dict[str, str] = dataclasses.field(default_factory=dict)          # images not done: name -> why
    service_error: str = ""          # a service failed: the job is incomplete through no fault of the input
    seconds: float = 0.0

    @property
    def bad_inputs(self) -> dict[str, str]:
        """Failures caused by the file itself (undecodable, too large)."""
        return {n: w for n, w in self.failed.items() if w.split(":", 1)[0] in _INPUT_NAMES}

    @property
    def runtime_failures(self) -> dict[str, str]:
        """Failures caused by a service (down, timed out, erroring)."""
        return {n: w for n, w in self.failed.items() if w.split(":", 1)[0] not in _INPUT_NAMES}


@dataclasses.dataclass
class IndexReport(JobReport):
    collection: str = ""
    inserted: int = 0
    replaced: int = 0


@dataclasses.dataclass
class QueryReport(JobReport):
    collection: str = ""
    top_k: int = 10
    results: dict[str, list[Match]] = dataclasses.field(default_factory=dict)

    def names(self) -> dict[str, list[str]]:
        """The competition JSON: {query file: [ranked gallery files]}."""
        return {q: [m.name for m in ms] for q, ms in sorted(self.results.items())}


_INPUT_NAMES = {c.name for c in INPUT_CODES}


def _reason(code: grpc.StatusCode | None, message: str) -> str:
    """Every failure reason starts with the status code's name."""
    return f"{code.name if code else 'UNKNOWN'}: {message}"


def _error_reason(exc: ClientError, prefix: str = "") -> str:
    return _reason(exc.code or grpc.StatusCode.UNKNOWN, prefix + str(exc))


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool | None):
        self._bar = None
        self._lock = threading.Lock()
        if enabled is not False and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                             disable=None if enabled is None else False, leave=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _chunks(items: Sequence, size: int) -> list[list]:
    size = max(1, size)
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def check_collection_model(embedder: EmbedderClient, ranker: RankerClient, collection: str, *,
                           must_exist: bool) -> None:
    """Early, clear errors: an unknown collection (for queries) or one indexed
    with another model than the embedder serves."""
    stats = ranker.stats()
    found = next((c for c in stats.collections if c.name == collection), None)
    info = embedder.model_info()
    if found is None:
        if must_exist:
            names = ", ".join(c.name for c in stats.collections) or "none"
            raise UsageError(f"collection {collection!r} does not exist on the ranker at {ranker.address} "
                             f"(it has: {names}); index a gallery first: "
                             f"imagesearch index GALLERY_DIR --collection {collection}")
        return
    if found.fingerprint and info.fingerprint and found.fingerprint != info.fingerprint:
        raise UsageError(
            f"collection {collection!r} on the ranker at {ranker.address} was indexed with another model "
            f"(fingerprint {found.fingerprint[:12]}) than the embedder at {embedder.address} serves "
            f"({info.backbone}, {info.weights}, fingerprint {info.fingerprint[:12]}): index the gallery again "
            "into a new --collection with this model, or serve the model it was indexed with")


def _run_chunks(chunks: list[list], worker: Callable[[list], None], *, concurrency: int) -> None:
    pool = futures.ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="chunk")
    try:
        for f in [pool.submit(worker, chunk) for chunk in chunks]:
            f.result()
    except BaseException:
        # Ctrl-C: do not wait for running streams here; the caller closes the
        # channels on its way out, which cancels them.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


class _Job:
    """What indexing and querying share: the image listing, the report, the
    progress bar, the lock over the report, and stopping new chunks once a
    service has failed."""

    def __init__(self, folder: str | Path, what: str, desc: str, progress: bool | None, make_report):
        self.start = time.monotonic()
        listing = list_images(folder, what=what)
        if not listing.images:
            raise UsageError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        self.images = listing.images
        self.report = make_report(folder=listing.root, total_images=len(listing.images), skipped=listing.skipped)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.bar = _Progress(len(listing.images), desc, progress)

    def skipped_after_failure(self, names: list[str]) -> bool:
        """True (and the names reported as not done) once a service has failed."""
        if not self.stop.is_set():
            return False
        with self.lock:
            self.report.failed.update({n: _reason(grpc.StatusCode.ABORTED, "not done: stopped after an "
                                                  f"earlier error ({self.report.service_error})") for n in names})
        self.bar.update(len(names))
        return True

    @staticmethod
    def not_done(cause: ClientError | None) -> str:
        return (_error_reason(cause, "not done: ") if cause is not None
                else _reason(grpc.StatusCode.UNKNOWN, "not done: no answer"))

    def service_failed(self, cause: ClientError | None) -> None:
        """Record the first service failure and stop new chunks (call under the lock)."""
        if cause is not None:
            if not self.report.service_error:
                self.report.service_error = str(cause)
            self.stop.set()

    def run(self, worker: Callable[[list], None], *, chunk_size: int, concurrency: int):
        try:
            _run_chunks(_chunks(self.images, chunk_size), worker, concurrency=concurrency)
        finally:
            self.bar.close()
        self.report.seconds = time.monotonic() - self.start
        return self.report


def index_folder(embedder: EmbedderClient, ranker: RankerClient, folder: str | Path, *, collection: str,
                 chunk_size: int = 32, concurrency: int | None = None, progress: bool | None = None) -> IndexReport:
    job = _Job(folder, "gallery folder", "indexing", progress,
               lambda **kw: IndexReport(collection=collection, **kw))
    report, bar = job.report, job.bar
    info = embedder.model_info()
    check_collection_model(embedder, ranker, collection, must_exist=False)

    def worker(chunk: list[tuple[str, Path]]) -> None:
        names = [name for name, _ in chunk]
        if job.skipped_after_failure(names):
            return
        sources = [file_source(name, path, info.max_image_bytes) for name, path in chunk]
        sent: list[str] = []
        failed: dict[str, str] = {}
        embed_error: list[ClientError] = []

        def requests():
            try:
                for result in embedder.embed_stream(sources):
                    bar.update(1)
                    if result.ok:
                        sent.append(result.id)
                        yield ranker_pb2.UpsertRequest(collection=collection, name=result.id,
                                                       vector=result.vector.tolist(), fingerprint=result.fingerprint)
                    else:
                        failed[result.id] = _reason(result.code, result.error)
            except ClientError as exc:
                embed_error.append(exc)

        upsert_error: ClientError | None = None
        reply = None
        try:
            reply = ranker.upsert(requests(), timeout=embedder.stream_deadline(len(chunk)) + ranker.timeout)
        except ClientError as exc:
            upsert_error = exc
        with job.lock:
            if reply is not None:
                report.done += len(sent)
                report.inserted += reply.inserted
                report.replaced += reply.replaced
                if reply.upserted != len(sent):
                    log.warning("the ranker acknowledged %d of %d items sent", reply.upserted, len(sent))
            for name in names:
                if name in failed:
                    report.failed[name] = failed[name]
                elif upsert_error is not None and name in sent:
                    report.failed[name] = _error_reason(upsert_error, "not confirmed by the ranker: ")
                elif name not in sent:
                    report.failed[name] = job.not_done(embed_error[0] if embed_error else upsert_error)
            job.service_failed(embed_error[0] if embed_error else upsert_error)
        bar.update(len(chunk) - len(sent) - len(failed))

    return job.run(worker, chunk_size=chunk_size, concurrency=concurrency or 2 * embedder.replicas)


def query_folder(embedder: EmbedderClient, ranker: RankerClient, folder: str | Path, *, collection: str,
                 top_k: int = 10, chunk_size: int = 32, concurrency: int | None = None,
                 progress: bool | None = None) -> QueryReport:
    job = _Job(folder, "query folder", "querying", progress,
               lambda **kw: QueryReport(collection=collection, top_k=top_k, **kw))
    report, bar = job.report, job.bar
    info = embedder.model_info()
    check_collection_model(embedder, ranker, collection, must_exist=True)

    def worker(chunk: list[tuple[str, Path]]) -> None:
        names = [name for name, _ in chunk]
        if job.skipped_after_failure(names):
            return
        sources = [file_source(name, path, info.max_image_bytes) for name, path in chunk]
        failed: dict[str, str] = {}
        answered: dict[str, list[Match]] = {}
        embed_error: list[ClientError] = []

        def requests():
            try:
                for result in embedder.embed_stream(sources):
                    if result.ok:
                        yield ranker_pb2.SearchStreamRequest(id=result.id, collection=collection,
                                                             vector=result.vector.tolist(), top_k=top_k,
                                                             fingerprint=result.fingerprint)
                    else:
                        failed[result.id] = _reason(result.code, result.error)
                        bar.update(1)
            except ClientError as exc:
                embed_error.append(exc)

        search_error: ClientError | None = None
        try:
            for answer in ranker.search_stream(requests(), timeout=embedder.stream_deadline(len(chunk)) + ranker.timeout):
                bar.update(1)
                if answer.ok:
                    answered[answer.id] = answer.matches
                else:
                    failed[answer.id] = _reason(answer.code, answer.error)
        except ClientError as exc:
            search_error = exc
        with job.lock:
            report.results.update(answered)
            report.done += len(answered)
            for name in names:
                if name in answered:
                    continue
                if name in failed:
                    report.failed[name] = failed[name]
                else:
                    report.failed[name] = job.not_done(embed_error[0] if embed_error else search_error)
                    bar.update(1)
            job.service_failed(embed_error[0] if embed_error else search_error)

    return job.run(worker, chunk_size=chunk_size, concurrency=concurrency or 2 * embedder.replicas)
