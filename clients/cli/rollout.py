"""A new model behind an alias, with no downtime for the clients that search
through it: `imagesearch reindex`, `imagesearch alias ...`, `index --alias`
(docs/operations.md#roll-out-a-new-model, where the steps and checks are).

`reindex` fills a shadow collection ALIAS-FINGERPRINT[:12] with the `index`
job itself (clients.cli.jobs: a killed run resumes there), syncs once more
with the folder, checks, and switches the alias by compare-and-swap on the
target it started from; the old collection stays for `alias rollback`."""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

import grpc

from clients import metrics
from clients.cli.jobs import index_folder, query_folder
from clients.cli.output import index_summary, printable, say
from clients.embedder import EmbedderClient, file_source
from clients.errors import EXIT_OK, ClientError, UsageError
from clients.files import FILE_KEYS, FolderListing, list_images
from clients.ranker import RankerClient
from clients.types import AliasInfo, CollectionStats, Match, ModelInfo

SAMPLE_K = 10      # the sample's rankings, and the overlap's depth
TIE = 1e-4         # a sample image tied on score with the top match (a duplicate file) counts as found


def shadow_name(alias: str, fingerprint: str) -> str:
    """The collection that holds an alias's gallery under one model."""
    return f"{alias}-{fingerprint[:12]}"


def find_alias(ranker: RankerClient, alias: str) -> AliasInfo | None:
    return next((a for a in ranker.list_aliases() if a.name == alias), None)


def _model(info: ModelInfo) -> str:
    return f"model {info.model or 'default'!r} ({info.backbone}, {info.weights}, fingerprint {info.fingerprint[:12]})"


def index_alias(embedder: EmbedderClient, ranker: RankerClient, alias: str) -> None:
    """`index --alias`: an alias that does not exist yet is created, with its
    collection (named as reindex names its shadow) for the embedder's model."""
    if find_alias(ranker, alias) is not None:
        return
    if ranker.collection(alias) is not None:
        raise UsageError(f"{alias!r} is a collection, not an alias: index it with --collection {alias}, or give it "
                         f"an alias of another name: imagesearch alias create ALIAS {alias}")
    info = embedder.model_info()
    collection = shadow_name(alias, info.fingerprint)
    ranker.create_collection(collection, info.dim, info.fingerprint)
    ranker.create_alias(alias, collection)
    say(f"created alias {alias!r} -> collection {collection!r} for {_model(info)}")


def _old_model(embedders: Sequence[EmbedderClient], old: CollectionStats,
               stack: contextlib.ExitStack) -> EmbedderClient | None:
    """A client for the served model whose fingerprint the old collection holds, if any."""
    for embedder in embedders:
        try:
            served = next((m for m in embedder.models() if m.fingerprint == old.fingerprint), None)
        except ClientError as exc:
            say(f"note: {exc}")
            continue
        if served is not None:
            return stack.enter_context(embedder.with_model(served.model))
    return None


def _rankings(embedder: EmbedderClient, ranker: RankerClient, collection: str,
              files: Sequence[tuple[str, Path]]) -> dict[str, list[Match]]:
    """Each file's top SAMPLE_K in `collection`, embedded by `embedder`."""
    queries = [e for e in embedder.embed_many([file_source(n, p) for n, p in files]) if e.ok]
    return {r.name: r.matches for r in ranker.search_stream(collection, queries, top_k=SAMPLE_K) if r.ok}


def _at_top(name: str, matches: list[Match]) -> bool:
    return any(m.name == name and m.score >= matches[0].score - TIE for m in matches)


def _map(embedder: EmbedderClient, ranker: RankerClient, collection: str, queries: FolderListing,
         truth: dict, job: dict) -> float:
    r = query_folder(embedder, ranker, queries, collection=collection, top_k=SAMPLE_K, **job)
    if r.service_error or r.runtime_failures:
        why = r.service_error or next(iter(r.runtime_failures.values()))
        raise ClientError(f"querying collection {collection!r} failed: {why}")
    return metrics.evaluate(r.names(), truth, k=SAMPLE_K).map


