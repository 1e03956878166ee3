"""Installs by role: which extra each part of the product needs, and the one
check every entry point makes before its heavy imports.

The base install (`pip install imagesearch`) is the client library, the
`imagesearch` command and the contracts. A part that needs more names its
extra here; when a module of it is missing, `missing_extra_message` says
which extra to install, e.g.

    error: the embedder needs the [embedder] extra (torch is not installed): pip install 'imagesearch[embedder]'

`exit_if_missing` (the servers and the trainer) prints that line and exits 2,
the usage / set-up exit code of every imagesearch command; the CLI raises it
as a UsageError. Modules are looked up with `importlib.util.find_spec`, not
imported, so the check costs milliseconds and runs before torch loads.
Standard library only: it runs first.
"""

from __future__ import annotations

import importlib.util
import sys

PACKAGE = "imagesearch"
EXIT_USAGE = 2

# The modules a part imports as it starts. Lazy, option-only imports (onnxruntime,
# pytorch_metric_learning, the weight packages) keep their own messages where they
# are imported.
_SERVING = ("grpc_reflection", "prometheus_client")
_MODEL = ("torch", "torchvision", "timm", "PIL")
_EMBEDDER = _MODEL + _SERVING
_RANKER = ("sqlite_utils", "faiss") + _SERVING

# extra -> (what needs it, the modules that tell whether it is installed)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedder": ("the embedder", _EMBEDDER),
    "ranker": ("the ranker", _RANKER),
    "milvus": ("the ranker's Milvus backend", ("pymilvus",)),
    "train": ("the trainer", _MODEL + ("matplotlib",)),
    # both services and the photos that ship inside scikit-image and scikit-learn
    "demo": ("imagesearch demo", tuple(dict.fromkeys(_EMBEDDER + _RANKER + ("skimage", "sklearn")))),
    "tracing": ("tracing (OTEL_* settings)", ("opentelemetry.sdk", "opentelemetry.instrumentation.grpc")),
    "web": ("imagesearch web", ("starlette", "uvicorn", "python_multipart")),
}


def install_command(extra: str) -> str:
    return f"pip install '{PACKAGE}[{extra}]'"


def _absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a missing parent package; a module set to None in sys.modules
        return True


def missing_module(extra: str) -> str | None:
    """The first module of `extra` that is not installed, or None."""
    return next((m for m in EXTRAS[extra][1] if _absent(m)), None)


def missing_extra_message(extra: str, what: str | None = None) -> str | None:
    """One line naming the extra to install, or None when `extra` is installed."""
    module = missing_module(extra)
    if module is None:
        return None
    what = what or EXTRAS[extra][0]
    return (f"{what} needs the [{extra}] extra ({module.split('.')[0]} is not installed): "
            f"{install_command(extra)}")


def exit_if_missing(*extras: str, prog: str | None = None) -> None:
    """For an entry point, before its heavy imports: print which extra to
    install and exit 2 when one of `extras` is missing."""
    for extra in extras:
        message = missing_extra_message(extra)
        if message is not None:
            prefix = f"{prog}: " if prog else ""
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USAGE)
