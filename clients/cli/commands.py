"""The `imagesearch` sub-commands, one function each (`cmd_NAME(args) -> exit
code`), and what they share: the clients from the flags, early checks of
the inputs, writing the results.

Exit codes: 0 ok, 1 runtime failure (a service down or failing), 2 usage or
input error."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from clients import metrics
from clients.channels import AUTH_TOKEN_ENV, Security
from clients.cli import dedupe, report, rollout
from clients.cli import demo as demo_data
from clients.cli.jobs import QueryReport, embedder_for, index_folder, query_folder
from clients.cli.output import index_summary, json_text, printable, query_summary, say
from clients.embedder import ADDRESS_ENV as EMBEDDER_ENV
from clients.embedder import DEFAULT_ADDRESS as DEFAULT_EMBEDDER
from clients.embedder import EmbedderClient, file_source
from clients.errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, ClientError, UsageError
from clients.options import above, match_json, parse_pairs, rerank_options
from clients.files import IMAGE_EXTENSIONS, FolderListing, list_images
from clients.ranker import ADDRESS_ENV as RANKER_ENV
from clients.ranker import DEFAULT_ADDRESS as DEFAULT_RANKER
from clients.ranker import RankerClient
from clients.cli.services import (EMBEDDER_MODULE, RANKER_MODULE, Services, embedder_args, require_extras,
                                  wait_for_signal)
from imagesearch.defaults import DEFAULT_BACKBONE, MAX_TOP_K
from imagesearch.files import atomic_write_text

log = logging.getLogger(__name__)

METRICS_LINE = re.compile(r"metrics on (http://\S+:\d+/metrics)")

START_TIMEOUT_S = 600.0


# ---------------------------------------------------------------- helpers


def _security(args) -> Security:
    return Security(tls=args.tls, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                    server_name=args.tls_server_name, auth_token=args.auth_token or None)


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise UsageError(f"--top-k must be between 1 and {MAX_TOP_K} (got {top_k})")


@contextlib.contextmanager
def _clients(args, *, embedder: str | None = None, ranker: str | None = None, security: Security | None = None,
             need_ranker: bool = True, model: str = "") -> Iterator[tuple[EmbedderClient, RankerClient | None]]:
    security = security or _security(args)
    emb = EmbedderClient(embedder or args.embedder or DEFAULT_EMBEDDER, security=security, timeout=args.timeout,
                         model=model)
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
        return metrics.labels_from_folders(*args.labels_from_folders,
                                           follow_symlinks=getattr(args, "follow_symlinks", False))
    return None


def _job_exit(r, strict: bool = False) -> int:
    if r.service_error or r.runtime_failures:
        return EXIT_RUNTIME
    if strict and r.failed:
        return EXIT_USAGE
    return EXIT_OK


def _write(path: Path, text: str) -> None:
    """A results file or a report, written atomically (a unique temporary file,
    fsync, rename): a reader or a crash never sees half of it."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def _write_json(path: Path, data) -> None:
    _write(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def _check_outputs(out: Path | None, html: Path | None, *, default_html: bool = False) -> None:
    """Said before any work is done: the results JSON and the HTML report
    must be two files (one would overwrite the other), each one writable."""
    if out is not None and html is not None:
        same = out.resolve() == html.resolve()
        with contextlib.suppress(OSError):
            same = same or os.path.samefile(out, html)
        if same:
            how = " (the report's default name is --out with .html)" if default_html else ""
            raise UsageError(f"--out and --html name the same file, {out}{how}: the report would overwrite the "
                             "results; give --html another name" + (" or pass --no-html" if default_html else ""))
    for path in (out, html):
        if path is None:
            continue
        parent = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give a file name")
        if parent.exists() and not os.access(parent, os.W_OK):
            raise UsageError(f"cannot write to {parent}")


def _write_html(path: Path, r: QueryReport, *, gallery: Path | None, truth, evaluation, title: str) -> None:
    queries = sorted(r.results.items())
    notes = [f"{r.done} queries against collection {r.collection!r}, top {r.top_k}."]
    if gallery is None:
        notes.append("Gallery thumbnails are missing: pass --gallery GALLERY_DIR to include them.")
    _write(path, report.render(title, queries, query_root=r.folder, gallery_root=gallery, ground_truth=truth,
                               evaluation=evaluation, failures=r.failed, notes=notes))


# ---------------------------------------------------------------- commands


def _check_truth_covers(queries: FolderListing, truth: dict | None) -> None:
    """Every query image must be in the ground truth: said before any work is done."""
    if truth is None:
        return
    names = [n for n, _ in queries.images]
    unknown = [n for n in names if n not in truth]
    if unknown:
        raise UsageError(f"{len(unknown)} of {len(names)} query images are not in the ground truth "
                         f"(e.g. {', '.join(unknown[:3])}); names are paths relative to {queries.root}")


def _require_images(folder: Path, what: str, follow_symlinks: bool) -> FolderListing:
    """The folder's listing (the one listing a job uses); fails fast, before
    contacting any service, on a missing or empty folder."""
    listing = list_images(folder, what=what, follow_symlinks=follow_symlinks)
    if not listing.images:
        raise UsageError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return listing


def _attributes(args) -> dict[str, str]:
    """--attributes KEY=VALUE ...: one value per key."""
    pairs = parse_pairs(args.attributes, "--attributes")
    twice = sorted(k for k, v in pairs.items() if len(v) > 1)
    if twice:
        raise UsageError(f"--attributes gives {', '.join(twice)} more than one value: an item holds one per key")
    return {k: v[0] for k, v in pairs.items()}


def _filters(args) -> dict[str, list[str]]:
    """--filter KEY=VALUE ...: a key given again adds a value (IN)."""
    return parse_pairs(getattr(args, "filter", None), "--filter")


def _rerank(args) -> dict:
    """query_folder / search keyword arguments of --query-expansion and --rerank."""
    return rerank_options(getattr(args, "query_expansion", None), getattr(args, "rerank", None))


def _embedder_args(args) -> list[str]:
    """The model flags of an embedder this command starts: --checkpoint, else --backbone
    (default DEFAULT_BACKBONE, whatever the environment says) and --weights."""
    return embedder_args(checkpoint=args.checkpoint, backbone=args.backbone or DEFAULT_BACKBONE,
                         weights=args.weights, device=args.device)


def cmd_index(args) -> int:
    gallery = _require_images(args.gallery, "gallery folder", args.follow_symlinks)
    with _clients(args) as (emb, rank):
        if args.alias:
            rollout.index_alias(emb, rank, args.alias)
        r = index_folder(emb, rank, gallery, collection=args.alias or args.collection, chunk_size=args.chunk_size,
                         concurrency=args.concurrency, progress=args.progress, attributes=_attributes(args),
                         attributes_from_folders=args.attributes_from_folders, sync=args.sync, full=args.full)
    index_summary(r)
    return _job_exit(r, args.strict)


def cmd_reindex(args) -> int:
    if (args.queries is None) != (args.ground_truth is None):
        raise UsageError("--queries and --ground-truth go together: the queries and what each should find")
    if args.sample < 1:
        raise UsageError(f"--sample must be at least 1 (got {args.sample})")
    truth = _load_ground_truth(args)
    queries = _require_images(args.queries, "query folder", args.follow_symlinks) if args.queries else None
    if queries is not None:
        _check_truth_covers(queries, truth)
    _require_images(args.gallery, "gallery folder", args.follow_symlinks)
    # The embedder the environment names, when --embedder names another: it may serve the old model.
    current = os.environ.get(EMBEDDER_ENV)
    with _clients(args, model=args.model or "") as (emb, rank), contextlib.ExitStack() as stack:
        others = []
        if current and current != emb.address:
            others.append(stack.enter_context(EmbedderClient(current, security=_security(args), timeout=args.timeout)))
        return rollout.reindex(emb, rank, args.gallery, alias=args.alias, others=others, sample=args.sample,
                               seed=args.seed, queries=queries, truth=truth, force=args.force,
                               drop_old=args.drop_old, follow_symlinks=args.follow_symlinks,
                               chunk_size=args.chunk_size, concurrency=args.concurrency, progress=args.progress)


def cmd_alias(args) -> int:
    with RankerClient(args.ranker or DEFAULT_RANKER, security=_security(args), timeout=args.timeout) as rank:
        rank.wait_ready(connect_timeout=args.connect_timeout)
        return rollout.alias_command(rank, args)


def cmd_query(args) -> int:
    rerank = _rerank(args)
    _check_outputs(args.out, args.html)
    _check_top_k(args.top_k)
    truth = _load_ground_truth(args)
    queries = _require_images(args.queries, "query folder", args.follow_symlinks)
    _check_truth_covers(queries, truth)
    with _clients(args) as (emb, rank):
        r = query_folder(emb, rank, queries, collection=args.collection, top_k=args.top_k,
                         chunk_size=args.chunk_size, concurrency=args.concurrency, progress=args.progress,
                         filters=_filters(args), min_score=args.min_score, **rerank)
    query_summary(r)
    results = r.names()
    if args.out:
        _write_json(args.out, results)
        say(f"results: {args.out}")
    else:
        print(json_text(results))
    evaluation = None
    if truth is not None:
        evaluation = metrics.evaluate(results, truth, k=args.top_k)
        say(metrics.format_table(evaluation))
    if args.html:
        _write_html(args.html, r, gallery=args.gallery, truth=truth, evaluation=evaluation,
                    title=f"imagesearch: {args.queries}")
        say(f"report: {args.html}")
    return _job_exit(r)


def cmd_search(args) -> int:
    _check_top_k(args.top_k)
    filters = _filters(args)
    rerank = _rerank(args)
    try:
        data = args.image.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.image}: {exc.strerror}") from None
    with _clients(args) as (emb, rank), embedder_for(emb, rank, args.collection, must_exist=False) as (emb, _):
        result = emb.embed(data, name=str(args.image))
        matches = above(rank.search(args.collection, result.vector, top_k=args.top_k, fingerprint=result.fingerprint,
                                    filters=filters, with_attributes=args.json, **rerank), args.min_score)
    if args.json:
        print(json_text([match_json(m) for m in matches]))
    else:
        if not matches:
            say(f"no matches in collection {args.collection!r}"
                + (" (filters or --min-score left none)" if filters or args.min_score is not None else ""))
        for m in matches:
            print(f"{m.rank:>4}  {m.score:7.4f}  {printable(m.name)}")
    return EXIT_OK