def reindex(new: EmbedderClient, ranker: RankerClient, gallery: Path, *, alias: str,
            others: Sequence[EmbedderClient] = (), sample: int = 20, seed: int = 0,
            queries: FolderListing | None = None, truth: dict | None = None, force: bool = False,
            drop_old: bool = False, follow_symlinks: bool = False, **job) -> int:
    """Move `alias` to the model `new` embeds with. Before the switch: one
    item per indexable file, and a seeded sample each its own best match (or
    ClientError); the top-10 overlap of old and new on the sample, the old
    side embedded by the served model (of `new`'s embedder or `others`) whose
    fingerprint the old collection holds; with `queries` and `truth`, mAP@10
    old against new (a lower new one is a UsageError unless `force`). `job`:
    chunk_size, concurrency, progress of the index job."""
    current = find_alias(ranker, alias)
    if current is None:
        raise UsageError(f"no alias {alias!r} on the ranker at {ranker.address}: give the gallery one with "
                         f"imagesearch index GALLERY_DIR --alias {alias}, or imagesearch alias create {alias} "
                         "COLLECTION")
    old = ranker.collection(current.collection)
    info = new.model_info()
    if old.fingerprint == info.fingerprint:
        say(f"alias {alias!r} -> {old.name!r} already holds the vectors of {_model(info)}: nothing to switch")
        if drop_old and current.previous:
            say(f"dropped the previous collection {current.previous!r} "
                f"({ranker.drop_collection(current.previous)} items)")
        return EXIT_OK
    shadow = shadow_name(alias, info.fingerprint)
    created = ranker.create_collection(shadow, info.dim, info.fingerprint, kind=old.kind)[1]
    say(f"{'created' if created else 'resuming in'} collection {shadow!r} for {_model(info)}; alias {alias!r} "
        f"stays on {old.name!r} until the checks pass")
    carried = {i.name: {k: v for k, v in i.attributes.items() if k not in FILE_KEYS}
               for i in ranker.list_items(old.name, timeout=ranker.timeout + old.count * 0.001)}
    for final in (False, True):
        if final:
            say("final pass: the files added, changed or removed while it ran")
        listing = list_images(gallery, what="gallery folder", follow_symlinks=follow_symlinks)
        r = index_folder(new, ranker, listing, collection=shadow, sync=True,
                         attributes=lambda name: dict(carried.get(name, {})), **job)
        index_summary(r)
        if r.service_error or r.runtime_failures:
            raise ClientError(f"not switched: indexing {shadow!r} failed ({r.service_error or 'see above'}); alias "
                              f"{alias!r} stays on {old.name!r}. Run the same command again: it resumes")

    problems, worse = [], ""
    expected = r.total_images - sum(f.is_input_error for f in r.failed.values())
    count = ranker.collection(shadow).count
    say(f"check: {count} items in {shadow!r} for {expected} indexable files: {'ok' if count == expected else 'NO'}")
    if count != expected:
        problems.append(f"{shadow!r} holds {count} items for {expected} indexable files")

    paths = dict(listing.images)
    names = sorted(set(paths) - set(r.failed) - set(r.vanished))
    files = [(n, paths[n]) for n in random.Random(seed).sample(names, min(sample, len(names)))]
    ranked = _rankings(new, ranker, shadow, files)
    missed = [n for n, _ in files if not _at_top(n, ranked.get(n, []))]
    say(f"check: {len(files) - len(missed)} of {len(files)} sampled images (seed {seed}) find themselves at rank 1 "
        f"in {shadow!r}" + (f"; not: {', '.join(printable(n) for n in missed[:10])}" if missed else ""))
    if missed:
        problems.append(f"{len(missed)} sampled images are not their own best match")

    with contextlib.ExitStack() as stack:
        before = _old_model([new, *others], old, stack)
        if before is None:
            say(f"check: top-{SAMPLE_K} overlap skipped: no embedder serves the model of {old.name!r} (fingerprint "
                f"{old.fingerprint[:12]}); serve it beside the new one (--model NAME=SPEC) to compare")
        elif files:
            was = _rankings(before, ranker, old.name, files)
            shares = [len({m.name for m in ranked.get(n, [])} & {m.name for m in was.get(n, [])})
                      / max(len(ranked.get(n, [])), len(was.get(n, [])), 1) for n, _ in files]
            say(f"check: top-{SAMPLE_K} overlap of old and new on the sample: mean {statistics.fmean(shares):.2f}, "
                f"lowest {min(shares):.2f}")
        if queries is not None:
            new_map = _map(new, ranker, shadow, queries, truth, job)
            if before is None:
                say(f"check: mAP@{SAMPLE_K} new {new_map:.4f}; the old model's is unknown (not served)")
                worse = "the old model's mAP@10 could not be measured (serve it beside the new one)"
            else:
                old_map = _map(before, ranker, old.name, queries, truth, job)
                say(f"check: mAP@{SAMPLE_K} on {queries.root} ({len(truth)} queries): old {old_map:.4f}, "
                    f"new {new_map:.4f} ({new_map - old_map:+.4f})")
                if new_map < old_map:
                    worse = f"the new model scores lower (mAP@{SAMPLE_K} {new_map:.4f} < {old_map:.4f})"

    if problems:
        raise ClientError(f"not switched: {'; '.join(problems)}. Alias {alias!r} stays on {old.name!r}; run the "
                          "same command again once the cause is fixed (it resumes)")
    if worse and not force:
        raise UsageError(f"not switched: {worse}. Alias {alias!r} stays on {old.name!r}; --force switches anyway")
    try:
        ranker.switch_alias(alias, shadow, expected=current.collection)
    except ClientError as exc:
        if exc.code == grpc.StatusCode.ABORTED:
            raise ClientError(f"not switched: alias {alias!r} was moved off {current.collection!r} while reindex "
                              f"ran ({exc})") from None
        raise
    say(f"switched alias {alias!r}: {old.name!r} -> {shadow!r}. Roll back with: imagesearch alias rollback {alias}")
    if drop_old:
        say(f"dropped the old collection {old.name!r} ({ranker.drop_collection(old.name)} items)")
    else:
        say(f"the old collection {old.name!r} is kept for a rollback; the same command with --drop-old drops it")
    return EXIT_OK


