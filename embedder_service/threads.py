"""How the embedder splits the machine's cores between decoding and inference,
and the batch size that goes with it.

Three pools share the CPU: the decode threads (Pillow decode + resize, then
torch's ToTensor/Normalize, per image), the inference engine's intra-op
threads (ONNX Runtime or torch) and, for the torch engine, torch's
own OpenMP team. `plan_threads` is the default split as a function of the core
count, the engine and the device; every number can be overridden by a flag or
its environment variable (docs/embedder.md#threads, measured in
bench/results/embedder.md).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from pathlib import Path

from imagesearch import defaults, errors

@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    cores: int
    max_batch: int  # largest batch the model runs
    torch_threads: int  # torch intra-op: the torch engine's forward, and each decode thread's tensor ops
    engine_threads: int  # ONNX Runtime intra-op threads (the torch engine uses torch_threads)
    decode_workers: int
    stream_window: int  # items one EmbedStream has in flight

    def describe(self) -> str:
        return (f"{self.cores} cores: max batch {self.max_batch}, engine threads {self.engine_threads}, "
                f"torch threads {self.torch_threads}, decode workers {self.decode_workers}, "
                f"stream window {self.stream_window}")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may use: its CPU affinity (e.g. a container's cpuset),
    else the CPU count, capped by a cgroup v2 CPU quota (`cpu.max`, e.g. a
    Kubernetes CPU limit: "200000 100000" = 2 cores, rounded up)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = max(1, os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 file, or one we cannot read: no quota known
    return cores


def plan_threads(engine: str, device_type: str, max_batch: int = 0, *, cores: int | None = None,
                 torch_threads: int = 0, engine_threads: int = 0,
                 decode_workers: int = 0, stream_window: int = 0) -> ThreadPlan:
    """The default thread split for `engine` ("torch" or "onnxruntime", already
    resolved) on `device_type`, with every non-zero /
    argument taking precedence.

    Batch size: defaults.CPU_MAX_BATCH on CPU (measured: batches of 8 stream
    faster than 32 on CPU with either engine), defaults.CUDA_MAX_BATCH on a GPU.

    On a GPU: one torch thread (the CPU's work is the per-image preprocessing,
    parallel over the decode threads), min(8, cores) decode workers, a window
    of two batches (decode the next batch while the GPU runs this one).

    On CPU with an ONNX engine: the engine gets every core
    (defaults.CPU_ENGINE_THREADS_PER_CORE), torch one thread (it only runs the
    decode threads' tensor ops: an OpenMP team per decode thread would
    oversubscribe the cores), decode workers = cores, and a window of
    defaults.CPU_STREAM_WINDOW_BATCHES batches so the decode threads prepare
    batch n+1 while batch n runs (the engine's threads never spin:
    engines.OnnxRuntimeEngine).

    On CPU with torch: torch gets every core for the forward pass, decode
    workers = cores, a window of one batch (measured: with torch's OpenMP team
    on every core, decoding further ahead only competes with it)."""
    if engine not in ("torch", "onnxruntime"):
        raise errors.InvalidArgument(f"plan_threads needs a resolved engine, not {engine!r}")
    for label, value in [("torch threads", torch_threads), ("engine threads", engine_threads),
                         ("decode workers", decode_workers), ("stream window", stream_window)]:
        if value < 0:
            raise errors.InvalidArgument(f"{label} must be at least 0 (0 = the default), not {value}")
    if max_batch < 0:
        raise errors.InvalidArgument(f"max batch must be at least 0 (0 = the default), not {max_batch}")
    cores = cores or available_cores()
    max_batch = max_batch or (defaults.CUDA_MAX_BATCH if device_type == "cuda" else defaults.CPU_MAX_BATCH)
    if device_type == "cuda":
        plan = ThreadPlan(cores, max_batch, torch_threads=1, engine_threads=1,
                          decode_workers=min(8, cores), stream_window=2 * max_batch)
    elif engine == "torch":
        plan = ThreadPlan(cores, max_batch, torch_threads=cores, engine_threads=cores,
                          decode_workers=cores, stream_window=max_batch)
    else:
        plan = ThreadPlan(cores, max_batch, torch_threads=1,
                          engine_threads=max(1, round(cores * defaults.CPU_ENGINE_THREADS_PER_CORE)),
                          decode_workers=max(1, round(cores * defaults.CPU_DECODE_WORKERS_PER_CORE)),
                          stream_window=defaults.CPU_STREAM_WINDOW_BATCHES * max_batch)
    return dataclasses.replace(
        plan,
        torch_threads=torch_threads or plan.torch_threads,
        engine_threads=engine_threads or (torch_threads if engine == "torch" and torch_threads else
                                          plan.engine_threads),
        decode_workers=decode_workers or plan.decode_workers,
        stream_window=stream_window or plan.stream_window)


class Turns:
    """One model batch at a time across the models an embedder serves, in the
    order their model threads ask: each engine is sized for the whole machine
    (one plan for all), so two batches at once would only split its cores,
    and first come, first served keeps a busy model from starving another.
    A model thread waiting for its turn sleeps."""

    def __init__(self):
        self._queue: collections.deque = collections.deque()
        self._changed = threading.Condition()

    def taking(self, run):
        """`run` made to wait for its turn."""
        def in_turn(*args):
            me = object()
            with self._changed:
                self._queue.append(me)
                self._changed.wait_for(lambda: self._queue[0] is me)
            try:
                return run(*args)
            finally:
                with self._changed:
                    self._queue.popleft()
                    self._changed.notify_all()
        return in_turn
