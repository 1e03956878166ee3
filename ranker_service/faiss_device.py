"""Where FAISS searches run: `--faiss-device auto|cpu|cuda`.

`cpu` (the default) keeps every index on the CPU. `cuda` moves the searchable
copy of each collection's index to GPU 0 when the installed faiss has GPU
support (faiss-gpu: `faiss.get_num_gpus() > 0`) and ends the start with a
one-line error when it has none; `auto` uses the GPU when there is one, the
CPU otherwise.

On the GPU: the CPU index stays the one that writes apply to first and that
index files are written from; the GPU copy (`faiss.index_cpu_to_gpu`) gets
the same adds and answers searches. Kinds FAISS can run there: `ivf_pq`
(float16 lookup tables) and `exact` float16 (a flat inner-product index
storing float16); `hnsw` has no FAISS GPU form and stays on the CPU. GPU
indexes take no IDSelector, so a search on the GPU fetches more candidates
and drops dead ids itself (see FaissCollection._device_search).
"""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np

from imagesearch import errors
from ranker_service.kinds import EXACT, IVF_PQ, IndexSpec

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
GPU_MAX_K = 2048  # the most results one FAISS GPU search returns

_resources = None
_resources_lock = threading.Lock()


def gpu_count() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # a faiss-gpu build on a machine without a driver
        return 0


def choose(requested: str, gpus: int | None = None) -> str:
    """`cpu` or `cuda` for a `--faiss-device` value; InvalidArgument (one
    line) for `cuda` without GPU support or an unknown value."""
    if requested not in DEVICES:
        raise errors.InvalidArgument(f"--faiss-device {requested!r}: use one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu"
    gpus = gpu_count() if gpus is None else gpus
    if gpus > 0:
        return "cuda"
    if requested == "cuda":
        raise errors.InvalidArgument(
            f"--faiss-device cuda: the installed faiss {faiss.__version__} has no GPU support "
            "(faiss.get_num_gpus() is 0); install faiss-gpu on a machine with a CUDA GPU, or use "
            "--faiss-device auto or cpu")
    return "cpu"


def runs_on_gpu(spec: IndexSpec) -> bool:
    """Kinds whose index FAISS can search on a GPU."""
    return spec.kind == IVF_PQ or (spec.kind == EXACT and spec.float16)


def _gpu_resources():
    global _resources
    with _resources_lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return _resources


def index_to_gpu(index, spec: IndexSpec):
    """A GPU copy of a CPU index of a kind that `runs_on_gpu`."""
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True  # ivf_pq: float16 lookup tables; flat: float16 storage
    if spec.kind == EXACT:
        # A flat inner-product index storing float16 (FAISS has no GPU form of
        # the CPU's IndexScalarQuantizer): filled from the CPU rows in chunks.
        flat = faiss.IndexFlatIP(index.d)
        gpu = faiss.index_cpu_to_gpu(_gpu_resources(), 0, flat, options)
        for start in range(0, index.ntotal, 65536):
            stop = min(start + 65536, index.ntotal)
            gpu.add(index.reconstruct_n(start, stop - start))
        return gpu
    gpu = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index, options)
    faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", spec.nprobe)
    return gpu


def live_ids(found: np.ndarray, live: np.ndarray) -> np.ndarray:
    """The ids of `found` (one row of a search, -1 for none) whose bit is set
    in the packed little-endian bitmap `live`, in order."""
    found = found[found >= 0]
    inside = found < live.shape[0] * 8
    found = found[inside]
    bits = (live[found >> 3] >> (found & 7).astype(np.uint8)) & 1
    return found[bits.astype(bool)]
