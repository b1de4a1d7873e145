"""What the supervisor tests share: a job space of their own, supervisors shut down after each
test (which checks that every job process ended), and the reports a supervisor makes."""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import wait_for
from vesta.messages import Message, WorkerExited, WorkerOutput, WorkerUnits
from vesta.workers import supervisor
from vesta.workers.supervisor import JobSpace, Supervisor

DEADLINE = 15.0


@dataclass
class Reports:
    """What a supervisor reported, by worker id."""

    inbox: queue.Queue[Message] = field(default_factory=queue.Queue)
    exited: dict[str, WorkerExited] = field(default_factory=dict)
    output: dict[str, bytes] = field(default_factory=dict)
    units: dict[str, list[int]] = field(default_factory=dict)

    def take(self, timeout: float) -> None:
        message = self.inbox.get(timeout=timeout)
        match message:
            case WorkerExited(worker=worker):
                self.exited[worker] = message
            case WorkerOutput(worker=worker, data=data):
                self.output[worker] = self.output.get(worker, b"") + data
            case WorkerUnits(worker=worker, units=units):
                self.units.setdefault(worker, []).extend(units)

    def poll(self) -> None:
        """Take every report that has arrived, without waiting."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.take(0)

    def until(self, done: Callable[[], Any], what: str) -> Any:
        deadline = time.monotonic() + DEADLINE
        while not (result := done()):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {what} within {DEADLINE} s")
            with contextlib.suppress(queue.Empty):
                self.take(left)
        return result

    def exit_of(self, worker: str) -> WorkerExited:
        exited = self.until(lambda: self.exited.get(worker), f"end of {worker}")
        assert isinstance(exited, WorkerExited)
        return exited

    def lines(self, worker: str, count: int) -> list[str]:
        """The first ``count`` lines the command of ``worker`` printed."""
        self.until(lambda: self.output.get(worker, b"").count(b"\n") >= count,
                   f"{count} lines from {worker}")
        return self.output[worker].decode().splitlines()[:count]


@pytest.fixture
def space(tmp_path: Path) -> Iterator[JobSpace]:
    """A job space of the test's own: working directories in ``tmp_path``, and cgroups where
    this process may create them. multiprocessing's own files stay where they are."""
    cgroup = supervisor.delegated_cgroup(f"vesta-test-{secrets.token_hex(3)}")
    made = JobSpace(tmpdir=str(tmp_path / "space"), cgroup=cgroup)
    os.mkdir(str(made.tmpdir))
    yield made
    made.close()


@pytest.fixture
def start(space: JobSpace) -> Iterator[Callable[..., tuple[Supervisor, Reports]]]:
    """Start supervisors; each is shut down after the test, which checks its processes ended."""
    started: list[Supervisor] = []

    def make(idle_seconds: float = 60.0) -> tuple[Supervisor, Reports]:
        reports = Reports()
        sup = Supervisor(reports.inbox.put, space=space, idle_seconds=idle_seconds)
        sup.start()
        started.append(sup)
        return sup, reports

    yield make
    for sup in started:
        sup.shutdown()
        assert not sup.is_alive()
    wait_for(lambda: not job_processes(), timeout=5, what="every job process to end")


def job_processes() -> set[int]:
    """The live children of the fork server: every job process there is."""
    pid = forkserver._forkserver._forkserver_pid
    found: set[int] = set()
    if pid is None:
        return found
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    found.add(child.pid)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cgroup_of(pid: int) -> str:
    """The cgroup (v2) of a process, as /proc shows it."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line for line in lines if line.startswith("0::"))


def exec_params(script: str) -> dict[str, Any]:
    return {"argv": ["sh", "-c", script], "timeout": None, "job_id": f"test-{secrets.token_hex(4)}",
            "programs": "", "cpus": None}
