"""A one-shot health probe for containers: `python -m imagesearch.serving.probe`.

Asks a server's standard `grpc.health.v1.Health/Check` once and exits 0 when
it answers SERVING (readiness), or with `--alive` when it answers at all
(liveness: a server still loading its model answers NOT_SERVING and is alive).
Exit 1 otherwise, with one line saying why. Docker HEALTHCHECK, compose
healthchecks and Kubernetes exec probes use it; it speaks TLS (which
Kubernetes' built-in gRPC probe cannot) and needs no token (health is open).

    python -m imagesearch.serving.probe 127.0.0.1:50051
    python -m imagesearch.serving.probe --alive --tls-ca /tls/ca.crt --tls-server-name embedder 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m imagesearch.serving.probe", description=__doc__.splitlines()[0])
    p.add_argument("address", help="HOST:PORT of the server")
    p.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    p.add_argument("--alive", action="store_true", help="succeed on any health answer, SERVING or not")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA bundle: connect over TLS, verifying the server with it")
    p.add_argument("--tls-server-name", help="name to verify the server certificate against")
    return p


def check(address: str, *, service: str = "", alive: bool = False, timeout: float = 3.0,
          tls_ca: Path | None = None, tls_server_name: str | None = None) -> str | None:
    """None when healthy, else why not."""
    options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    if tls_ca is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), options)
    else:
        channel = grpc.insecure_channel(address, options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{address}: {exc.code().name}: {exc.details()}"
    if alive or reply.status == SERVING:
        return None
    return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        problem = check(args.address, service=args.service, alive=args.alive, timeout=args.timeout,
                        tls_ca=args.tls_ca, tls_server_name=args.tls_server_name)
    except OSError as exc:
        problem = f"cannot read {args.tls_ca}: {exc.strerror}"
    print(problem or f"{args.address}: ok", file=sys.stderr if problem else sys.stdout)
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
