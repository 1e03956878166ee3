"""Log set-up for every process (both servers and the trainer): `--log-level`
and `--log-format text|json`, each with an environment default.

`json` writes one object a line with the same keys on every line:
time (UTC, ISO 8601, milliseconds), level, logger, message, and the call's
method, code, peer and duration (seconds) on lines about one RPC, null
elsewhere. A line logged inside a traced span also has trace_id and span_id.
Code logs such fields with `extra=`:

    log.info("%s -> %s", method, code, extra={"method": method, "code": code, "peer": peer, "duration": 0.012})
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from typing import Mapping

from imagesearch.defaults import LOG_FORMAT_ENV, LOG_LEVEL_ENV

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Keys every JSON line carries, in this order (RPC fields are null off a call).
CALL_FIELDS = ("method", "code", "peer", "duration")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `static` keys (e.g. the trainer's rank) go on every line."""

    def __init__(self, static: Mapping[str, object] | None = None):
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CALL_FIELDS:
            line[key] = getattr(record, key, None)
        for key in ("trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                line[key] = value
        line.update(self.static)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=os.environ.get(LOG_LEVEL_ENV, "INFO"), choices=LEVELS,
                        help=f"(env {LOG_LEVEL_ENV}; default %(default)s)")
    parser.add_argument("--log-format", default=os.environ.get(LOG_FORMAT_ENV) or "text", choices=FORMATS,
                        help=f"text for people, json for log pipelines: one object a line with time, level, logger, "
                             f"message, method, code, peer, duration (env {LOG_FORMAT_ENV}; default %(default)s)")


def configure_logging(level: str | int, fmt: str = "text", *, text_format: str = TEXT_FORMAT,
                      datefmt: str | None = None, static: Mapping[str, object] | None = None) -> None:
    """The root logger's one handler (stderr) in the chosen format; call once, from main()."""
    if fmt not in FORMATS:
        raise SystemExit(f"error: --log-format {fmt!r}: use one of {', '.join(FORMATS)} (env {LOG_FORMAT_ENV})")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(static) if fmt == "json" else logging.Formatter(text_format, datefmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
