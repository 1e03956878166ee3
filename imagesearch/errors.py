"""Domain errors shared by every part of the product.

Core code (model loading, image decoding, the gallery index) raises these and
knows nothing of gRPC. `imagesearch.serving` is the one place that maps them to
gRPC status codes; the CLI maps them to exit messages. Each class names the
status code it stands for, so adding an error never means touching a mapping.
"""

from __future__ import annotations


class ImageSearchError(Exception):
    """Base class. `status` is the name of a grpc.StatusCode member."""

    status = "INTERNAL"


class InvalidArgument(ImageSearchError, ValueError):
    """Bad input: undecodable image, wrong dimension, NaN vector, empty name..."""

    status = "INVALID_ARGUMENT"


class InvalidImage(InvalidArgument):
    """Bytes that are not a decodable image (empty, truncated, not an image)."""


class ResourceExhausted(ImageSearchError):
    """Input over an advertised limit (bytes, pixels, stream length)."""

    status = "RESOURCE_EXHAUSTED"


class NotFound(ImageSearchError, LookupError):
    """An unknown collection, or a model the embedder does not serve."""

    status = "NOT_FOUND"


class AlreadyExists(ImageSearchError):
    """Creating what exists already, differently (e.g. a collection of another kind)."""

    status = "ALREADY_EXISTS"


class FailedPrecondition(ImageSearchError):
    """The request is well formed but the system's state forbids it, e.g. a
    vector from another model than the collection's."""

    status = "FAILED_PRECONDITION"


class Aborted(ImageSearchError):
    """A conditional change lost a race: the state it expected has changed
    (e.g. an alias switch whose expected target moved). Read again, retry."""

    status = "ABORTED"


class WeightsUnavailable(FailedPrecondition):
    """Pretrained weights cannot be had here; the message names the ways out."""


class Unavailable(ImageSearchError):
    """The service is still loading or is shutting down: retry later."""

    status = "UNAVAILABLE"


class DeadlineExceeded(ImageSearchError):
    """The call's deadline passed while it waited for something the server was
    preparing (e.g. a collection's derived re-ranking data being rebuilt)."""

    status = "DEADLINE_EXCEEDED"


class Dropped(ImageSearchError):
    """The caller went away (cancelled, or its deadline passed) before its item
    reached the model; nobody is left to read this error."""

    status = "CANCELLED"


class StoreError(ImageSearchError):
    """The ranker's database cannot be opened or loaded; the message says why and what to do."""


class UnknownMigrations(ImageSearchError):
    """The database records migrations this version does not have."""


def shorten(text: str, limit: int = 80) -> str:
    """`text` for a message or a log line: at most about `limit` characters of a
    client's string, with control characters escaped and the length said when cut."""
    shown = text if len(text) <= limit else text[: max(1, limit - 20)]
    shown = shown.encode("unicode_escape", "backslashreplace").decode("ascii") if not shown.isprintable() else shown
    return shown if len(text) <= limit else f"{shown}...({len(text)} characters)"


# The most characters of an error message that go back to a client.
MAX_MESSAGE_CHARS = 1000


def message_of(exc: BaseException) -> str:
    """The message a client gets for `exc`, at most about MAX_MESSAGE_CHARS:
    a longer one (a client's huge name or id inside it) is cut in the middle,
    keeping what was wrong at its start and why at its end."""
    text = str(exc) or type(exc).__name__
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    head, tail = MAX_MESSAGE_CHARS * 2 // 3, MAX_MESSAGE_CHARS // 4
    return f"{text[:head]}...({len(text) - head - tail} characters cut)...{text[-tail:]}"
