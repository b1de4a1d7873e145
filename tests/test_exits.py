"""Tests for vesta.exits: the one home of SPEC's exit statuses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil
import pytest

from tests.conftest import wait_for
from vesta import exits


@pytest.mark.parametrize(
    ("returncode", "status"),
    [(0, 0), (1, 1), (3, 3), (127, 127), (-9, 137), (-15, 143), (-2, 130)],
)
def test_from_returncode(returncode: int, status: int) -> None:
    assert exits.from_returncode(returncode) == status


@pytest.mark.parametrize(("kind", "status"), [("exec", 125), ("cpu", 1), ("mem", 1)])
def test_not_finished(kind: str, status: int) -> None:
    assert exits.not_finished(kind) == status


@pytest.mark.parametrize(
    ("code", "status"),
    [(124, 124), (126, 126), (127, 127), (137, 137), (130, 130), (1, 125), (0, 125), (125, 125),
     (128, 125), (2, 125)],
)
def test_exec_failure_keeps_only_the_statuses_with_a_meaning(code: int, status: int) -> None:
    assert exits.exec_failure(code) == status


def test_constants_follow_the_shell() -> None:
    assert (exits.CANCELLED, exits.BROKEN_PIPE) == (130, 141)
    assert exits.killed_by(signal.SIGKILL) == 137


def _group_alive(pgid: int) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def test_kill_group_kills_the_whole_group_and_tolerates_a_gone_one() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"], start_new_session=True)
    wait_for(lambda: len(_group_alive(proc.pid)) >= 2, what="the shell and its background sleep")
    exits.kill_group(proc.pid)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: not _group_alive(proc.pid), what="the whole group to be gone")
    exits.kill_group(proc.pid)  # a group that is gone: no error