def cmd_backup(args) -> int:
    if args.file.exists() and not args.force:
        raise UsageError(f"{args.file} exists: give another FILE, or --force to replace it")
    with RankerClient(args.ranker or DEFAULT_RANKER, security=_security(args), timeout=args.timeout) as rank:
        rank.wait_ready(connect_timeout=args.connect_timeout)
        result = rank.backup(args.file)
    say(f"backed up {result.vectors} vectors in {result.collections} collections to {result.path} "
        f"({result.size:,} bytes, sha256 {result.sha256[:16]}...)")
    return EXIT_OK


def cmd_embed(args) -> int:
    sources = []
    for path in args.images:
        if not path.is_file():
            raise UsageError(f"{path} is not a file")
        sources.append(file_source(str(path), path))
    with _clients(args, need_ranker=False) as (emb, _):
        info = emb.model_info()
        results = {r.name: r for r in emb.embed_many(sources, chunk_size=32)}
    failed = {k: r for k, r in results.items() if not r.ok}
    if args.json:
        print(json.dumps({
            "backbone": info.backbone, "dim": info.dim, "fingerprint": info.fingerprint, "weights": info.weights,
            "vectors": {str(p): [round(float(x), 7) for x in results[str(p)].vector]
                        for p in args.images if results[str(p)].ok},
            "errors": {k: str(r) for k, r in failed.items()},
        }))
    else:
        for p in args.images:
            r = results[str(p)]
            if r.ok:
                head = " ".join(f"{x:+.4f}" for x in r.vector[:6])
                print(f"{printable(p)}  dim={r.vector.size} norm={float((r.vector ** 2).sum()) ** 0.5:.4f}  [{head} ...]")
    for name, r in failed.items():
        say(f"error: {name}: {r}")
    if any(not r.is_input_error for r in failed.values()):
        return EXIT_RUNTIME
    return EXIT_USAGE if failed else EXIT_OK


