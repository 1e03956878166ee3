from __future__ import annotations

import os
from pathlib import Path

# Tests run grpc.aio servers in this process and then fork service processes:
# with fork support on, the child restarts gRPC's poller between fork and exec,
# on an epoll fd that close_fds has closed, and aborts (grpc/grpc#43055).
# Set before grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import grpc  # noqa: E402
import pytest

from imagesearch import serving

ROOT = Path(__file__).resolve().parents[1]
CLOTHING = Path(
    __import__("os").environ.get("IMAGESEARCH_CLOTHING_DIR", ROOT.parent / "shared" / "data" / "clothing-small"))


@pytest.fixture
def grpc_server():
    """Factory: start an in-process server on 127.0.0.1:0 through the project's
    `build_server` (health, reflection, interceptors) and return
    (RunningServer, channel). Everything is stopped at teardown."""
    started = []

    def start(register, service_names, config: serving.ServerConfig | None = None, serving_now=True):
        config = config or serving.ServerConfig(host="127.0.0.1", port=0, grace_s=1.0)
        running = serving.build_server(config, register, service_names)
        if serving_now:
            running.set_serving(True)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        started.append((running, channel))
        return running, channel

    yield start
    for running, channel in started:
        channel.close()
        running.stop(0).wait()


def milvus_server_or_skip(folder: Path):
    """A real Milvus standalone server (testkit/milvus.py), not started yet, or
    a skip with the reason where none is installed (a failure in CI, which
    installs one)."""
    from testkit import milvus

    if milvus.find_server() is None:
        if milvus.required():
            pytest.fail(f"CI runs the Milvus server tests: {milvus.missing_reason()}")
        pytest.skip(milvus.missing_reason())
    return milvus.MilvusServer(folder)


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One Milvus server for the whole run, started on first use: every
    backend-agnostic ranker test's `milvus-server` case, each ranker in a
    database of its own (`database_uri`). The failure tests start their own."""
    server = milvus_server_or_skip(tmp_path_factory.mktemp("milvus-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def clothing_dir() -> Path:
    if not (CLOTHING / "train").is_dir():
        pytest.skip(f"clothing-small data set not found at {CLOTHING} (set IMAGESEARCH_CLOTHING_DIR)")
    return CLOTHING


@pytest.fixture(scope="module")
def reference():
    """The in-process forward the embedder must equal: load_model + load_tensor
    + model.embed, on the CPU with one thread. Returns embed(bytes) -> vector;
    `embed.loaded` is the LoadedModel."""
    import numpy as np
    import torch

    from imagesearch.model.checkpoint import load_model
    from imagesearch.model.preprocessing import load_tensor

    torch.set_num_threads(1)
    loaded = load_model()
    loaded.model.eval()

    def embed(data: bytes) -> np.ndarray:
        with torch.inference_mode():
            return loaded.model.embed(load_tensor(data, loaded.spec)[None])[0].numpy()
    embed.loaded = loaded
    return embed
