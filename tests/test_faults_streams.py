"""A server that dies in the middle of a bidirectional stream: the client
call fails with UNAVAILABLE at once, within its deadline.

The server is a small real process that serves the contracts' stream method
paths with a handler that reads every request, says so, and then answers
nothing; the test kills it (SIGKILL) once it has read them all (the client has
half-closed) and before any answer. With gRPC retries enabled for
bidirectional methods, grpcio (1.85) leaves exactly this call hanging past its
deadline; `clients.channels` therefore retries all but those methods."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc

from clients.channels import RetryPolicy, service_config
from clients.embedder import SERVICE as EMBEDDER_SERVICE
from clients.embedder import EmbedderClient, ImageSource
from clients.errors import ClientError
from clients.ranker import SERVICE as RANKER_SERVICE
from clients.ranker import RankerClient

SILENT_SERVER = r"""
import sys, time
from concurrent import futures
import grpc

def reads_all_then_hangs(requests, context):
    n = sum(1 for _ in requests)
    print(f"read {n}", flush=True)
    time.sleep(600)
    yield b""

handler = grpc.stream_stream_rpc_method_handler(reads_all_then_hangs)
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((
    grpc.method_handlers_generic_handler("imagesearch.v1.EmbedderService", {"EmbedStream": handler}),
    grpc.method_handlers_generic_handler("imagesearch.v1.RankerService", {"SearchStream": handler}),
))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"port {port}", flush=True)
server.wait_for_termination()
"""

DEADLINE_S = 20.0


def _call_while_the_server_dies(call) -> tuple[BaseException | None, float]:
    """Start the silent server, run `call(address)` on a thread, kill the
    server once it has read every request; returns (what the call raised,
    seconds from the kill to the call's end)."""
    server = subprocess.Popen([sys.executable, "-c", SILENT_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        outcome: list = []

        def run():
            try:
                call(f"127.0.0.1:{port}")
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        line = server.stdout.readline()
        assert line.startswith("read "), line
        time.sleep(0.2)  # the server sits in its handler, the client waits for its first answer
        server.kill()
        killed = time.monotonic()
        thread.join(DEADLINE_S + 15)
        assert not thread.is_alive(), f"the call still hangs {time.monotonic() - killed:.0f}s after the server died " \
                                      f"(its deadline was {DEADLINE_S:.0f}s)"
        return outcome[0], time.monotonic() - killed
    finally:
        server.kill()
        server.wait()


def test_embed_stream_fails_fast_when_the_embedder_dies_mid_stream():
    def call(address):
        with EmbedderClient(address, timeout=DEADLINE_S) as client:
            items = [ImageSource(str(i), lambda: b"image bytes") for i in range(3)]
            list(client.embed_stream(items, timeout=DEADLINE_S))

    error, seconds = _call_while_the_server_dies(call)
    assert isinstance(error, ClientError) and error.code == grpc.StatusCode.UNAVAILABLE, error
    assert "the embedder at" in str(error) and "unavailable" in str(error)
    assert seconds < DEADLINE_S


def test_search_stream_fails_fast_when_the_ranker_dies_mid_stream():
    def call(address):
        with RankerClient(address, timeout=DEADLINE_S) as client:
            queries = [(str(i), [1.0, 0.0]) for i in range(3)]
            list(client.search_stream("c", queries, timeout=DEADLINE_S))

    error, seconds = _call_while_the_server_dies(call)
    assert isinstance(error, ClientError) and error.code == grpc.StatusCode.UNAVAILABLE, error
    assert seconds < DEADLINE_S


def test_bidirectional_streams_are_not_retried_and_the_rest_are():
    config = service_config([EMBEDDER_SERVICE, RANKER_SERVICE], RetryPolicy())
    (method_config,) = config["methodConfig"]
    retried = {(n["service"].rsplit(".", 1)[1], n["method"]) for n in method_config["name"]}
    assert retried == {("EmbedderService", "Embed"), ("EmbedderService", "GetModelInfo"),
                       ("RankerService", "Upsert"), ("RankerService", "Delete"), ("RankerService", "Search"),
                       ("RankerService", "GetStats"), ("RankerService", "CreateCollection"),
                       ("RankerService", "DropCollection"), ("RankerService", "Backup"),
                       ("RankerService", "ListItems"), ("RankerService", "Rename"),
                       ("RankerService", "CreateAlias"), ("RankerService", "SwitchAlias"),
                       ("RankerService", "DropAlias"), ("RankerService", "ListAliases")}
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "methodConfig" not in service_config([EMBEDDER_SERVICE], None)
