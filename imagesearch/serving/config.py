"""Server configuration: the flags (with environment defaults) both servers
take, `ServerConfig` built from them, and logging set-up."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from imagesearch import logs
from imagesearch.defaults import AUTH_TOKEN_ENV
from imagesearch.defaults import MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token: str | None = None
    grace_s: float = 10.0
    max_workers: int = 16
    # Calls in progress or waiting for a handler thread; past it new calls get
    # RESOURCE_EXHAUSTED at once instead of queueing without bound. 0 = no cap.
    max_concurrent_rpcs: int = 1024

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, max_message_bytes: int | None = None) -> "ServerConfig":
        token = args.auth_token
        if args.auth_token_file:
            token = read_token_file(args.auth_token_file)
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("error: --tls-cert and --tls-key go together: give both or neither")
        if args.max_concurrent_rpcs < 0:
            raise SystemExit("error: --max-concurrent-rpcs must be 0 (no cap) or more")
        if args.tls_client_ca and not args.tls_cert:
            raise SystemExit("error: --tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return cls(
            host=args.host,
            port=args.port,
            max_message_bytes=max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_token=token or None,
            grace_s=args.grace,
            max_workers=args.max_workers,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
        )


def read_token_file(path: str | os.PathLike) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise SystemExit(f"error: the token file {path} is empty")
    return token


def env_default(name: str, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return type(default)(value) if default is not None and not isinstance(default, str) else value


def add_server_arguments(parser: argparse.ArgumentParser, *, env_prefix: str, default_port: int) -> None:
    """Flags common to both servers; each has an environment default."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=env_default(f"{env_prefix}_HOST", "127.0.0.1"),
                   help=f"address to bind (env {env_prefix}_HOST; default %(default)s; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=env_default(f"{env_prefix}_PORT", default_port),
                   help=f"port to bind, 0 picks a free one (env {env_prefix}_PORT; default %(default)s)")
    g.add_argument("--grace", type=float, default=10.0,
                   help="seconds to drain in-flight calls on SIGTERM (default %(default)s)")
    g.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads (default %(default)s)")
    g.add_argument("--max-concurrent-rpcs", type=int,
                   default=env_default(f"{env_prefix}_MAX_CONCURRENT_RPCS", ServerConfig.max_concurrent_rpcs),
                   help="calls running or queued for a thread; more get RESOURCE_EXHAUSTED at once, 0 = no cap "
                        f"(env {env_prefix}_MAX_CONCURRENT_RPCS; default %(default)s)")
    s = parser.add_argument_group("security")
    s.add_argument("--tls-cert", type=Path, default=env_default(f"{env_prefix}_TLS_CERT", None),
                   help="PEM certificate chain: serve TLS")
    s.add_argument("--tls-key", type=Path, default=env_default(f"{env_prefix}_TLS_KEY", None),
                   help="PEM private key for --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, default=env_default(f"{env_prefix}_TLS_CLIENT_CA", None),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    s.add_argument("--auth-token", default=env_default(AUTH_TOKEN_ENV, None),
                   help=f"require 'authorization: Bearer TOKEN' on every RPC but health (env {AUTH_TOKEN_ENV})")
    s.add_argument("--auth-token-file", type=Path, default=None, help="read the token from this file")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format (imagesearch.logs)."""
    logs.add_logging_arguments(parser)


def configure_logging(level: str, fmt: str = "text") -> None:
    logs.configure_logging(level, fmt)
