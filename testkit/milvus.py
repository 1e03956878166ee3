"""A real Milvus standalone server for tests and benches, from the PyPI
package `milvus` (it embeds the server binary, etcd and local storage; it
needs `setuptools<70`, so it lives in a venv of its own: `.venv-milvus`).

- `find_server()`: the `milvus-server` executable: `$IMAGESEARCH_MILVUS_SERVER`
  (the executable or the venv holding it), else `.venv-milvus/bin/milvus-server`
  in the repository root; None when there is none.
- `MilvusServer`: one server on 127.0.0.1, every port free and chosen here,
  data in its own folder; `start()` waits until pymilvus answers, `kill()` is
  `kill -9` of the server (its whole process group: the package's wrapper runs
  the `milvus` binary as a child), `restart()` starts it again on the same ports
  and data, `stop()` is SIGTERM and a wait.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER_ENV = "IMAGESEARCH_MILVUS_SERVER"
DEFAULT_SERVER = ROOT / ".venv-milvus" / "bin" / "milvus-server"
PORT_FLAGS = ("etcd-port", "etcd-peer-port", "root-coord-port", "proxy-port", "proxy-internal-port", "query-coord-port",
              "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")
SESSION_TTL_S = 5
# A Strong-consistency read waits for the next time tick: Milvus's 200 ms default
# makes every test read that slow; benches pass Milvus's default.
TICK_MS = 20


def find_server() -> Path | None:
    """The milvus-server executable, or None (see the module docstring)."""
    named = os.environ.get(SERVER_ENV)
    path = Path(named) if named else DEFAULT_SERVER
    if path.is_dir():
        path = path / "bin" / "milvus-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def required() -> bool:
    """In CI (CI=true) a missing server fails the tests that need one; elsewhere they skip."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def missing_reason() -> str:
    return (f"no Milvus server: set {SERVER_ENV} to a milvus-server executable or make {DEFAULT_SERVER.parent.parent} "
            "(python3 -m venv .venv-milvus && .venv-milvus/bin/pip install 'setuptools<70' milvus==2.3.5)")


def free_ports(n: int) -> list[int]:
    """n ports free now on 127.0.0.1 (held together while chosen, so distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MilvusServer:
    """See the module docstring. `uri` is what pymilvus and the ranker connect to."""

    def __init__(self, data_dir: Path, executable: Path | None = None, *, tick_ms: int = TICK_MS):
        self.executable = executable or find_server()
        if self.executable is None:
            raise FileNotFoundError(missing_reason())
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.tick_ms = tick_ms
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._binary: list[str] | None = None  # known after the first start
        self._binary_env: dict[str, str] = {}
        atexit.register(self._signal, signal.SIGKILL)  # not left running by a run that ends early

    @property
    def port(self) -> int:
        return self.ports["proxy-port"]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self, timeout: float = 120.0, wait: bool = True) -> "MilvusServer":
        """The first start goes through the package's `milvus-server`, which
        writes the config and unpacks the binary into the data folder; a
        restart runs that binary again directly, as the wrapper did: the
        wrapper would move a port still in TIME_WAIT after a kill -9 to the next
        free one, the binary binds it again (SO_REUSEADDR)."""
        (self.data_dir / "run" / "standalone.pid").unlink(missing_ok=True)  # a killed server leaves it
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in _reap
        if self._binary is not None:
            self.proc = subprocess.Popen(self._binary, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.data_dir,
                                         env=self._binary_env)
        else:
            self.proc = subprocess.Popen(self._wrapper_args(), stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.data_dir,
                                         env={**os.environ, "ETCD_CONFIG_PATH": str(self._etcd_config())})
        if wait:
            self.wait_ready(timeout)
        return self

    def _wrapper_args(self) -> list[str]:
        args = [str(self.executable), "--data", str(self.data_dir)]
        for flag, port in self.ports.items():
            if flag != "etcd-peer-port":
                args += [f"--{flag}", str(port)]
        # After a kill -9 a new server waits out the old one's etcd sessions: keep them short.
        return args + ["--extra-config", f"common.session.ttl={SESSION_TTL_S}",
                       "--extra-config", f"proxy.timeTickInterval={self.tick_ms}"]

    def _etcd_config(self) -> Path:
        """The embedded etcd listens on 2379/2380 unless its own config says
        otherwise (Milvus reads `etcd.config.path` from ETCD_CONFIG_PATH)."""
        etcd = self.data_dir / "embed-etcd.yaml"
        client, peer = (f"http://127.0.0.1:{self.ports[k]}" for k in ("etcd-port", "etcd-peer-port"))
        etcd.write_text(f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
                        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                        f"initial-cluster: default={peer}\n")
        return etcd

    def _find_binary(self) -> None:
        """The `milvus` binary the wrapper runs, its environment, and the proxy
        port its config holds (the wrapper takes the next free port where one is busy)."""
        import yaml

        with open(self.data_dir / "configs" / "milvus.yaml", encoding="utf-8") as f:
            self.ports["proxy-port"] = int(yaml.safe_load(f)["proxy"]["port"])
        for child in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            self._binary_env = dict(e.decode().split("=", 1) for e in environ if b"=" in e)
            self._binary = [str(self.data_dir / "bin" / "milvus"), "run", "standalone"]
            return
        raise RuntimeError("milvus-server runs no milvus binary")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until pymilvus lists the collections (the proxy and the coordinators are up)."""
        import logging

        from pymilvus import MilvusClient

        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # each failed try logs a traceback
        deadline = time.monotonic() + timeout
        while self._binary is None:  # the wrapper writes the config first
            if (self.data_dir / "configs" / "milvus.yaml").is_file() and self._has_child():
                self._find_binary()
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"milvus-server did not start:\n{self.tail()}")
            else:
                time.sleep(0.2)
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited:\n{self.tail()}")
            try:
                client = MilvusClient(uri=self.uri, timeout=2)
                try:
                    client.list_collections(timeout=2)
                    return
                finally:
                    client.close()
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"Milvus at {self.uri} not answering after {timeout}s:\n{self.tail()}") \
                        from None
                time.sleep(0.5)

    def _has_child(self) -> bool:
        try:
            return bool(Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split())
        except OSError:
            return False

    def database_uri(self, key: str) -> str:
        """The URI of a Milvus database of its own for `key` (made if missing):
        rankers of different tests share the server, not collections."""
        import hashlib

        from pymilvus import MilvusClient

        name = "t_" + hashlib.sha256(str(key).encode()).hexdigest()[:16]
        client = MilvusClient(uri=self.uri, timeout=30)
        try:
            if name not in client.list_databases():
                client.create_database(name)
        finally:
            client.close()
        return f"{self.uri}/{name}"

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self, timeout: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
            self._signal(signal.SIGKILL)  # anything of its group still there
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """`kill -9` of the server and everything it started."""
        self._signal(signal.SIGKILL)
        self._reap(10)

    def pause(self) -> None:
        """SIGSTOP: a server that holds its connections and answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout`."""
        self._signal(signal.SIGTERM)
        self._reap(timeout)

    def restart(self, timeout: float = 120.0, wait: bool = True) -> "MilvusServer":
        """Start again on the same ports and data (after `kill()` or `stop()`)."""
        if self.proc is not None:
            self.stop()
        return self.start(timeout, wait)

    def __enter__(self) -> "MilvusServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
