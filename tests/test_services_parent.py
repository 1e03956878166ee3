"""Services started by clients.cli.services die with the process that started them
(the child arms PR_SET_PDEATHSIG itself: imagesearch/parent.py), and are started
without a preexec_fn, whose plain fork crashes children under gRPC (grpc/grpc#43055)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagesearch.parent import follow_parent

ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import sys, time
from clients.cli.services import ChildService
child = ChildService("ranker", "ranker_service", ["--db", sys.argv[1]])
child.wait_listening(120)
print(child.proc.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # exited, waiting for init to reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_service_dies_when_the_process_that_started_it_is_killed(tmp_path):
    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "1"}  # as a user's CLI runs: gRPC's default fork handling
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "g.db")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child), "the ranker outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


def test_follow_parent_does_nothing_without_the_variable():
    environ = {"OTHER": "1"}
    assert follow_parent(environ) is False and environ == {"OTHER": "1"}
