"""Helpers the tests and the benchmarks share, so that neither imports the
other (tests/test_architecture.py). Torch-free.

- `ServiceProcess`: a service as a real child process on 127.0.0.1 port 0,
  started and stopped by the product's own launcher (`clients.cli.services.ChildService`),
  with what a test needs on top: the whole log, a channel, SIGKILL.
- `sample_photos`: n distinct real photos as JPEG bytes (the demo's photos
  that ship with scikit-image and scikit-learn, then crops of them).
- `unit32`, `reference_ranking`: the ranker's stored form of a vector and the
  float64 numpy top-k that every ranking is checked against.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.cli.demo import find_photos
from clients.cli.services import ChildService
from imagesearch.defaults import MAX_MESSAGE_BYTES, TORCH_THREADS_ENV

# The repository root: services run with it first on their path, so a test
# runs this checkout's code whatever the working directory.
ROOT = Path(__file__).resolve().parents[1]


class ServiceProcess(ChildService):
    """`python -m MODULE --host 127.0.0.1 --port 0 ARGS...`, started at once;
    waits for `listening on` and (unless `wait_serving=False`) health SERVING.
    One torch thread unless `env` says otherwise. `credentials` and
    `target_host` are what `channel()` connects with (TLS tests)."""

    KEEP_LINES = None  # tests read the whole log

    def __init__(self, module: str, *args, env: dict | None = None, startup_timeout: float = 120.0,
                 wait_serving: bool = True, credentials: grpc.ChannelCredentials | None = None,
                 target_host: str = "127.0.0.1"):
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        super().__init__(module.removesuffix("_service"), module, [str(a) for a in args],
                         env={TORCH_THREADS_ENV: "1", "PYTHONPATH": path, **(env or {})})
        self.credentials = credentials
        self.target_host = target_host
        try:
            self.wait_listening(startup_timeout)
            if wait_serving:
                self.wait_serving(startup_timeout)
        except BaseException:
            self.kill()
            raise

    def _exited(self) -> RuntimeError:
        self._reader.join(2)
        return RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.output}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def address(self) -> str:
        return f"{self.target_host}:{self.port}"

    def channel(self, options=None) -> grpc.Channel:
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *(options or [])]
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials, options=opts)
        return grpc.insecure_channel(self.address, options=opts)

    def wait_serving(self, timeout: float = 120.0) -> None:
        """Health SERVING over `channel()` (so over TLS where the service serves TLS)."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise self._exited()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.module} not SERVING after {timeout}s:\n{self.output}")
                time.sleep(0.1)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (the graceful path; SIGKILL if it hangs). Returns the exit code."""
        return self.stop(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()


def sample_photos(n: int, max_side: int = 512) -> list[bytes]:
    """n distinct real photos as JPEG: the library photos, then crops of them."""
    from PIL import Image

    paths = find_photos()
    images = []
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as img:
            img = img.convert("RGB")
            round_ = i // len(paths)
            if round_:  # a different crop for every further round
                w, h = img.size
                f = 0.9 ** round_
                img = img.crop((0, 0, max(16, int(w * f)), max(16, int(h * f))))
            img.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
    return images


def unit32(v) -> np.ndarray:
    """The stored form the ranker promises: rows (or one vector) normalised in
    float64, then float32."""
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def reference_ranking(stored32, names, query, k: int, *, rowwise: bool = False) -> tuple[list[str], list[float]]:
    """Top-k by float64 cosine over the stored float32 rows: the full product,
    a full sort by (-score, name). `rowwise` scores row by row instead of one
    matrix product (no BLAS blocking can hide in it)."""
    q = np.asarray(query, dtype=np.float64)
    q = q / np.linalg.norm(q)
    m64 = np.asarray(stored32, dtype=np.float64)
    scores = (m64 * q).sum(axis=1) if rowwise else m64 @ q
    order = sorted(range(len(names)), key=lambda i: (-scores[i], names[i]))[:k]
    return [names[i] for i in order], [float(scores[i]) for i in order]
