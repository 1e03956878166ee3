"""`python -m ranker_service` / `imagesearch-ranker`: serve RankerService.

    imagesearch-ranker --db gallery.db --port 50052

Opens (creating if missing) and locks the SQLite database, starts the gRPC
server (health NOT_SERVING, RPCs UNAVAILABLE), loads every collection into
memory, then turns health SERVING. With `--backend milvus` the server starts
whether or not Milvus answers yet; it loads once Milvus does, and health
follows Milvus's reachability from then on (ranker_service/milvus/link.py). SIGTERM/SIGINT drain in-flight calls and
close the database. A database that cannot be used (read-only, locked by
another process, corrupt) ends the process with exit status 1 and a message.
"""

from __future__ import annotations

import os

# BLAS threads must be set before numpy loads: one search is a memory-bound
# matrix-vector product, and several run at once on gRPC threads.
_BLAS_THREADS = os.environ.get("IMAGESEARCH_RANKER_BLAS_THREADS") or "1"
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _BLAS_THREADS)

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from imagesearch import extras

# Before anything imports what the [ranker] extra brings: a base install gets one line, exit 2.
extras.exit_if_missing("ranker", prog="imagesearch-ranker")

from imagesearch import defaults, serving
from imagesearch.errors import StoreError
from imagesearch.serving.metrics import add_metrics_arguments
from imagesearch.serving.observe import Observability
from ranker_service.backend import BACKENDS, DEFAULT_BATCH_SIZE, RankerBackend
from ranker_service.metrics import COLLECTION_LABELS, collection_label, metered
from ranker_service.servicer import DEFAULT_MAX_BACKUPS, DEFAULT_MAX_BATCH, SERVICE_NAME, RankerServicer, register
from ranker_service.sqlite.backend import SqliteBackend
from ranker_service.sqlite.store import Store

log = logging.getLogger("ranker_service")