def cmd_evaluate(args) -> int:
    results = metrics.load_results(args.results)
    truth = _load_ground_truth(args)
    evaluation = metrics.evaluate(results, truth, k=args.k)
    if args.json:
        print(json.dumps(evaluation.to_dict(), indent=1))
    else:
        print(printable(metrics.format_table(evaluation, title=f"{args.results} ({evaluation.queries} queries)"),
                        keep_newlines=True))
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
    require_extras("embedder", "ranker")
    emb_args = _embedder_args(args)
    def metrics(offset: int) -> list[str]:
        """Each service its own metrics port: the ranker --metrics-port, replica i that + i."""
        if args.metrics_port is None:
            return []
        return ["--metrics-port", str(args.metrics_port + offset if args.metrics_port else 0)]

    with Services() as services:
        embedders = []
        for i in range(args.embedder_replicas):
            port = args.embedder_port + 10 * i if args.embedder_port else 0
            if port and port == args.ranker_port:
                raise UsageError(f"embedder replica {i + 1} would take port {port}, the ranker's: "
                                 "pick other --embedder-port / --ranker-port values")
            name = "embedder" if args.embedder_replicas == 1 else f"embedder-{i + 1}"
            embedders.append(services.start(name, EMBEDDER_MODULE, [*emb_args, *tls_args, *metrics(i + 1)],
                                            host=args.host, port=port, env=env, echo=sys.stderr))
        ranker = services.start("ranker", RANKER_MODULE, ["--db", str(args.db), *tls_args, *metrics(0)],
                                host=args.host, port=args.ranker_port, env=env, echo=sys.stderr)
        services.wait_ready(START_TIMEOUT_S, probe)
        for child in services.children if args.metrics_port is not None else ():
            found = METRICS_LINE.search("\n".join(child.lines))
            say(f"  {child.what} metrics: {found.group(1) if found else 'not reported'}")
        embedder_address = ",".join(e.address for e in embedders)
        say(f"serving: embedder at {embedder_address}, ranker at {ranker.address} (database {args.db}). "
             "Ctrl-C stops both.")
        say(f"  export {EMBEDDER_ENV}={embedder_address} {RANKER_ENV}={ranker.address}")
        signame = wait_for_signal(lambda: any(c.proc.poll() is not None for c in services.children))
        died = [c for c in services.children if c.proc.poll() is not None]
        if signame:
            say(f"{signame}: stopping the services")
        services.stop()
    if died and not signame:
        raise ClientError(f"the {died[0].what} exited with code {died[0].proc.returncode}; "
                          "stopped the others. Its output is above.")
    say("stopped")
    return EXIT_OK


