"""Data derived from a collection's vectors, rebuilt in the background: the
k-reciprocal neighbourhoods of each (k1, k2) searches have asked for
(maths.py). docs/ranker.md#derived-data-rebuilt-in-the-background says when
they are rebuilt and what a client and an operator see.

Each value is tagged with the database generation (the counter every write
bumps) of the snapshot it was built from; the SQLite backend tells each
collection's state its latest generation after every write (`note_write`,
under the write lock, once the write is in memory). The snapshot is taken
after the generation is read, so a value tagged g holds every write up to g
(perhaps newer ones). One background job per collection at a time
(memory/background.py) rebuilds every stale value from one snapshot, once
writes pause (`DERIVED_DEBOUNCE_S`, at most `DERIVED_MAX_DELAY_S`; at once
when a search waits).

Searches never build: `pending` (the servicer awaits it without a thread)
and `get` (blocking, with a deadline) wait until every value a search needs
is tagged with at least the generation the collection had when the search
asked. The wait ends at the search's deadline with DEADLINE_EXCEEDED; values
of an older generation are never served.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Sequence

from imagesearch import defaults, errors
from ranker_service.memory.background import Background, Job, join
from ranker_service.memory.collection import Collection
from ranker_service.rerank.maths import Neighbourhoods
from ranker_service.types import DerivedStatus

log = logging.getLogger(__name__)

# k-reciprocal entries kept per collection (a few (k1, k2) pairs); the least recently used goes first.
MAX_ENTRIES = 4
DEBOUNCE_S = float(os.environ.get(defaults.DERIVED_DEBOUNCE_ENV) or defaults.DERIVED_DEBOUNCE_S)

# states (GetStats' DerivedData.state, docs/ranker.md#re-ranking)
NONE, CURRENT, STALE, REBUILDING = "none", "current", "stale", "rebuilding"


Key = tuple[int, int]  # the (k1, k2) of a collection's k-reciprocal neighbourhoods


def describe(key: Key) -> str:
    return f"k-reciprocal k1={key[0]} k2={key[1]}"


class _Slot:
    __slots__ = ("generation", "value")

    def __init__(self) -> None:
        self.generation = -1
        self.value = None


class Wait(concurrent.futures.Future):
    """Done once a search's derived data is current (or with the error that
    stops it); `expired()` is the error for a search whose deadline passed."""

    def __init__(self, state: _State):
        super().__init__()
        self._owner = state  # (Future keeps its own `_state`)

    def expired(self) -> errors.DeadlineExceeded:
        return errors.DeadlineExceeded(self._owner.wait_message())


class _State:
    """One collection's derived data and its rebuilds. Thread-safe."""

    def __init__(self, coll: Collection, generation: int):
        self.coll = coll
        self.name = coll.name
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.slots: collections.OrderedDict[Key, _Slot] = collections.OrderedDict()
        self.generation = generation
        self.last_write = 0.0  # monotonic
        self.unseen_since: float | None = None  # first write no job has taken yet (monotonic)
        self.urgent = False  # a search waits: no debounce
        self.waits: list[tuple[int, tuple, Wait]] = []
        self.building_since = 0.0
        self.last_build_seconds = 0.0
        self.worker = Background(
            f"collection {self.name!r}", self.lock, self._due, self._run, thread=f"ranker-derived-{self.name[:32]}",
            failed="rebuilding its derived re-ranking data failed; searches that need it wait for the next try "
                   "(the next write or search)", on_end=self._ended)

    # ------------------------------------------------------------ under self.lock

    def _stale(self) -> list[Key]:
        return [key for key, slot in self.slots.items() if slot.generation < self.generation]

    def _due(self) -> bool:
        return bool(self._stale())

    def _want(self, key: Key) -> _Slot:
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = _Slot()
            if len(self.slots) > MAX_ENTRIES:
                self.slots.popitem(last=False)
        else:
            self.slots.move_to_end(key)
        return slot

    def _resolve(self) -> None:
        left = []
        for generation, keys, wait in self.waits:
            if wait.done():
                continue
            if all(self.slots[k].generation >= generation for k in keys if k in self.slots):
                _settle(wait, None)
            else:
                left.append((generation, keys, wait))
        self.waits = left

    def _fail_waits(self, exc: errors.ImageSearchError) -> None:
        for _, _, wait in self.waits:
            _settle(wait, exc)
        self.waits = []

    def pending(self, keys: Sequence[Key]) -> Wait | None:
        """None when every key is current; else a Wait, and a rebuild started (no debounce)."""
        slots = [self._want(k) for k in keys]
        if all(slot.generation >= self.generation for slot in slots):
            return None
        wait = Wait(self)
        if self.worker.stopped:
            _settle(wait, errors.Unavailable("the ranker is shutting down"))
            return wait
        self.waits.append((self.generation, tuple(keys), wait))
        self.urgent = True
        self.changed.notify_all()
        self.worker.maintain()
        return wait

    def wait_message(self) -> str:
        with self.lock:
            stale = [describe(k) for k in self._stale()] or [describe(k) for k in self.slots]
            running = (f"a rebuild has run for {time.time() - self.building_since:.1f} s"
                       if self.building_since else "its rebuild is about to start")
            last = (f"; the last one took {self.last_build_seconds:.1f} s" if self.last_build_seconds else "")
            return (f"collection {self.name!r}: its derived re-ranking data ({', '.join(stale)}) is being rebuilt "
                    f"after a write (generation {self.generation}; {running}{last}), and the call's deadline passed "
                    "while this search waited for it: retry later or with a longer deadline (GetStats shows "
                    "derived_data.state)")

    def status(self) -> DerivedStatus:
        with self.lock:
            if not self.slots:
                return DerivedStatus(NONE, self.generation, -1, 0.0, self.last_build_seconds, ())
            built = min(slot.generation for slot in self.slots.values())
            state = CURRENT if built >= self.generation else (REBUILDING if self.building_since else STALE)
            return DerivedStatus(state, self.generation, built, self.building_since, self.last_build_seconds,
                                 tuple(describe(k) for k in self.slots))

    # ------------------------------------------------------------ the job (background.py)

    def _run(self, job: Job) -> bool:
        with self.lock:
            while not job.cancelled and not self.urgent and self.unseen_since is not None:
                left = min(self.last_write + DEBOUNCE_S, self.unseen_since + defaults.DERIVED_MAX_DELAY_S)
                left -= time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            if job.cancelled:
                return False
            generation = self.generation  # read before the snapshot
            keys = self._stale()
            self.unseen_since = None
            self.urgent = False
            self.building_since = time.time()
        t0 = time.perf_counter()
        snapshot = self.coll.snapshot() if keys else None
        for key in keys:
            value = Neighbourhoods.build(*snapshot, *key, step=job.step)
            job.step(0)
            with self.lock:
                slot = self.slots.get(key)
                if slot is not None and generation > slot.generation:
                    slot.generation, slot.value = generation, value
                    self._resolve()
                    self.changed.notify_all()
        seconds = time.perf_counter() - t0
        with self.lock:
            self.last_build_seconds = seconds
        log.info("collection %r: derived %s for generation %d in the background in %.2fs", self.name,
                 ", ".join(describe(k) for k in keys), generation, seconds)
        return True

    def cancel(self, exc: errors.ImageSearchError) -> Job | None:
        """No more rebuilds: the running one is cancelled (returned, for `join`) and waiting searches get `exc`."""
        with self.lock:
            job = self.worker.cancel()
            self.changed.notify_all()  # a job in its debounce wait sees the cancel
            self._fail_waits(exc)
            return job

    def _ended(self, job: Job, ok: bool) -> None:
        self.building_since = 0.0
        if job.cancelled:
            self._fail_waits(errors.Unavailable("the ranker is shutting down"))
        elif not ok and self._stale():
            self._fail_waits(errors.Unavailable(
                f"collection {self.name!r}: rebuilding its derived re-ranking data failed (see the ranker's log); "
                "retry: the next search or write tries again"))


