"""A service started by `clients.cli.services` dies with the process that started it.

The starting process passes its pid in IMAGESEARCH_PARENT_PID; the service,
first thing, asks Linux to send it SIGTERM when that parent dies
(PR_SET_PDEATHSIG), so a CLI killed with -9 leaves no orphaned services.

This is done in the child itself, not in a `preexec_fn` between fork and exec:
a preexec_fn makes CPython use a plain fork() instead of vfork(), so the fork
handlers of gRPC Core run in the child, restart its poller on an epoll fd that
close_fds then closes, and the child aborts before exec ("epoll_ctl failed:
Bad file descriptor", grpc/grpc#43055) whenever the parent holds gRPC channels.
"""

from __future__ import annotations

import os
import signal
import sys

from imagesearch.defaults import PARENT_PID_ENV

PR_SET_PDEATHSIG = 1


def follow_parent(environ=os.environ) -> bool:
    """Arrange SIGTERM on the parent's death when PARENT_PID_ENV names this
    process's parent; True when armed. If the parent is already gone (this
    process was re-parented before arming), SIGTERM now."""
    wanted = environ.pop(PARENT_PID_ENV, None)
    if not wanted or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return False
    if str(os.getppid()) != wanted.strip():
        os.kill(os.getpid(), signal.SIGTERM)
    return True