def cmd_run(args) -> int:
    return run_job(args)


def run_job(args, *, title: str | None = None) -> int:
    """`run`: validate everything first, start what is missing, index, query,
    write the JSON and HTML, evaluate, stop what was started."""
    rerank = _rerank(args)
    html_path = None if args.no_html else (args.html or args.out.with_suffix(".html"))
    _check_top_k(args.top_k)
    k = args.k or args.top_k
    truth = _load_ground_truth(args)
    _check_outputs(args.out, html_path, default_html=not args.html)
    gallery = _require_images(args.gallery, "gallery folder", args.follow_symlinks)
    queries = _require_images(args.query, "query folder", args.follow_symlinks)
    if k > args.top_k:
        raise UsageError(f"--k {k} is more than --top-k {args.top_k}: the metrics need at least k results")
    _check_truth_covers(queries, truth)
    if not args.embedder:
        require_extras("embedder", hint="; or give --embedder the address of a running one")
    if not args.ranker:
        require_extras("ranker", hint="; or give --ranker the address of a running one")

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
        embedder = ranker = None  # the services started here
        if not embedder_address:
            embedder = services.start("embedder", EMBEDDER_MODULE, _embedder_args(args), env=env)
            say("starting an embedder: " + (f"checkpoint {args.checkpoint}" if args.checkpoint else
                                            f"{args.backbone or DEFAULT_BACKBONE} ({args.weights or 'imagenet'})"))
        if not ranker_address:
            db = args.db or tmp / "gallery.db"
            ranker = services.start("ranker", RANKER_MODULE, ["--db", str(db)], env=env)
            say(f"starting a ranker: {db}")
        t0 = time.monotonic()
        services.wait_ready(START_TIMEOUT_S)
        if services.children:
            say(f"services ready in {time.monotonic() - t0:.1f}s")
        embedder_address = embedder_address or embedder.address
        ranker_address = ranker_address or ranker.address
        emb = stack.enter_context(EmbedderClient(embedder_address, security=emb_security, timeout=args.timeout))
        rank = stack.enter_context(RankerClient(ranker_address, security=rank_security, timeout=args.timeout))
        rank.wait_ready(connect_timeout=args.connect_timeout)
        emb.wait_ready(connect_timeout=args.connect_timeout)
        info = emb.model_info()
        say(f"model: {info.backbone} ({info.weights}), {info.dim}-d, on {info.device}")

        indexed = index_folder(emb, rank, gallery, collection=args.collection, chunk_size=args.chunk_size,
                               concurrency=args.concurrency, progress=args.progress)
        index_summary(indexed)
        if indexed.service_error:
            raise ClientError(f"indexing failed: {indexed.service_error}")
        if indexed.done == 0:
            raise UsageError(f"nothing could be indexed from {args.gallery}")
        answered = query_folder(emb, rank, queries, collection=args.collection, top_k=args.top_k,
                                min_score=args.min_score, **rerank,
                                chunk_size=args.chunk_size, concurrency=args.concurrency, progress=args.progress)
        query_summary(answered)
    # The services are stopped here; what is left is writing files.
    results = answered.names()
    _write_json(args.out, results)
    say(f"results: {args.out} ({len(results)} queries)")
    evaluation = None
    if truth is not None:
        evaluation = metrics.evaluate(results, truth, k=k)
        print(printable(metrics.format_table(evaluation, title=f"{args.out} against the ground truth"),
                        keep_newlines=True))
    if html_path is not None:
        _write_html(html_path, answered, gallery=args.gallery, truth=truth, evaluation=evaluation,
                    title=title or f"imagesearch: {args.query} against {args.gallery}")
        say(f"report: {html_path}")
    if answered.service_error:
        raise ClientError(f"querying failed: {answered.service_error}")
    return _job_exit(answered)


