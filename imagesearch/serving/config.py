"""Server configuration: the flags (with environment defaults) both servers
take, `ServerConfig` built from them, and start-up errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from imagesearch import defaults
from imagesearch.defaults import AUTH_TOKEN_ENV
from imagesearch.defaults import MAX_MESSAGE_BYTES as DEFAULT_MAX_MESSAGE_BYTES
from imagesearch.parent import follow_parent


class StartupError(SystemExit):
    """A server cannot start (bad flag, port in use, unreadable certificate):
    `run_main` prints `error: MESSAGE` as one line and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_main(main, argv=None) -> int:
    """Run `main(argv)`; a StartupError becomes one line on stderr and exit 2.
    First, a service started by clients.cli.services follows its parent (imagesearch.parent)."""
    follow_parent()
    try:
        return main(argv) or 0
    except StartupError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        return 2


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
    # Threads for blocking work (searches, SQLite writes, synchronous handlers):
    # open calls hold none; 0 = the CPU count.
    max_workers: int = 0
    # Calls in progress on the server; past it new calls get RESOURCE_EXHAUSTED
    # at once. Above what an abuse run opens: abusers meet the bounds below first.
    max_concurrent_rpcs: int = defaults.MAX_CONCURRENT_RPCS
    # A streaming call that reads no message and writes no response for this
    # long ends with DEADLINE_EXCEEDED. 0 = never.
    stream_idle_timeout_s: float = defaults.STREAM_IDLE_TIMEOUT_S
    max_streams_per_connection: int = defaults.MAX_STREAMS_PER_CONNECTION
    max_connection_idle_s: float = defaults.MAX_CONNECTION_IDLE_S
    max_connection_age_s: float = defaults.MAX_CONNECTION_AGE_S
    max_connection_age_grace_s: float = defaults.MAX_CONNECTION_AGE_GRACE_S
    max_health_watches: int = defaults.MAX_HEALTH_WATCHES

    @property
    def tls(self) -> str:
        """How the server authenticates transport, for the start-up log."""
        if not self.tls_cert:
            return "off (plaintext)"
        return "mutual TLS" if self.tls_client_ca else "TLS"

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, max_message_bytes: int | None = None) -> "ServerConfig":
        token = args.auth_token
        if token is not None and not token.strip():
            raise StartupError(f"--auth-token (or {AUTH_TOKEN_ENV}) is empty: give a token, or unset it to "
                               "serve without authentication")
        if args.auth_token_file:
            token = read_token_file(args.auth_token_file)
        if bool(args.tls_cert) != bool(args.tls_key):
            raise StartupError("--tls-cert and --tls-key go together: give both or neither")
        if args.max_concurrent_rpcs < 0:
            raise StartupError("--max-concurrent-rpcs must be 0 (no cap) or more")
        if args.tls_client_ca and not args.tls_cert:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        limits = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _ in LIMIT_FLAGS}
        for flag, value in [("--max-workers", args.max_workers),
                            *((flag, limits[field]) for flag, field, _ in LIMIT_FLAGS)]:
            if value < 0:
                raise StartupError(f"{flag} must be 0 (off) or more, not {value}")
        return cls(host=args.host, port=args.port, max_message_bytes=max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                   tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                   auth_token=token or None, grace_s=args.grace, max_workers=args.max_workers, **limits)


def read_token_file(path: str | os.PathLike) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise StartupError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise StartupError(f"the token file {path} is empty")
    return token


def env_default(name: str, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return type(default)(value) if default is not None and not isinstance(default, str) else value


# The limit flags: (flag, ServerConfig field holding its default, help); each reads its
# default from the environment variable named after it.
LIMIT_FLAGS = (
    ("--max-concurrent-rpcs", "max_concurrent_rpcs",
     "calls in progress; more get RESOURCE_EXHAUSTED at once, 0 = no cap"),
    ("--stream-idle-timeout", "stream_idle_timeout_s",
     "seconds a streaming call may go without a message read or a response written before it ends with "
     "DEADLINE_EXCEEDED; 0 = never"),
    ("--max-streams-per-connection", "max_streams_per_connection",
     "HTTP/2 concurrent streams one connection may open; a client queues the rest"),
    ("--max-connection-idle", "max_connection_idle_s",
     "seconds a connection with no call open stays up before GOAWAY; 0 = forever"),
    ("--max-connection-age", "max_connection_age_s",
     "seconds after which a connection gets GOAWAY (clients reconnect; calls open then get "
     "--max-connection-age-grace more); 0 = forever"),
    ("--max-connection-age-grace", "max_connection_age_grace_s",
     "seconds calls open on a connection past --max-connection-age may still run before they end UNAVAILABLE"),
    ("--max-health-watches", "max_health_watches",
     "health Watch streams open at once; more get RESOURCE_EXHAUSTED, 0 = no cap"),
)


def add_server_arguments(parser: argparse.ArgumentParser, *, env_prefix: str, default_port: int) -> None:
    """Flags common to both servers; each has an environment default."""
    def env(name, default):
        return env_default(f"{env_prefix}_{name}", default)

    g = parser.add_argument_group("server")
    g.add_argument("--host", default=env("HOST", "127.0.0.1"),
                   help=f"address to bind (env {env_prefix}_HOST; default %(default)s; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=env("PORT", default_port),
                   help=f"port to bind, 0 picks a free one (env {env_prefix}_PORT; default %(default)s)")
    g.add_argument("--grace", type=float, default=10.0,
                   help="seconds to drain in-flight calls on SIGTERM (default %(default)s)")
    g.add_argument("--max-workers", type=int, default=env("MAX_WORKERS", 0),
                   help="threads for blocking work (searches, database writes); an open call holds none; "
                        f"0 = the CPU count (env {env_prefix}_MAX_WORKERS)")
    a = parser.add_argument_group("limits on calls and connections")
    for flag, field, text in LIMIT_FLAGS:
        name = flag[2:].upper().replace("-", "_")
        default = getattr(ServerConfig, field)
        a.add_argument(flag, type=type(default), default=env(name, default),
                       help=f"{text} (env {env_prefix}_{name}; default %(default)s)")
    s = parser.add_argument_group("security")
    s.add_argument("--tls-cert", type=Path, default=env("TLS_CERT", None),
                   help="PEM certificate chain: serve TLS")
    s.add_argument("--tls-key", type=Path, default=env("TLS_KEY", None),
                   help="PEM private key for --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, default=env("TLS_CLIENT_CA", None),
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    # The raw environment value: a set-but-empty variable is refused, not read as "no auth".
    s.add_argument("--auth-token", default=os.environ.get(AUTH_TOKEN_ENV),
                   help=f"require 'authorization: Bearer TOKEN' on every RPC but health (env {AUTH_TOKEN_ENV}); "
                        "an empty token is refused")
    s.add_argument("--auth-token-file", type=Path, default=None, help="read the token from this file")