def _settle(wait: Wait, result: errors.ImageSearchError | None) -> None:
    try:
        if isinstance(result, Exception):
            wait.set_exception(result)
        else:
            wait.set_result(None)
    except concurrent.futures.InvalidStateError:  # cancelled by its waiter meanwhile
        pass


class DerivedData:
    """Every collection's derived data. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}

    def track(self, coll: Collection, generation: int, *, built: dict | None = None) -> None:
        """Follow a collection (loaded, created, or first written); `built`:
        {key: value} already built for `generation` (read from disk)."""
        state = _State(coll, generation)
        for key, value in (built or {}).items():
            slot = state._want(key)
            slot.generation, slot.value = generation, value
        with self._lock:
            old = self._states.get(coll.name)
            self._states[coll.name] = state
        if old is not None:
            join(old.cancel(errors.NotFound(f"collection {coll.name!r} was dropped")), old.worker.name)

    def current(self, collection: str) -> dict[Key, tuple[int, object]]:
        """{key: (generation, value)} of the collection's values that are current."""
        state = self._states.get(collection)
        if state is None:
            return {}
        with state.lock:
            return {key: (slot.generation, slot.value) for key, slot in state.slots.items()
                    if slot.value is not None and slot.generation >= state.generation}

    def note_write(self, coll: Collection, generation: int) -> None:
        """After a write is in memory (the gallery's write lock held): the
        collection's new generation; a rebuild starts if derived data is wanted."""
        state = self._states.get(coll.name)
        if state is None or state.coll is not coll:
            self.track(coll, generation)
            return
        with state.lock:
            state.generation = generation
            state.last_write = time.monotonic()
            if state.unseen_since is None:
                state.unseen_since = state.last_write
            state.changed.notify_all()
            state.worker.maintain()

    def pending(self, collection: str, keys: Sequence[Key]) -> Wait | None:
        """None when the collection's `keys` are current (or it is not
        followed); else a Wait that is done once they are."""
        state = self._states.get(collection)
        if state is None or not keys:
            return None
        with state.lock:
            return state.pending(keys)

    def get(self, collection: str, keys: Sequence[Key], deadline: float | None) -> dict:
        """{key: value}, every one current, waiting (never building) until
        `deadline` (time.monotonic(); None: no limit); DeadlineExceeded past it."""
        if not keys:
            return {}
        state = self._states.get(collection)
        if state is None:
            raise errors.NotFound(f"collection {collection!r} was dropped")
        while True:
            with state.lock:
                wait = state.pending(keys)
                if wait is None:
                    return {k: state.slots[k].value for k in keys}
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    raise concurrent.futures.TimeoutError
                wait.result(left)
            except concurrent.futures.TimeoutError:
                wait.cancel()
                raise wait.expired() from None

    def status(self, collection: str) -> DerivedStatus | None:
        state = self._states.get(collection)
        return None if state is None else state.status()

    def nbytes(self, collection: str) -> int:
        """Memory the collection's derived data holds."""
        state = self._states.get(collection)
        if state is None:
            return 0
        return sum(slot.value.nbytes for slot in list(state.slots.values()) if slot.value is not None)

    def drop(self, collection: str) -> None:
        with self._lock:
            state = self._states.pop(collection, None)
        if state is not None:
            join(state.cancel(errors.NotFound(f"collection {collection!r} was dropped")), state.worker.name)

    def stop(self) -> None:
        """Cancel every rebuild and wait for them (a clean stop)."""
        with self._lock:
            states = list(self._states.values())
        jobs = [(state.cancel(errors.Unavailable("the ranker is shutting down")), state.worker.name)
                for state in states]
        for job, name in jobs:
            join(job, name)