def _web():
    """clients.web.app, imported only now, or a usage error naming the extra."""
    require_extras("web")
    from clients.web import app

    return app


def _serve_web(args, *, embedder: str, ranker: str, gallery: Path | None, security: Security) -> None:
    web = _web()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.web_token:
        say(f"warning: the page listens on {args.host} with no --web-token: whoever reaches it can search")
    config = web.WebConfig(embedder, ranker, gallery=gallery, security=security, web_token=args.web_token or None,
                           timeout=getattr(args, "timeout", 30.0))
    web.serve(config, args.host, args.port, announce=lambda url: say(f"search page: {url} (Ctrl-C stops it)"))


def cmd_web(args) -> int:
    _web()
    if args.gallery is not None and not args.gallery.is_dir():
        raise UsageError(f"the gallery folder {args.gallery} does not exist or is not a folder")
    _serve_web(args, embedder=args.embedder or DEFAULT_EMBEDDER, ranker=args.ranker or DEFAULT_RANKER,
               gallery=args.gallery, security=_security(args))
    return EXIT_OK


def cmd_demo(args) -> int:
    require_extras("demo", *(["web"] if args.web else []))  # said before the demo's minute of work
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imagesearch-demo-") as tmp, Services() as services:
        gallery, query, gt_path, truth = demo_data.build(tmp, seed=args.seed)
        token = os.environ.get(AUTH_TOKEN_ENV) or None
        embedder = ranker = None
        if args.web:  # services started here outlive the run, for the page
            env = {AUTH_TOKEN_ENV: token} if token else {}
            say("starting the services for the page")
            services.start("embedder", EMBEDDER_MODULE, _embedder_args(args), env=env)
            services.start("ranker", RANKER_MODULE, ["--db", str(Path(tmp) / "demo.db")], env=env)
            services.wait_ready(START_TIMEOUT_S)
            embedder, ranker = (child.address for child in services.children)
        say(f"demo: {len(list(gallery.iterdir()))} photos from scikit-image and scikit-learn as the gallery, "
             f"{len(truth)} altered copies as queries")
        (out / "ground_truth.json").write_text(gt_path.read_text())
        run_args = argparse.Namespace(
            gallery=gallery, query=query, out=out / "results.json", html=out / "report.html", no_html=False,
            follow_symlinks=False, ground_truth=gt_path, labels_from_folders=None, collection="demo", top_k=10, k=None, db=None,
            min_score=None,
            chunk_size=32, concurrency=None, progress=None, embedder=embedder, ranker=ranker, timeout=120.0,
            connect_timeout=5.0, tls=False, tls_ca=None, tls_cert=None, tls_key=None, tls_server_name=None,
            auth_token=token, checkpoint=args.checkpoint,
            backbone=args.backbone, weights=args.weights, device=args.device)
        code = run_job(run_args, title="imagesearch demo: altered copies of real photos")
        say("(each query has one relevant gallery photo, two for the motorcycle stereo pair, so precision@10 "
            "is at most 0.1-0.2 here: mAP@10 and top-1 are the figures to read)")
        say(f"demo done: open {(out / 'report.html').resolve()}")
        if args.web and code == EXIT_OK:
            _serve_web(args, embedder=embedder, ranker=ranker, gallery=gallery, security=Security(auth_token=token))
    return code


