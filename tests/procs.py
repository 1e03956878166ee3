"""Real service processes for tests: start on 127.0.0.1 port 0, learn the port
from the `listening on HOST:PORT` log line, wait for health SERVING, and stop
with SIGTERM (graceful), escalating to SIGKILL only if that hangs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (\S+):(\d+)")


class ServiceProcess:
    """`python -m MODULE --host 127.0.0.1 --port 0 ARGS...` as a child process."""

    def __init__(self, module: str, *args: str, env: dict | None = None, startup_timeout: float = 120.0,
                 wait_serving: bool = True, credentials: grpc.ChannelCredentials | None = None,
                 target_host: str = "127.0.0.1"):
        self.module = module
        self.args = [str(a) for a in args]
        self.lines: list[str] = []
        self._port_seen = threading.Event()
        self.port: int | None = None
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "IMAGESEARCH_TORCH_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.credentials = credentials
        self.target_host = target_host
        try:
            self._wait_port(startup_timeout)
            if wait_serving:
                self.wait_serving(startup_timeout)
        except BaseException:
            self.kill()
            raise

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = LISTENING.search(line)
            if m and self.port is None:
                self.port = int(m.group(2))
                self._port_seen.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def _wait_port(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._port_seen.wait(0.1):
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.module} did not log 'listening on' in {timeout}s:\n{self.output}")

    @property
    def address(self) -> str:
        return f"{self.target_host}:{self.port}"

    def channel(self, options=None) -> grpc.Channel:
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
                *(options or [])]
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials, options=opts)
        return grpc.insecure_channel(self.address, options=opts)

    def wait_serving(self, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        with self.channel() as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.output}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.module} not SERVING after {timeout}s:\n{self.output}")
                time.sleep(0.1)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{self.module} ignored SIGTERM for {timeout}s:\n{self.output}")
        self._reader.join(5)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash path."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()
