"""Dynamic batching, independent of gRPC and of the model.

A `Batcher` takes requests one at a time (`submit`), prepares each on a thread
pool (for the embedder: decode + preprocess; one batch prepared ahead of the
model, which bounds the memory of decoded tensors), and hands the prepared items to
`run` in batches on one model thread: a batch closes when it holds `max_batch`
items or `max_wait_s` after its first item, whichever is first. While the model
thread runs batch n, the pool prepares batch n+1, so decoding and inference
overlap.

Requests are served by rank, not in arrival order: first by `priority` (the
embedder gives single `Embed` calls 0 and `EmbedStream` items 1: interactive
before bulk), then by how many requests of the same `source` (a stream; each
unary call is its own) were already in the batcher when it came, then in
arrival order. Decoding and batching both take the best-ranked request first,
so a single call gets into the next batch even while a thousand streams keep
the model busy; and a priority-0 request never shares a batch with lower ones:
it waits for the batch being run, then runs in a batch of its own (the time of
a few images, not of a full batch).

A request carries an `alive()` callable (for a gRPC call: the call is still
active and its deadline has not passed). Requests that are no longer alive are
dropped before preparing and again before inference; their futures fail with
`Dropped`.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from concurrent import futures
from typing import Callable, Generic, Sequence, TypeVar

from imagesearch import errors

log = logging.getLogger(__name__)

P = TypeVar("P")  # payload as submitted
T = TypeVar("T")  # prepared item
R = TypeVar("R")  # result of one item

Alive = Callable[[], bool]


def _always() -> bool:
    return True


@dataclasses.dataclass
class BatcherStats:
    """Counters since start."""

    submitted: int = 0
    prepare_failed: int = 0
    dropped: int = 0
    batches: int = 0
    items: int = 0


class _Request(Generic[P, T, R]):
    __slots__ = ("payload", "alive", "future", "prepared", "rank")

    def __init__(self, payload: P, alive: Alive):
        self.payload = payload
        self.alive = alive
        self.future: futures.Future[R] = futures.Future()
        self.prepared: T | None = None
        self.rank: tuple[int, int, int] = (0, 0, 0)

    def __lt__(self, other: "_Request") -> bool:
        return self.rank < other.rank


class Batcher(Generic[P, T, R]):
    """`prepare(payload) -> item` runs on `prepare_workers` threads;
    `run([item, ...]) -> [result, ...]` runs on one model thread, in batches
    of up to `max_batch` gathered for at most `max_wait_s`."""

    def __init__(self, prepare: Callable[[P], T], run: Callable[[list[T]], Sequence[R]], *,
                 max_batch: int = 32, max_wait_s: float = 0.005, prepare_workers: int = 2,
                 name: str = "batcher"):
        if max_batch < 1:
            raise errors.InvalidArgument(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_s < 0:
            raise errors.InvalidArgument(f"max_wait_s must be >= 0, not {max_wait_s}")
        if prepare_workers < 1:
            raise errors.InvalidArgument(f"prepare_workers must be at least 1, not {prepare_workers}")
        self._prepare = prepare
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self._to_prepare: list[_Request] = []  # heaps by rank
        self._ready: list[_Request] = []
        self._inflight: dict[object, int] = {}  # source -> requests submitted, not yet done
        self._seq = itertools.count()
        self._pool = futures.ThreadPoolExecutor(prepare_workers, thread_name_prefix=f"{name}-prepare")
        self._lock = threading.Lock()
        self._has_ready = threading.Condition(self._lock)
        self._room = threading.Condition(self._lock)  # for prepared requests waiting for the model
        # Decoded ahead of the model (bounds the memory of prepared tensors): one
        # batch, prepared while the model runs the previous one. Priority-0
        # requests are prepared past it, to make the model's next batch.
        self.max_prepared = max_batch
        self._preparing = 0
        self._stopping = False  # set by close() once every submitted request is prepared
        self._abandoned = False  # set by close() when its timeout passed first: what is left fails
        self._running: set[_Request] = set()  # handed to `run`, not yet answered
        self._closed = False
        self._stats = BatcherStats()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public

    @property
    def stats(self) -> BatcherStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def submit(self, payload: P, alive: Alive | None = None, source: object = None,
               priority: int = 0) -> futures.Future[R]:
        """Queue one item; the future holds its result, the exception `prepare`
        or `run` raised for it, or `Dropped`. `source` groups the requests of one
        caller (a stream) for ranking; None: the request is its own source.
        Lower `priority` goes first: 0 is interactive (prepared past the
        read-ahead bound, batched apart from the rest), 1 and up are bulk."""
        if priority < 0:
            raise errors.InvalidArgument(f"priority must be 0 (interactive) or more (bulk), not {priority}")
        request: _Request[P, T, R] = _Request(payload, alive or _always)
        key = request if source is None else source
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the server is shutting down: retry on another replica")
            # One task per request, each preparing the best one waiting. It is queued first
            # (it runs once this lock is let go): should the pool refuse it (at interpreter
            # exit), nothing is left counted or queued for a task that will never run.
            self._pool.submit(self._prepare_best)
            self._stats.submitted += 1
            held = self._inflight.get(key, 0)
            self._inflight[key] = held + 1
            request.rank = (priority, held, next(self._seq))
            heapq.heappush(self._to_prepare, request)
            if priority == 0:
                self._room.notify_all()  # a worker waiting for room may take this one now
        request.future.add_done_callback(lambda _f: self._done(key))
        return request.future

    def in_flight(self, source: object) -> int:
        """Requests of `source` submitted and not yet done."""
        with self._lock:
            return self._inflight.get(source, 0)

    def _done(self, key: object) -> None:
        with self._lock:
            left = self._inflight.get(key, 1) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what was submitted, stop the model thread.
        With a `timeout`, return within about that many seconds whatever
        `prepare` or `run` do: should the work not be done by then (a model
        call that hangs), every request not yet prepared or not yet run fails
        with Unavailable, and the threads still busy are left to end alone
        (the model thread is a daemon; a prepare worker is let go as soon as
        its own `prepare` call returns)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        with self._lock:
            # every submitted request is prepared (in _ready) or failed, or the time is up
            while (self._to_prepare or self._preparing) and left() != 0.0:
                self._room.wait(left())
            late = bool(self._to_prepare or self._preparing)
            self._stopping = True
            self._has_ready.notify_all()
        self._pool.shutdown(wait=False)  # its queued tasks find nothing left to take
        self._thread.join(left())
        if late or self.running:
            self._abandon()
        stats = self.stats
        log.info("%s stopped: %d items in %d batches, %d dropped, %d failed to prepare%s",
                 self.name, stats.items, stats.batches, stats.dropped, stats.prepare_failed,
                 f"; gave up after {timeout:g}s with work left (it failed with UNAVAILABLE)"
                 if late or self.running else "")

    def _abandon(self) -> None:
        """close()'s timeout passed: fail what is still queued or prepared; the
        prepare workers waiting for room give up."""
        with self._lock:
            self._abandoned = True
            leftover = self._to_prepare + self._ready + list(self._running)
            self._to_prepare.clear()
            self._ready.clear()
            self._room.notify_all()
            self._has_ready.notify_all()
        for request in leftover:
            _fail_stopped(request)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ workers

    def _drop(self, request: _Request) -> None:
        with self._lock:
            self._stats.dropped += 1
        if not request.future.done():
            request.future.set_exception(errors.Dropped("the caller cancelled or its deadline passed"))

    def _prepare_best(self) -> None:
        # Wait for room before choosing: the best request is chosen when it can be prepared.
        with self._room:
            while (not self._abandoned and self._to_prepare and self._to_prepare[0].rank[0] > 0
                   and len(self._ready) + self._preparing >= self.max_prepared):
                self._room.wait()
            if not self._to_prepare:
                return  # close() gave up and failed the request this task was for
            request = heapq.heappop(self._to_prepare)
            self._preparing += 1
        try:
            self._prepare_one(request)
        finally:
            with self._room:
                self._preparing -= 1
                # a worker waiting for room, or close() waiting for the last one
                self._room.notify_all()

    def _prepare_one(self, request: _Request) -> None:
        if not request.future.set_running_or_notify_cancel():
            with self._lock:
                self._stats.dropped += 1
            return
        if not _is_alive(request):
            self._drop(request)
            return
        try:
            request.prepared = self._prepare(request.payload)
        except BaseException as exc:
            with self._lock:
                self._stats.prepare_failed += 1
            if not isinstance(exc, errors.ImageSearchError):
                log.exception("%s: preparing an item failed", self.name)
            request.future.set_exception(exc)
            return
        with self._has_ready:
            abandoned = self._abandoned
            if not abandoned:
                heapq.heappush(self._ready, request)
                self._has_ready.notify()
        if abandoned:  # failed outside the lock: the future's done-callbacks take it
            _fail_stopped(request)

    def _next_batch(self) -> list[_Request] | None:
        """The best-ranked prepared requests, up to max_batch, once the batch is
        full or max_wait_s has passed since a request was first waiting; None
        when closed and nothing is left."""
        with self._has_ready:
            while not self._ready:
                if self._stopping:
                    return None
                self._has_ready.wait()
            deadline = time.monotonic() + self.max_wait_s
            while len(self._ready) < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._has_ready.wait(remaining)
            if self._ready[0].rank[0] == 0 and any(r.rank[0] > 0 for r in self._ready):
                # Priority-0 requests wait for no bulk: they go in a batch of their own,
                # which runs in the time of a few images, not of a full batch.
                batch = []
                while self._ready and self._ready[0].rank[0] == 0 and len(batch) < self.max_batch:
                    batch.append(heapq.heappop(self._ready))
            else:
                batch = [heapq.heappop(self._ready) for _ in range(min(self.max_batch, len(self._ready)))]
            self._room.notify_all()
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = []
            for request in batch:
                if _is_alive(request):
                    live.append(request)
                else:
                    self._drop(request)
            if live:
                with self._lock:
                    self._running.update(live)
                try:
                    self._run_batch(live)
                finally:
                    with self._lock:
                        self._running.difference_update(live)

    def _run_batch(self, batch: list[_Request]) -> None:
        try:
            results = self._run([r.prepared for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: run() gave {len(results)} results for {len(batch)} items")
        except BaseException as exc:
            log.exception("%s: a batch of %d failed", self.name, len(batch))
            for request in batch:
                _settle(request, exception=exc)
            return
        finally:
            for request in batch:
                request.prepared = None  # let the tensors go as soon as possible
        with self._lock:
            self._stats.batches += 1
            self._stats.items += len(batch)
        for request, result in zip(batch, results):
            _settle(request, result=result)


def _fail_stopped(request: _Request) -> None:
    """close() gave up before this request was answered."""
    request.prepared = None
    _settle(request, exception=errors.Unavailable(
        "the server stopped before this item was embedded: retry on another replica"))


def _settle(request: _Request, *, result=None, exception: BaseException | None = None) -> None:
    """Set the request's outcome unless it has one (close() may have failed it
    while a hung `run` held it)."""
    try:
        if exception is not None:
            request.future.set_exception(exception)
        else:
            request.future.set_result(result)
    except futures.InvalidStateError:
        pass


def _is_alive(request: _Request) -> bool:
    try:
        return bool(request.alive())
    except Exception:  # a broken liveness check must not take the model thread down
        log.exception("alive() raised; treating the request as gone")
        return False