def cmd_dedupe(args) -> int:
    if not -1.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine similarity: between -1 and 1 (got {args.threshold})")
    _check_outputs(args.out, args.html)
    filters = _filters(args)
    with RankerClient(args.ranker or DEFAULT_RANKER, security=_security(args), timeout=args.timeout) as rank:
        rank.wait_ready(connect_timeout=args.connect_timeout)
        items = list(rank.list_items(args.collection, filters=filters, with_vectors=True))
    names = [i.name for i in items]
    vectors = np.stack([i.vector for i in items]) if items else np.zeros((0, 1), np.float32)
    groups = dedupe.near_duplicate_groups(names, vectors, args.threshold)
    data = {"collection": args.collection, "threshold": args.threshold, "items": len(names),
            "groups": [g.as_dict() for g in groups]}
    say(f"{len(groups)} groups of near-duplicates ({sum(len(g.names) for g in groups)} of {len(names)} items) "
        f"at cosine >= {args.threshold} in collection {args.collection!r}")
    if args.out:
        _write_json(args.out, data)
        say(f"groups: {args.out}")
    else:
        print(json_text(data))
    if args.html:
        notes = [f"{len(groups)} groups of near-duplicate items (cosine similarity >= {args.threshold}) among "
                 f"{len(names)} items of collection {args.collection!r}: each row is one group, its first item "
                 "on the left, the others with their similarity to it."]
        if args.gallery is None:
            notes.append("Thumbnails are missing: pass --gallery GALLERY_DIR to include them.")
        _write(args.html, report.render(f"imagesearch dedupe: {args.collection}",
                                        dedupe.as_report_rows(groups, names, vectors),
                                        query_root=args.gallery, gallery_root=args.gallery, notes=notes))
        say(f"report: {args.html}")
    return EXIT_OK
