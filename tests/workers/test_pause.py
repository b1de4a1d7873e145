"""Pausing lent work for the owner: the supervisor stops a piece where it is (its command and what
that started included), lets it run again, counts the CPU lent work used, and moves an exec's
deadline by the time it was paused. Each test runs with the job space's cgroups (the freezer)
where this machine has them, and once more without (SIGSTOP and SIGCONT)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.workers.conftest import Reports, exec_params, job_processes
from vesta.workers.supervisor import JobSpace, Supervisor, held

pytestmark = pytest.mark.timeout(60)

#: Readings, POLL_S apart, over which a paused piece is watched for CPU it should not get.
STILL_READINGS = 8
POLL_S = 0.05


@pytest.fixture(params=["cgroup", "signals"])
def supervised(request: pytest.FixtureRequest, space: JobSpace,
               tmp_path: Path) -> Iterator[tuple[Supervisor, Reports]]:
    """A supervisor whose job processes are frozen through their cgroups, or stopped by
    signals where there are none (or this run leaves them out)."""
    if request.param == "cgroup" and space.cgroup is None:
        pytest.skip("no delegated cgroup v2 here: only signals can pause")
    used = space if request.param == "cgroup" else JobSpace(tmpdir=space.tmpdir)
    reports = Reports()
    sup = Supervisor(reports.inbox.put, space=used)
    sup.start()
    yield sup, reports
    sup.shutdown()
    wait_for(lambda: not job_processes(), timeout=5, what="every job process to end")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def burning(sup: Supervisor, reports: Reports, worker: str) -> int:
    """Start a lent command that burns CPU in a child of its own shell; the job process's pid."""
    script = "echo $PPID; sh -c 'while :; do :; done' & wait"
    sup.start_worker(worker, "exec", exec_params(script), True)
    return int(reports.lines(worker, 1)[0])


def stops_growing(read: Callable[[], float]) -> Callable[[], bool]:
    """A condition for wait_for: a CPU figure that ``read`` gives has not grown over its last
    STILL_READINGS readings."""
    readings: list[float] = []

    def check() -> bool:
        readings.append(read())
        return len(readings) > STILL_READINGS and (
            readings[-1] - readings[-1 - STILL_READINGS] < 0.01)

    return check


def still(pid: int) -> Callable[[], bool]:
    return stops_growing(lambda: tree_cpu(pid))


def test_a_paused_piece_uses_no_cpu_until_it_is_resumed(
    supervised: tuple[Supervisor, Reports],
) -> None:
    sup, reports = supervised
    pid = burning(sup, reports, "w1")
    wait_for(lambda: sup.lent_cpu_seconds() > 0.05, what="the lent command to use CPU")

    tree = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    assert not any(held(p) for p in tree)
    sup.pause("w1")
    wait_for(still(pid), timeout=5, interval=POLL_S, what="the paused command to stop using CPU")
    assert all(held(p) for p in tree)
    meter = sup.lent_cpu_seconds()
    assert sup.lending(), "a paused piece still counts as lent work"

    sup.resume("w1")
    wait_for(lambda: not any(held(p) for p in tree), what="the command to be let run")
    wait_for(lambda: sup.lent_cpu_seconds() > meter + 0.1, what="the command to run again")
    sup.kill("w1")
    assert reports.exit_of("w1").exit_code != 0


def test_a_paused_piece_can_be_cancelled_and_cleans_up(
    supervised: tuple[Supervisor, Reports],
) -> None:
    sup, reports = supervised
    pid = burning(sup, reports, "w1")
    tree = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    sup.pause("w1")
    wait_for(still(pid), timeout=5, interval=POLL_S, what="the piece to pause")

    sup.kill("w1")  # it gets SIGCONT before SIGTERM, so that its clean-up runs

    exited = reports.exit_of("w1")
    assert exited.exit_code != 0
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                             psutil.STATUS_ZOMBIE for p in tree), timeout=5,
             what="the command and its job process to end")


def test_an_exec_timeout_counts_running_time_only(
    supervised: tuple[Supervisor, Reports],
) -> None:
    sup, reports = supervised
    sup.start_worker("w1", "exec", {**exec_params("echo go; sleep 1; echo done"),
                                    "timeout": 2.0}, True)
    reports.lines("w1", 1)
    sup.pause("w1")
    time.sleep(2.5)  # paused longer than the whole timeout: the subject of the test
    sup.resume("w1")

    exited = reports.exit_of("w1")
    assert exited.exit_code == 0 and not exited.error, exited
    assert reports.lines("w1", 2) == ["go", "done"]


def test_the_lent_cpu_meter_never_goes_down_when_a_lent_process_ends(
    supervised: tuple[Supervisor, Reports],
) -> None:
    sup, reports = supervised
    burn = "t=$(($(date +%s) + 2)); while [ $(date +%s) -lt $t ]; do :; done"
    sup.start_worker("w1", "exec", exec_params(burn), True)
    readings: list[float] = []

    def ended() -> bool:
        readings.append(sup.lent_cpu_seconds())
        reports.poll()
        return "w1" in reports.exited

    wait_for(ended, timeout=15, interval=0.05, what="the command to end")
    sup.shutdown()  # its job process ends too
    readings.append(sup.lent_cpu_seconds())
    assert readings == sorted(readings), readings
    assert readings[-1] >= 0.5, readings  # at least the second it surely burned
    assert not sup.lending()


def test_local_work_is_neither_lent_nor_metered(supervised: tuple[Supervisor, Reports]) -> None:
    sup, reports = supervised
    sup.start_worker("w1", "exec", exec_params("echo hi"), False)
    reports.exit_of("w1")
    assert sup.lent_cpu_seconds() == 0.0 and not sup.lending()


def test_a_paused_cpu_piece_can_be_cancelled(supervised: tuple[Supervisor, Reports]) -> None:
    sup, reports = supervised
    sup.start_worker("w1", "cpu", {"seed": 0, "start": 0, "end": 10_000}, True)
    wait_for(lambda: sup.lent_cpu_seconds() > 0.05, what="the cpu piece to run")
    (piece,) = job_processes()
    sup.pause("w1")
    wait_for(lambda: held(piece), what="the piece to be paused")
    time.sleep(0.2)  # paused for a while before the cancel: the subject of the test
    sup.kill("w1")
    assert reports.exit_of("w1").exit_code != 0