def rollback(ranker: RankerClient, alias: str) -> AliasInfo:
    """Switch `alias` back to its previous collection, by compare-and-swap on its current one."""
    current = find_alias(ranker, alias)
    if current is None:
        raise UsageError(f"no alias {alias!r} on the ranker at {ranker.address} (imagesearch alias list)")
    if not current.previous:
        raise UsageError(f"alias {alias!r} has no previous collection to roll back to")
    return ranker.switch_alias(alias, current.previous, expected=current.collection)


def alias_command(ranker: RankerClient, args) -> int:
    """`imagesearch alias list|create|switch|drop|rollback`."""
    if args.action == "list":
        aliases = ranker.list_aliases()
        rows = [("ALIAS", "COLLECTION", "PREVIOUS")] + [(a.name, a.collection, a.previous or "-") for a in aliases]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        for row in rows if aliases else ():
            print(printable(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}"))
        if not aliases:
            say(f"no aliases on the ranker at {ranker.address}")
    elif args.action == "create":
        a = ranker.create_alias(args.alias, args.collection)
        say(f"alias {a.name!r} -> {a.collection!r}")
    elif args.action == "switch":
        a = ranker.switch_alias(args.alias, args.collection)
        say(f"alias {a.name!r} -> {a.collection!r} (was {a.previous!r}); back with: imagesearch alias rollback "
            f"{a.name}")
    elif args.action == "drop":
        ranker.drop_alias(args.alias)
        say(f"dropped alias {args.alias!r} (its collections are kept)")
    else:
        a = rollback(ranker, args.alias)
        say(f"rolled back alias {a.name!r}: {a.previous!r} -> {a.collection!r} (imagesearch alias rollback "
            f"{a.name} switches forward again)")
    return EXIT_OK
