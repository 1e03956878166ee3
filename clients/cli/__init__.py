"""`imagesearch`: the command line for the image search services.

    imagesearch serve --db gallery.db            start the embedder and the ranker
    imagesearch index GALLERY_DIR                embed and store every image under a folder
    imagesearch query QUERY_DIR --out r.json     {query file: [top-10 gallery files]} (+ --html)
    imagesearch search IMAGE                     one image's ranked matches
    imagesearch embed IMAGE...                   vectors
    imagesearch evaluate r.json --ground-truth gt.json
    imagesearch run --gallery G --query Q --out r.json   all of it, services included
    imagesearch reindex GALLERY_DIR --alias A --model NEW   a new model behind an alias, without downtime
    imagesearch alias list|create|switch|drop|rollback
    imagesearch demo                             `run` on photos shipped with scikit-image/-learn
    imagesearch web --gallery GALLERY_DIR        search by picture in a browser (the [web] extra)

parser (flags), commands (one function per sub-command), jobs (index and
query over a folder), rollout (reindex and aliases), output (terminal
summaries), report (HTML), demo (its photos). Exit codes: 0 ok, 1 runtime failure (a service down or failing), 2
usage or input error. Only the client library and the contracts are imported
(no torch): it starts fast.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

from clients.errors import ClientError
from imagesearch import tracing


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    from clients.cli.parser import build_parser

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so services this command started are stopped.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    tracing.configure("imagesearch-cli")
    try:
        with tracing.span(f"imagesearch {args.command}"):
            return args.func(args)
    except ClientError as exc:
        from clients.cli.output import printable  # the message may quote a service's text

        print(f"error: {printable(exc, keep_newlines=True)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