ENV = defaults.RANKER_ENV
SYNC_NAMES = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagesearch-ranker",
        description="RankerService: gallery vectors in SQLite and in memory, cosine top-k over gRPC.")
    serving.add_server_arguments(parser, env_prefix=ENV, default_port=defaults.RANKER_PORT)
    serving.add_logging_arguments(parser)
    add_metrics_arguments(parser, env_prefix=ENV)
    r = parser.add_argument_group("ranker")
    r.add_argument("--backend", choices=BACKENDS, default=serving.env_default(f"{ENV}_BACKEND", "sqlite"),
                   help="where vectors live: sqlite (--db, in-memory indexes) or milvus (--milvus-uri) "
                        f"(env {ENV}_BACKEND; default %(default)s)")
    r.add_argument("--db", default=serving.env_default(f"{ENV}_DB", "ranker.db"),
                   help=f"SQLite database file, created if missing (env {ENV}_DB; default %(default)s)")
    r.add_argument("--milvus-uri", default=serving.env_default(f"{ENV}_MILVUS_URI", ""),
                   help="--backend milvus: http://host:19530 for a server or cluster, or a local file for "
                        f"milvus-lite (env {ENV}_MILVUS_URI)")
    r.add_argument("--milvus-token", default=serving.env_default(f"{ENV}_MILVUS_TOKEN", ""),
                   help=f"--backend milvus: user:password or API key (env {ENV}_MILVUS_TOKEN; prefer the env)")
    r.add_argument("--milvus-timeout", type=float, default=serving.env_default(f"{ENV}_MILVUS_TIMEOUT", 10.0),
                   help="--backend milvus: seconds a Milvus operation may take (a search: less where its "
                        "deadline is nearer) before the call answers UNAVAILABLE (default %(default)s)")
    r.add_argument("--batch-size", type=int, default=serving.env_default(f"{ENV}_BATCH_SIZE", DEFAULT_BATCH_SIZE),
                   help="Upsert items per SQLite transaction (one fsync each) (default %(default)s)")
    r.add_argument("--max-batch", type=int, default=serving.env_default(f"{ENV}_MAX_BATCH", DEFAULT_MAX_BATCH),
                   help="most SearchStream queries answered by one matrix product (default %(default)s)")
    r.add_argument("--metrics-collections", choices=COLLECTION_LABELS,
                   default=serving.env_default(f"{ENV}_METRICS_COLLECTIONS", "auto"),
                   help="how per-collection metrics name a collection: names, hashed (sha256, 12 hex digits), or "
                        "auto: names unless an auth token is set (default %(default)s)")
    r.add_argument("--max-backups", type=int, default=serving.env_default(f"{ENV}_MAX_BACKUPS", DEFAULT_MAX_BACKUPS),
                   help="Backup calls running at once; more are refused (RESOURCE_EXHAUSTED) (default %(default)s)")
    r.add_argument("--busy-timeout", type=float, default=serving.env_default(f"{ENV}_BUSY_TIMEOUT", 5.0),
                   help="seconds to wait for a database locked by another process (default %(default)s)")
    r.add_argument("--max-db-mb", type=float, default=serving.env_default(f"{ENV}_MAX_DB_MB", 0.0),
                   help="refuse writes (RESOURCE_EXHAUSTED) that would grow the database past this size; "
                        "0 = no limit (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return serving.run_main(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    serving.configure_logging(args.log_level, args.log_format)
    if args.batch_size < 1 or args.max_batch < 1:
        raise serving.StartupError("--batch-size and --max-batch must be at least 1")
    config = serving.ServerConfig.from_args(args)
    observed = Observability("ranker", args.metrics_port)
    if args.backend == "milvus":
        message = extras.missing_extra_message("milvus")
        if message is not None:
            raise serving.StartupError(message)
        from ranker_service.milvus import MilvusBackend

        if not args.milvus_uri:
            raise SystemExit("error: --backend milvus needs --milvus-uri (or IMAGESEARCH_RANKER_MILVUS_URI)")
        backend = MilvusBackend(args.milvus_uri, args.milvus_token, batch_size=args.batch_size,
                                timeout=args.milvus_timeout)
        return serve(args, config, observed, backend, None, release=lambda: None)
    try:
        store = Store.open(args.db, busy_timeout=args.busy_timeout,
                           max_bytes=int(args.max_db_mb * 1e6) if args.max_db_mb > 0 else None)
    except StoreError as exc:
        log.error("cannot start: %s", exc)
        raise SystemExit(f"error: {exc}") from None
    log.info("database %s (journal_mode=%s, synchronous=%s, locking_mode=%s); BLAS threads %s", args.db,
             store.pragma("journal_mode"), SYNC_NAMES.get(store.pragma("synchronous")), store.pragma("locking_mode"),
             _BLAS_THREADS)
    backend = SqliteBackend(store, batch_size=args.batch_size)
    # a search waiting for a rebuild of derived data that the stop will cancel ends at once (UNAVAILABLE)
    return serve(args, config, observed, backend, store.path, release=store.close, on_drain=backend.derived.stop)


def serve(args: argparse.Namespace, config: serving.ServerConfig, observed: Observability, backend: RankerBackend,
          db_path: Path | None, *, release: Callable[[], None], on_drain: Callable[[], None] | None = None) -> int:
    """Start the server (health NOT_SERVING, RPCs UNAVAILABLE), load the backend, turn SERVING, and serve
    until SIGTERM/SIGINT; `release` frees what the backend holds when the start fails."""
    servicer = RankerServicer(max_batch=args.max_batch, max_backups=args.max_backups)
    try:
        running = serving.build_server(config, register(servicer), [SERVICE_NAME], observed.interceptors)
        observed.start(args.host)
    except BaseException:
        release()
        raise
    def attach():
        servicer.attach(metered(backend, observed.metrics, db_path,
                                collection_label(args.metrics_collections, config.auth_token is not None)))

    follow = getattr(backend, "follow", None)
    if follow is not None:  # Milvus: loads once it answers; health follows its reachability
        follow(attach, running.set_serving)
    else:
        try:
            backend.load()
        except (StoreError, MemoryError) as exc:
            log.error("cannot start: %s", exc)
            running.stop(0).wait()
            release()
            raise SystemExit(f"error: {exc}") from None
        attach()
        running.set_serving(True)

    def on_stop():
        servicer.ready.detach()
        backend.close()
        observed.close()
    serving.serve_until_signalled(running, on_stop=on_stop, on_drain=on_drain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
