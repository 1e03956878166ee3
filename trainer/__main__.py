"""`python -m trainer` / `imagesearch-train`: see trainer.train.
`python -m trainer fuse RUN_DIR [--fusion-weight W]`: (re)choose a run's fusion weight."""

from __future__ import annotations

import logging
import sys

from imagesearch import extras

# Before anything imports what the [train] extra brings: a base install gets one line, exit 2.
extras.exit_if_missing("train", prog="imagesearch-train")

from imagesearch import errors, logs
from trainer import distributed
from trainer.train import PROG, fuse, get_args_parser, get_fuse_parser
from trainer.train import main as train_main

EXIT_USAGE = 2  # as argparse: the command line or the data needs fixing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fusing = argv[:1] == ["fuse"]
    args = (get_fuse_parser().parse_args(argv[1:]) if fusing else get_args_parser().parse_args(argv))
    dist_info = distributed.from_env()
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        print(f"{PROG}: error: --log-level {args.log_level!r}: use DEBUG, INFO, WARNING or ERROR", file=sys.stderr)
        return EXIT_USAGE
    rank = f"[rank {dist_info.rank}] " if dist_info.enabled else ""
    logs.configure_logging(level if dist_info.is_main else max(level, logging.WARNING), args.log_format,
                           text_format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s", datefmt="%H:%M:%S",
                           static={"rank": dist_info.rank} if dist_info.enabled else None)
    try:
        (fuse if fusing else train_main)(args)
    except errors.ImageSearchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
