"""Several models in one embedder (`--model NAME=SPEC`), as real processes on
port 0 over real channels: each model answers with its own vectors and
fingerprint, equal to those of an embedder serving it alone (Embed,
EmbedStream, the client library); GetModelInfo lists them, the default first;
an unknown model is NOT_FOUND; bad --model flags end the process with exit 2;
idle models cost no CPU; the models' batches take turns in order."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from clients.embedder import EmbedderClient, ImageSource
from clients.errors import UsageError
from embedder_service.threads import Turns
from imagesearch.model.backbones import build_model
from imagesearch.model.checkpoint import save_checkpoint
from imagesearch.model.preprocessing import PreprocessSpec
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc
from testkit import ROOT, ServiceProcess
from tests.helpers import encode, photo

TOL = 1e-5
IMAGES = [encode(photo(name, (96, 72)), "JPEG", quality=90) for name in ("chelsea", "coffee", "astronaut")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trainer checkpoint unlike the ImageNet model: a 64-d neck, its own
    preprocessing (seeded, so its ONNX export is cached across runs)."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", "imagenet", num_classes=3, neck_dim=64)
    spec = PreprocessSpec(128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    meta = {"backbone": "efficientnet_lite0", "class_names": ["a", "b", "c"], "preprocess": spec.to_dict(),
            "embedding_dim": 64, "epoch": 1, "metrics": {}, "model": model.options()}
    return save_checkpoint(tmp_path_factory.mktemp("models") / "tuned.pt", model, meta)


@pytest.fixture(scope="module")
def servers(checkpoint):
    """{"two": lite (default) and tuned in one embedder, "lite": the ImageNet
    model alone (no model flags), "tuned": the checkpoint alone (--checkpoint)},
    started side by side."""
    args = {"two": ("--model", "lite=efficientnet_lite0", "--model", f"tuned={checkpoint}"),
            "lite": (), "tuned": ("--checkpoint", checkpoint)}
    procs = {}
    try:
        for key, flags in args.items():
            procs[key] = ServiceProcess("embedder_service", *flags, "--max-wait-ms", "1", wait_serving=False)
        for proc in procs.values():
            proc.wait_serving()
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()


@pytest.fixture(scope="module")
def stubs(servers):
    channels = {key: proc.channel() for key, proc in servers.items()}
    yield {key: embedder_pb2_grpc.EmbedderServiceStub(channel) for key, channel in channels.items()}
    for channel in channels.values():
        channel.close()


def embed(stub, data: bytes, model: str = "") -> tuple[np.ndarray, str]:
    reply = stub.Embed(embedder_pb2.EmbedRequest(image=data, model=model), timeout=60)
    return np.asarray(reply.vector, np.float32), reply.fingerprint


def info(stub, model: str = "") -> embedder_pb2.GetModelInfoResponse:
    return stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(model=model), timeout=30)


def test_each_model_answers_as_it_does_alone(stubs):
    alone = {model: [embed(stubs[model], data) for data in IMAGES] for model in ("lite", "tuned")}
    fingerprints = {model: alone[model][0][1] for model in alone}
    assert fingerprints["lite"] != fingerprints["tuned"]
    # one stream whose items name both models, and the default
    requests = [embedder_pb2.EmbedStreamRequest(id=f"{model}/{i}", image=data, model=model)
                for i, data in enumerate(IMAGES) for model in ("lite", "tuned", "")]
    streamed = {r.id: r for r in stubs["two"].EmbedStream(iter(requests), timeout=120)}
    assert sorted(streamed) == sorted(r.id for r in requests)
    for model, default in (("lite", True), ("tuned", False)):
        for i, data in enumerate(IMAGES):
            want, fingerprint = alone[model][i]
            answers = [embed(stubs["two"], data, model),
                       (np.asarray(streamed[f"{model}/{i}"].embedding.vector, np.float32),
                        streamed[f"{model}/{i}"].fingerprint)]
            if default:  # "" is the first --model
                answers += [embed(stubs["two"], data),
                            (np.asarray(streamed[f"/{i}"].embedding.vector, np.float32), streamed[f"/{i}"].fingerprint)]
            for got, got_fingerprint in answers:
                assert got_fingerprint == fingerprint == fingerprints[model]
                assert got.shape == want.shape == ((1280,) if model == "lite" else (64,))
                assert np.abs(got - want).max() <= TOL
    assert np.abs(alone["lite"][0][0] - alone["lite"][1][0]).max() > 0.01  # the images differ


def test_model_info_describes_the_named_model_and_lists_all_default_first(stubs, checkpoint):
    listed = info(stubs["two"])
    assert listed.model == "lite" and [m.model for m in listed.models] == ["lite", "tuned"]
    tuned = info(stubs["two"], "tuned")
    assert [m.model for m in tuned.models] == ["lite", "tuned"] and not tuned.models[1].models
    for described, model in ((listed, "lite"), (listed.models[0], "lite"), (tuned, "tuned"), (listed.models[1], "tuned")):
        alone = info(stubs[model])
        assert described.model == model
        assert (described.fingerprint, described.dim, described.input_size, described.weights) == \
            (alone.fingerprint, alone.dim, alone.input_size, alone.weights)
    assert (tuned.dim, tuned.input_size, tuned.weights, list(tuned.class_names)) == (64, 128, str(checkpoint),
                                                                                      ["a", "b", "c"])
    # the limits are the server's, the same for every model
    assert (tuned.max_batch, tuned.stream_window, tuned.max_streams) == \
        (listed.max_batch, listed.stream_window, listed.max_streams)
    # the single-model flags serve one model named "default", as "" does
    for key in ("lite", "tuned"):
        alone = info(stubs[key])
        assert alone.model == "default" and [m.model for m in alone.models] == ["default"]
        assert info(stubs[key], "default").fingerprint == alone.fingerprint
        assert embed(stubs[key], IMAGES[0], "default")[1] == alone.fingerprint


def test_an_unknown_model_is_not_found_naming_the_served_models(stubs):
    for call, served in ((lambda: embed(stubs["two"], IMAGES[0], "nope"), 'lite, tuned ("" = lite)'),
                         (lambda: info(stubs["two"], "nope"), 'lite, tuned ("" = lite)'),
                         (lambda: embed(stubs["lite"], IMAGES[0], "lite"), 'default ("" = default)')):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"this embedder serves {served}" in err.value.details()
    # in a stream, only that item fails
    requests = [embedder_pb2.EmbedStreamRequest(id="bad", image=IMAGES[0], model="nope"),
                embedder_pb2.EmbedStreamRequest(id="good", image=IMAGES[0], model="tuned")]
    replies = {r.id: r for r in stubs["two"].EmbedStream(iter(requests), timeout=60)}
    assert replies["bad"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "serves lite, tuned" in replies["bad"].error.message
    assert len(replies["good"].embedding.vector) == 64


def test_the_client_routes_every_call_to_its_model(servers, stubs):
    address = servers["two"].address
    tuned_alone = [embed(stubs["tuned"], data)[0] for data in IMAGES]
    with EmbedderClient(address, model="tuned") as tuned, EmbedderClient(address) as default:
        assert [m.model for m in tuned.models()] == ["lite", "tuned"]
        assert tuned.model_info().model == "tuned" and default.model_info().model == "lite"
        assert tuned.model_info().fingerprint == info(stubs["tuned"]).fingerprint
        one = tuned.embed(IMAGES[0], "a.jpg")
        assert one.fingerprint == tuned.model_info().fingerprint
        assert np.abs(one.vector - tuned_alone[0]).max() <= TOL
        items = [ImageSource(f"{i}.jpg", lambda data=data: data) for i, data in enumerate(IMAGES)]
        for result in tuned.embed_stream(items):
            assert np.abs(result.vector - tuned_alone[int(result.name[0])]).max() <= TOL
        assert default.embed(IMAGES[0]).fingerprint == info(stubs["lite"]).fingerprint
    with EmbedderClient(address, model="nope") as nope, pytest.raises(UsageError) as err:
        nope.model_info()
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "serves lite, tuned" in str(err.value)


def test_idle_models_cost_no_cpu(servers, stubs):
    """Nobody calls: the batchers' model and decode threads and the engines'
    threads sleep. Of the process's threads named as the process is (Python's
    and the engines', not gRPC's own), only the event loop's may wake."""
    for model in ("lite", "tuned"):
        embed(stubs["two"], IMAGES[0], model)  # every thread has run
    proc = f"/proc/{servers['two'].proc.pid}"
    name = Path(f"{proc}/comm").read_text()

    def woken() -> dict[str, int]:
        counts = {}
        for task in Path(f"{proc}/task").iterdir():
            try:
                if (task / "comm").read_text() == name:
                    status = (task / "status").read_text()
                    counts[task.name] = sum(int(line.split()[1]) for line in status.splitlines()
                                            if "ctxt_switches" in line)  # voluntary and not
            except OSError:  # a thread that ended
                pass
        return counts

    def cpu_seconds() -> float:
        fields = Path(f"{proc}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    time.sleep(0.5)
    before, cpu = woken(), cpu_seconds()
    time.sleep(3)
    after = woken()
    assert len(before) >= 2 * 3  # the threads are there: two models' model and decode threads, and more
    assert len([t for t in after if t in before and after[t] != before[t]]) <= 1, (before, after)
    assert cpu_seconds() - cpu <= 0.05


def test_the_models_batches_take_turns_in_order():
    turns, order = Turns(), []
    held, release = threading.Event(), threading.Event()

    def first(_):
        held.set()
        release.wait(10)
        order.append("first")

    threading.Thread(target=turns.taking(first), args=(None,)).start()
    assert held.wait(10)
    waiting = threading.Thread(target=turns.taking(lambda _: order.append("waiting")), args=(None,))
    waiting.start()
    deadline = time.monotonic() + 10
    while len(turns._queue) < 2 and time.monotonic() < deadline:  # the second one waits for its turn
        time.sleep(0.01)
    assert order == [] and len(turns._queue) == 2
    release.set()
    # asked after the waiting one: runs after it, however fast it comes back
    turns.taking(lambda _: order.append("again"))(None)
    waiting.join(10)
    assert order == ["first", "waiting", "again"]


@pytest.mark.slow
def test_bad_model_flags_end_the_process_with_a_clear_message(tmp_path, checkpoint):
    not_a_checkpoint = tmp_path / "not-a-checkpoint.pt"
    not_a_checkpoint.write_bytes(b"no weights here")
    cases = [  # (arguments, what stderr must say)
        (("--model", "a b=efficientnet_lite0"), "a model name is 1 to 64 letters"),
        (("--model", "lite"), "write NAME=CHECKPOINT or NAME=BACKBONE[:WEIGHTS]"),
        (("--model", "a=efficientnet_lite0", "--model", f"a={checkpoint}"), "--model a is given twice"),
        (("--model", "a=no/such.pt"), "neither a backbone (efficientnet_lite0"),
        (("--model", "a=efficientnet_lite0:no/such.pt"), "weights no/such.pt: no such file"),
        (("--model", "a=efficientnet_lite0", "--checkpoint", str(checkpoint)), "--model and --checkpoint exclude"),
        (("--model", "a=efficientnet_lite0", "--weights", "none"), "--model and --weights exclude"),
        (("--model", "a=efficientnet_lite0", "--model", f"b={not_a_checkpoint}"), "--model b: cannot read checkpoint"),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "embedder_service", "--host", "127.0.0.1", "--port", "0", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "IMAGESEARCH_TORCH_THREADS": "1"})
             for args, _ in cases]
    for proc, (args, message) in zip(procs, cases):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        assert message in err and "Traceback" not in out + err, (args, err)
