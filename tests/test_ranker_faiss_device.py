"""`--faiss-device`: the choice (cpu, cuda, auto) and its one-line error
without GPU support, and the GPU seam of the FAISS kinds, run on the CPU with
a stand-in for the GPU copy that, like a FAISS GPU index, refuses an
IDSelector: writes reach both copies, searches go to the copy, dead ids are
dropped after the search (and searched again on the CPU index when the GPU's
top-k limit cut the fetch), a rebuild swaps in a new copy; the results equal
the CPU path's. The real GPU path needs faiss-gpu and a GPU (none here)."""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest

from imagesearch import errors
from testkit import ROOT, ServiceProcess
from ranker_service import faiss_collection, faiss_device
from ranker_service.index import make_collection
from tests.test_ranker_kinds import DIM, SPECS, N, clustered


def test_choice_of_device():
    assert faiss_device.choose("cpu", gpus=0) == faiss_device.choose("cpu", gpus=2) == "cpu"
    assert faiss_device.choose("auto", gpus=0) == "cpu"
    assert faiss_device.choose("auto", gpus=1) == faiss_device.choose("cuda", gpus=1) == "cuda"
    with pytest.raises(errors.InvalidArgument) as info:
        faiss_device.choose("cuda", gpus=0)
    message = str(info.value)
    assert "\n" not in message and "no GPU support" in message and "faiss-gpu" in message
    with pytest.raises(errors.InvalidArgument, match="use one of auto, cpu, cuda"):
        faiss_device.choose("tpu")
    assert faiss_device.gpu_count() == faiss.get_num_gpus()
    assert [faiss_device.runs_on_gpu(SPECS[k]) for k in ("exact16", "hnsw", "ivf_pq")] == [True, False, True]


def test_live_ids_reads_the_packed_bitmap():
    live = np.packbits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool), bitorder="little")
    found = np.array([9, 1, 3, -1, 0, 4, 42], dtype=np.int64)
    assert faiss_device.live_ids(found, live).tolist() == [9, 3, 0]


class FakeGpuIndex:
    """A CPU clone standing in for `index_cpu_to_gpu`'s copy: no IDSelector."""

    made: list[FakeGpuIndex] = []

    def __init__(self, index, spec):
        self.index = faiss.clone_index(index)
        self.searches = 0
        FakeGpuIndex.made.append(self)

    @property
    def ntotal(self):
        return self.index.ntotal

    def add(self, x):
        self.index.add(x)

    def add_with_ids(self, x, ids):
        self.index.add_with_ids(x, ids)

    def search(self, q, k, params=None):
        assert params is None or params.sel is None, "a GPU index takes no IDSelector"
        self.searches += 1
        return self.index.search(q, k, params=params)


@pytest.fixture
def fake_gpu(monkeypatch):
    FakeGpuIndex.made = []
    monkeypatch.setattr(faiss_device, "index_to_gpu", FakeGpuIndex)
    return FakeGpuIndex


@pytest.mark.parametrize("label", ["exact16", "ivf_pq"])
def test_gpu_seam_gives_the_cpu_results_and_never_a_dead_id(label, tmp_path, fake_gpu, monkeypatch):
    monkeypatch.setattr(faiss_collection, "REBUILD_MIN_DEAD", 10)
    matrix = clustered(N, 31)
    names = [f"n{i:05d}" for i in range(N)]
    colls = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        folder.mkdir()
        coll = make_collection("c", DIM, "fp", SPECS[label], files_dir=folder, device=device)
        coll.upsert(names, matrix)
        assert coll.wait_background(60)
        colls[device] = coll
    cpu, gpu = colls["cpu"], colls["cuda"]
    assert gpu.device == "cuda" and cpu.device == "cpu"
    queries = np.concatenate([clustered(10, 32), matrix[:10]]).astype(np.float64)

    def same_results(dead):
        before = fake_gpu.made[-1].searches
        for q in queries:
            got = gpu.search(q[np.newaxis], [10])
            assert got == cpu.search(q[np.newaxis], [10])
            assert not {n for n, _ in got[0]} & dead
        assert fake_gpu.made[-1].searches > before  # answered by the GPU copy

    gone = names[:200]
    for coll in (cpu, gpu):
        coll.delete(gone)
        coll.upsert(names[200:300], clustered(100, 33))
    same_results(set(gone))
    monkeypatch.setattr(faiss_device, "GPU_MAX_K", 40)  # the GPU's top-k limit cuts the fetch: the CPU index answers
    same_results(set(gone))
    monkeypatch.setattr(faiss_device, "GPU_MAX_K", 2048)
    copies = len(fake_gpu.made)
    more = names[300:1300]  # past the dead share: a rebuild, a new GPU copy swapped in
    for coll in (cpu, gpu):
        coll.delete(more)
        assert coll.wait_background(60) and coll.dead == 0
    assert len(fake_gpu.made) == copies + 1 and fake_gpu.made[-1].ntotal == len(gpu)
    same_results(set(gone) | set(more))


def test_hnsw_stays_on_the_cpu(fake_gpu):
    coll = make_collection("h", DIM, "fp", SPECS["hnsw"], device="cuda")
    coll.upsert(["a", "b"], clustered(2, 34))
    assert coll.device == "cpu" and not fake_gpu.made


def test_ranker_asked_for_cuda_without_gpu_support_says_so_in_one_line(tmp_path):
    if faiss.get_num_gpus():
        pytest.skip("this faiss has GPU support")
    proc = subprocess.run([sys.executable, "-m", "ranker_service", "--db", str(tmp_path / "r.db"), "--port", "0",
                           "--faiss-device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --faiss-device cuda: ") and "faiss-gpu" in lines[0], lines
    assert not (tmp_path / "r.db").exists()


def test_ranker_with_faiss_device_auto_serves_on_the_cpu_here(tmp_path):
    if faiss.get_num_gpus():
        pytest.skip("this faiss has GPU support")
    with ServiceProcess("ranker_service", "--db", str(tmp_path / "r.db"), "--faiss-device", "auto",
                        env={"IMAGESEARCH_LOG_LEVEL": "INFO"}) as ranker:
        assert "FAISS searches on cpu (--faiss-device auto)" in ranker.output, ranker.output


def test_an_index_the_gpu_refuses_stays_on_the_cpu(tmp_path, monkeypatch):
    def refuse(index, spec):
        raise RuntimeError("Error in GpuIndexIVFPQ: out of memory")
    monkeypatch.setattr(faiss_device, "index_to_gpu", refuse)
    coll = make_collection("c", DIM, "fp", SPECS["exact16"], files_dir=tmp_path, device="cuda")
    vectors = clustered(2, 35)
    coll.upsert(["a", "b"], vectors)
    assert coll.device == "cpu" and coll.search(vectors[1:].astype(np.float64), [1])[0][0][0] == "b"
