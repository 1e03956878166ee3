"""The embedder's core alone, without gRPC: the Batcher (with plain functions
standing in for decode and the model), the Embedder on the real default model,
autocast dtype selection (the CUDA path's decision, testable on CPU), and the
command line."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
import torch

from embedder_service import __main__ as cli
from embedder_service.batcher import Batcher
from embedder_service.embedder import Embedder
from embedder_service.threads import available_cores, plan_threads
from imagesearch import errors
from imagesearch.errors import Dropped
from imagesearch.model.engines import autocast_dtype, bucket_size, cuda_buckets
from tests.helpers import encode, photo
from tests.test_embedder_inputs import GOOD

WAIT = 10  # seconds a future may take before a test calls it hung


class Recorder:
    """run(): doubles each item and records the batches it saw."""

    def __init__(self, gate: threading.Event | None = None, fail_on=None):
        self.batches: list[list] = []
        self.gate = gate
        self.fail_on = fail_on

    def __call__(self, items):
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"model failed on a batch holding {self.fail_on}")
        return [x * 2 for x in items]


# ---------------------------------------------------------------- Batcher


def test_items_arriving_together_fill_batches_up_to_max_batch():
    release = threading.Event()

    def prepare(x):
        assert release.wait(WAIT)  # hold every item until all are submitted
        return x

    run = Recorder()
    with Batcher(prepare, run, max_batch=8, max_wait_s=2.0, prepare_workers=4) as b:
        futures = [b.submit(i) for i in range(16)]
        release.set()
        assert [f.result(WAIT) for f in futures] == [2 * i for i in range(16)]
        stats = b.stats
    assert sorted(len(batch) for batch in run.batches) == [8, 8]
    assert stats.batches == 2 and stats.items == 16 and stats.submitted == 16


def test_a_lone_item_does_not_wait_for_a_full_batch():
    run = Recorder()
    with Batcher(lambda x: x, run, max_batch=64, max_wait_s=0.01) as b:
        assert b.submit(21).result(WAIT) == 42
    assert run.batches == [[21]]


def test_requests_no_longer_alive_never_reach_the_model():
    run = Recorder()
    alive_flag = {"late": True}

    def prepare(x):
        if x == "late":
            alive_flag["late"] = False  # the caller goes away while its item is being decoded
        return x

    with Batcher(prepare, run, max_batch=4, max_wait_s=0.01, prepare_workers=1) as b:
        gone = b.submit("gone", alive=lambda: False)
        late = b.submit("late", alive=lambda: alive_flag["late"])
        ok = b.submit("ok")
        assert ok.result(WAIT) == "okok"
        for f in (gone, late):
            with pytest.raises(Dropped):
                f.result(WAIT)
        assert b.stats.dropped == 2
    assert all("gone" not in batch and "late" not in batch for batch in run.batches)
    assert Dropped("x").status == "CANCELLED"


def test_a_cancelled_future_is_not_even_prepared():
    gate = threading.Event()
    prepared = []

    def prepare(x):
        prepared.append(x)
        assert gate.wait(WAIT)
        return x

    with Batcher(prepare, Recorder(), max_batch=4, max_wait_s=0.0, prepare_workers=1) as b:
        first = b.submit(1)  # occupies the only prepare worker
        second = b.submit(2)
        assert second.cancel()
        gate.set()
        assert first.result(WAIT) == 2
    assert prepared == [1]


def test_a_prepare_error_fails_only_its_own_item():
    def prepare(x):
        if x % 3 == 0:
            raise errors.InvalidImage(f"item {x}: not an image")
        return x

    run = Recorder()
    with Batcher(prepare, run, max_batch=4, max_wait_s=0.005) as b:
        futures = {i: b.submit(i) for i in range(10)}
        for i, f in futures.items():
            if i % 3 == 0:
                with pytest.raises(errors.InvalidImage, match=f"item {i}"):
                    f.result(WAIT)
            else:
                assert f.result(WAIT) == 2 * i
        assert b.stats.prepare_failed == 4
    assert sorted(x for batch in run.batches for x in batch) == [1, 2, 4, 5, 7, 8]


def test_a_failing_batch_fails_its_items_and_the_batcher_goes_on():
    run = Recorder(fail_on=13)
    with Batcher(lambda x: x, run, max_batch=1, max_wait_s=0.0) as b:
        with pytest.raises(RuntimeError, match="13"):
            b.submit(13).result(WAIT)
        assert b.submit(4).result(WAIT) == 8


def test_close_finishes_submitted_work_stops_the_thread_and_refuses_more():
    gate = threading.Event()
    run = Recorder(gate=gate)
    b = Batcher(lambda x: x, run, max_batch=2, max_wait_s=0.0)
    futures = [b.submit(i) for i in range(5)]
    closer = threading.Thread(target=b.close)
    closer.start()
    gate.set()
    closer.join(WAIT)
    assert not closer.is_alive() and not b.running
    assert [f.result(0) for f in futures] == [0, 2, 4, 6, 8]
    with pytest.raises(errors.Unavailable):
        b.submit(9)


def test_close_with_a_timeout_returns_though_the_model_hangs_and_fails_what_is_left(monkeypatch):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda hook_args: crashed.append(hook_args.exc_value))
    hang, started = threading.Event(), threading.Event()

    def run(items):
        started.set()
        hang.wait(WAIT)  # a model call that does not return
        return [2 * x for x in items]

    b = Batcher(lambda x: x, run, max_batch=2, max_wait_s=0.0, prepare_workers=2)
    futures = [b.submit(i) for i in range(9)]  # one batch in run, one prepared, the rest waiting for room
    assert started.wait(WAIT)
    began = time.monotonic()
    b.close(timeout=0.3)
    assert time.monotonic() - began < 3
    for f in futures:  # none is left hanging: the batch in run too
        with pytest.raises(errors.Unavailable, match="retry on another replica"):
            f.result(WAIT)
    hang.set()  # the model call returns late: its answers are not set twice, no thread dies
    deadline = time.monotonic() + WAIT
    while b.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not b.running and crashed == []
    with pytest.raises(errors.Unavailable):
        b.submit(9)


def test_an_item_prepared_after_close_gave_up_fails_and_leaves_the_batcher_usable():
    """A prepare call that returns after close()'s timeout passed: its request fails
    with Unavailable, and failing it (whose done-callbacks take the batcher's lock)
    must not happen under that lock."""
    gate, entered = threading.Event(), threading.Event()

    def prepare(x):
        entered.set()
        assert gate.wait(WAIT)
        return x

    b = Batcher(prepare, Recorder(), max_batch=2, max_wait_s=0.0, prepare_workers=1)
    future = b.submit(1)
    assert entered.wait(WAIT)
    b.close(timeout=0.2)
    gate.set()
    with pytest.raises(errors.Unavailable, match="retry on another replica"):
        future.result(WAIT)
    reader = threading.Thread(target=lambda: b.stats, daemon=True)  # takes the lock
    reader.start()
    reader.join(WAIT)
    assert not reader.is_alive(), "the batcher's lock was left held"


def test_close_with_a_timeout_that_is_enough_finishes_the_work():
    b = Batcher(lambda x: x, Recorder(), max_batch=2, max_wait_s=0.0)
    futures = [b.submit(i) for i in range(7)]
    b.close(timeout=WAIT)
    assert [f.result(0) for f in futures] == [2 * i for i in range(7)] and not b.running


def test_embed_stream_reads_at_most_its_window_ahead_of_its_answers():
    """No limit on an EmbedStream's length: the servicer reads at most
    --stream-window items that are not yet answered, then stops reading (gRPC
    flow control then holds the client's sends)."""
    import asyncio
    from concurrent import futures
    from types import SimpleNamespace

    from embedder_service.servicer import EmbedderServicer, Limits
    from imagesearch.v1 import embedder_pb2

    window, pulled, held, written = 4, [], [], []

    class Batcher:
        def submit(self, payload, alive, source=None, priority=0):
            held.append(futures.Future())  # the model answers only when the test says so
            return held[-1]

    class Context:
        def time_remaining(self):
            return None

        def add_done_callback(self, fn):
            pass

        async def write(self, response):
            written.append(response.id)

    async def requests():
        for i in range(40):
            pulled.append(i)
            yield embedder_pb2.EmbedStreamRequest(id=str(i), image=b"x")

    async def run():
        servicer = EmbedderServicer()
        servicer.attach({"default": (SimpleNamespace(info=SimpleNamespace(fingerprint="fp")), Batcher())},
                        Limits(max_image_bytes=10, max_image_pixels=10, max_batch=2, max_message_bytes=100,
                               stream_window=window))
        call = asyncio.ensure_future(servicer.EmbedStream(requests(), Context()))
        await asyncio.sleep(0.3)  # let the reader run as far as it can
        assert len(pulled) == window and not written
        while not call.done():  # answer what was read; each answer lets one more in
            for future in held:
                if not future.done():
                    future.set_result(np.zeros(2, np.float32))
            await asyncio.sleep(0.01)
            assert len(pulled) - len(written) <= window
        await call

    asyncio.run(run())
    assert sorted(written, key=int) == [str(i) for i in range(40)]


def test_batcher_refuses_a_priority_below_interactive():
    """0 is the most urgent priority the batcher schedules apart (room to
    prepare, a batch of its own); a negative one would skip both."""
    with Batcher(lambda x: x, Recorder(), max_batch=4, max_wait_s=0.001) as b:
        with pytest.raises(errors.InvalidArgument, match="priority must be 0"):
            b.submit(1, priority=-1)
        assert b.submit(2, priority=0).result(10) == 4 and b.stats.submitted == 1


def test_a_submit_the_prepare_pool_refuses_leaves_nothing_behind(monkeypatch):
    """At interpreter exit the pool refuses new tasks: the request must not stay
    counted or queued for a task that never runs (close() would count it)."""
    stream = object()
    with Batcher(lambda x: x, Recorder(), max_batch=4, max_wait_s=0.001) as b:
        def refuse(*args, **kwargs):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        monkeypatch.setattr(b._pool, "submit", refuse)
        with pytest.raises(RuntimeError, match="interpreter shutdown"):
            b.submit(1, source=stream, priority=1)
        monkeypatch.undo()
        assert (b.stats.submitted, b.in_flight(stream), len(b._to_prepare)) == (0, 0, 0)
        assert b.submit(2, source=stream, priority=1).result(10) == 4


@pytest.mark.parametrize("kwargs", [dict(max_batch=0), dict(max_wait_s=-1), dict(prepare_workers=0)])
def test_batcher_rejects_nonsense_settings(kwargs):
    with pytest.raises(errors.InvalidArgument):
        Batcher(lambda x: x, Recorder(), **kwargs)


# ---------------------------------------------------------------- autocast (the CUDA path, decided on CPU)


def test_autocast_dtype_selection():
    assert autocast_dtype("cpu") is None
    assert autocast_dtype("cuda") is torch.float16


def test_cuda_batches_are_padded_to_a_few_bucket_sizes():
    assert [bucket_size(n, 32) for n in (1, 2, 3, 5, 8, 9, 17, 31, 32)] == [1, 2, 4, 8, 8, 16, 32, 32, 32]
    assert [bucket_size(n, 24) for n in (13, 17, 24)] == [16, 24, 24]
    assert cuda_buckets(32) == [1, 2, 4, 8, 16, 32] and cuda_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert cuda_buckets(1) == [1]


def test_padding_a_batch_changes_no_vector(embedder):
    """What the CUDA path does (pad with zero images, keep the first n rows), on CPU."""
    tensors = [embedder.decode(GOOD[n].data) for n in ("jpeg", "png", "bmp")]
    padded = embedder.embed_tensors(tensors + [torch.zeros_like(tensors[0])] * 5)[:3]
    assert np.abs(padded - embedder.embed_tensors(tensors)).max() <= 1e-5


# ---------------------------------------------------------------- Embedder on the real default model


@pytest.fixture(scope="module")
def embedder():
    torch.set_num_threads(1)
    return Embedder.load(device="cpu")


def test_embedder_matches_the_in_process_forward_alone_and_in_any_batch(embedder, reference):
    images = [GOOD[n].data for n in ("jpeg", "png", "grayscale", "cmyk_tiff", "gif_first_frame")]
    images.append(encode(photo("astronaut", (300, 300)), "JPEG"))
    expected = np.stack([reference(d) for d in images])
    alone = np.stack([embedder.embed_tensors([embedder.decode(d)])[0] for d in images])
    together = embedder.embed_images(images)
    reversed_ = embedder.embed_images(images[::-1])[::-1]
    for got in (alone, together, reversed_):
        assert got.dtype == np.float32 and got.shape == (len(images), 1280)
        assert np.abs(got - expected).max() <= 1e-5
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_embedder_info_and_fingerprint(embedder, reference):
    info = embedder.info
    loaded = reference.loaded
    assert (info.backbone, info.dim, info.device, info.precision, info.weights, info.engine) == (
        "efficientnet_lite0", 1280, "cpu", "fp32", "imagenet", "onnxruntime")  # engine auto on CPU
    assert info.spec == loaded.spec and info.class_names == ()
    assert re.fullmatch("[0-9a-f]{64}", info.fingerprint)  # sha256 hex; what it covers: test_models.py


def test_embedder_decode_enforces_its_limits_and_names_the_item(reference):
    small = Embedder(reference.loaded, device="cpu", max_image_bytes=100_000, max_image_pixels=100 * 100)
    with pytest.raises(errors.ResourceExhausted, match="big.jpg.*bytes"):
        small.decode(b"\xff" * 100_001, "big.jpg")
    with pytest.raises(errors.ResourceExhausted, match="wide.png.*pixels"):
        small.decode(encode(photo(size=(200, 60)), "PNG"), "wide.png")
    with pytest.raises(errors.InvalidImage, match="notes.txt"):
        small.decode(b"hello", "notes.txt")


def test_load_refuses_contradictory_model_options():
    with pytest.raises(errors.InvalidArgument, match="exclude each other"):
        Embedder.load(checkpoint="some.pt", weights="imagenet")


# ---------------------------------------------------------------- command line


def test_flags_and_their_environment_variables(monkeypatch):
    args = cli.parse_args([])
    assert (args.port, args.backbone, args.weights, args.device, args.max_batch) == (50051, None, None, "auto", 0)
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_PORT", "6000")
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_MAX_BATCH", "4")
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_MAX_WAIT_MS", "2.5")
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_BACKBONE", "efficientnet_lite2")
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_MAX_IMAGE_BYTES", "12345")
    args = cli.parse_args([])
    assert (args.port, args.max_batch, args.max_wait_ms, args.backbone, args.max_image_bytes) == (
        6000, 4, 2.5, "efficientnet_lite2", 12345)
    assert cli.parse_args(["--max-batch", "2"]).max_batch == 2  # a flag beats the environment


@pytest.mark.parametrize("argv", [["--max-batch", "-1"], ["--max-wait-ms", "-1"], ["--max-image-bytes", "0"],
                                  ["--engine-threads", "-1"],
                                  ["--checkpoint", "a.pt", "--weights", "none"], ["--backbone", "resnet50"]])
def test_nonsense_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_the_thread_plan_is_a_function_of_the_cores_engine_and_device():
    # ONNX engines on CPU: the engine gets the cores and sleeps when idle, torch one
    # thread (only the decode threads' tensor ops), two batches of stream window.
    ort = plan_threads("onnxruntime", "cpu", 8, cores=4)
    assert (ort.engine_threads, ort.torch_threads, ort.decode_workers, ort.stream_window) == (4, 1, 4, 16)
    # torch on CPU: torch's team on every core, one batch of window.
    torch_cpu = plan_threads("torch", "cpu", 8, cores=2)
    assert (torch_cpu.torch_threads, torch_cpu.decode_workers, torch_cpu.stream_window) == (2, 2, 8)
    # CUDA: one torch thread, up to 8 decode workers, two batches of window.
    cuda = plan_threads("torch", "cuda", 64, cores=16)
    assert (cuda.torch_threads, cuda.decode_workers, cuda.stream_window) == (1, 8, 128)
    # Batch size: 8 on CPU, 32 on CUDA, unless given.
    assert (plan_threads("onnxruntime", "cpu").max_batch, plan_threads("torch", "cuda").max_batch) == (8, 32)
    assert plan_threads("onnxruntime", "cpu", 16, cores=2).stream_window == 32
    # Every number can be overridden.
    custom = plan_threads("onnxruntime", "cpu", 8, cores=2, torch_threads=2, engine_threads=1,
                          decode_workers=3, stream_window=8)
    assert (custom.torch_threads, custom.engine_threads, custom.decode_workers, custom.stream_window) == (2, 1, 3, 8)
    assert plan_threads("torch", "cpu", 8, cores=2, torch_threads=1).engine_threads == 1
    assert plan_threads("onnxruntime", "cpu", 8).cores == available_cores() >= 1
    with pytest.raises(errors.InvalidArgument):
        plan_threads("auto", "cpu", 8)


def test_available_cores_honours_a_cgroup_cpu_quota(tmp_path):
    import os

    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert available_cores(tmp_path / "missing") == affinity
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a core: still one thread
    assert available_cores(cpu_max) == 1
    cpu_max.write_text(f"{100000 * affinity + 1} 100000\n")  # a quota above the affinity changes nothing
    assert available_cores(cpu_max) == affinity


def test_thread_flags_and_environment_reach_the_parser(monkeypatch):
    monkeypatch.setenv("IMAGESEARCH_EMBEDDER_ENGINE_THREADS", "3")
    args = cli.parse_args(["--decode-workers", "5"])
    assert (args.engine_threads, args.decode_workers) == (3, 5)


def _first_batch_held():
    """(gate, batches, run): `run` records each batch and holds the first until `gate` is set."""
    gate = threading.Event()
    batches: list[list] = []

    def run(items):
        batches.append(list(items))
        if len(batches) == 1:
            gate.wait(10)
        return items

    return gate, batches, run


def test_a_caller_with_nothing_in_flight_goes_before_a_streams_backlog():
    """Rank, not arrival: while a stream keeps 16 items queued, a lone call
    (nothing else in flight) is in the very next batch."""
    gate, batches, run = _first_batch_held()
    with Batcher(lambda x: x, run, max_batch=4, max_wait_s=0.0, prepare_workers=1) as b:
        stream = object()
        b.submit(("stream", 0), source=stream)
        deadline = time.monotonic() + 10
        while not batches and time.monotonic() < deadline:  # the model thread is busy with batch 1
            time.sleep(0.01)
        backlog = [b.submit(("stream", i), source=stream) for i in range(1, 17)]
        lone = b.submit(("lone", 0))
        while b.in_flight(stream) and len(b._ready) < 17 and time.monotonic() < deadline:
            time.sleep(0.01)  # everything prepared and waiting for the model
        gate.set()
        assert lone.result(10) == ("lone", 0)
        assert [f.result(10) for f in backlog] == [("stream", i) for i in range(1, 17)]
    assert ("lone", 0) in batches[1], batches


def test_a_priority_call_runs_in_a_batch_of_its_own_not_behind_bulk():
    """Stream items (priority 1) keep a full batch ready; a single call
    (priority 0) is the whole next batch, not one of 32."""
    gate, batches, run = _first_batch_held()
    with Batcher(lambda x: x, run, max_batch=4, max_wait_s=0.0, prepare_workers=1) as b:
        stream = object()
        b.submit(("bulk", 0), source=stream, priority=1)
        deadline = time.monotonic() + 10
        while not batches and time.monotonic() < deadline:
            time.sleep(0.01)
        bulk = [b.submit(("bulk", i), source=stream, priority=1) for i in range(1, 9)]
        while len(b._ready) < 4 and time.monotonic() < deadline:  # a full batch of bulk is ready
            time.sleep(0.01)
        single = b.submit(("single", 0), priority=0)
        time.sleep(0.1)  # prepared past the one-batch bound
        gate.set()
        assert single.result(10) == ("single", 0)
        assert [f.result(10) for f in bulk] == [("bulk", i) for i in range(1, 9)]
    assert batches[1] == [("single", 0)], batches
