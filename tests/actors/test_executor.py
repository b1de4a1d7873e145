"""The Executor actor with real job processes: cpu, mem, exec, cancel, kill, stress and stop.

A probe plays the autopilot (it receives TaskUnits, TaskOutput and TaskDone) and the control actor
(it receives the stress replies). Processes are checked with psutil: the workers are the children
of the multiprocessing fork server, and every exec command carries its job id in its environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pykka
import pytest

from tests.actors.conftest import (
    DEADLINE,
    ProbeHandle,
    Wiring,
    marked_processes,
    unit,
    worker_processes,
)
from tests.conftest import wait_for
from vesta.actors.executor import Executor
from vesta.messages import (
    CancelTask,
    CpuJob,
    Drain,
    ExecJob,
    MemJob,
    RunTask,
    StartStress,
    StopStress,
    StressReply,
    TaskCredit,
    TaskDone,
    TaskOutput,
    TaskUnits,
    ToClient,
)
from vesta.workers.jobs import OUTPUT_WINDOW, job_digest

pytestmark = pytest.mark.timeout(30)

#: A cpu task this long is still running when the test is done with it (each unit takes ~0.2 s).
LONG_CPU = CpuJob(1000)


def start_executor(wiring: Wiring, **kwargs: Any) -> pykka.ActorRef[Any]:
    ref = Executor.start(wiring.counters, wiring.links, **kwargs)
    wiring.links.executor = ref
    return ref


def done_of(probe: ProbeHandle, task_id: str, timeout: float = DEADLINE) -> TaskDone:
    return probe.expect(TaskDone, lambda m: m.task_id == task_id, timeout)


def units_of(probe: ProbeHandle, task_id: str) -> list[int]:
    """Every unit index reported for the task, with repeats."""
    return [i for m in probe.all(TaskUnits) if m.task_id == task_id for i in m.units]


def output_of(probe: ProbeHandle, task_id: str, stream: str = "stdout") -> bytes:
    return b"".join(m.data for m in probe.all(TaskOutput)
                    if m.task_id == task_id and m.stream == stream)


def run_exec(
    wiring: Wiring, job_id: str, argv: list[str], timeout: float | None = None,
    lend: bool = False, task_id: str = "t1",
) -> TaskDone:
    """Run one exec task to its end on a fresh Executor."""
    ref = start_executor(wiring)
    ref.tell(RunTask(task_id, job_id, ExecJob(argv, timeout), 0, 1, lend))
    return done_of(wiring.autopilot, task_id)


@pytest.fixture
def workdirs() -> Iterator[list[str]]:
    """Working directories a test learned; removed afterwards, whatever the executor did."""
    found: list[str] = []
    yield found
    for path in found:
        shutil.rmtree(path, ignore_errors=True)


def first_line(probe: ProbeHandle, task_id: str) -> str:
    """The first line an exec task printed (the scripts below start with ``pwd``)."""
    chunk = probe.expect(TaskOutput, lambda m: m.task_id == task_id and m.stream == "stdout")
    return chunk.data.decode().splitlines()[0]


def our_sleeps() -> list[psutil.Process]:
    """``sleep 60`` processes in this test process's tree."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:2] == ["sleep", "60"] and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


# -- cpu and mem -----------------------------------------------------------------------------------


def test_cpu_task_over_two_workers_reports_every_unit_once(wiring: Wiring) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("t1", "j1", CpuJob(1, seed=0), 0, 6, workers=2))

    wait_for(lambda: len(worker_processes()) == 2, what="two worker processes at once")
    done = done_of(wiring.autopilot, "t1")

    assert done.ok and done.exit_code == 0 and done.error == "" and not done.cancelled
    reported = units_of(wiring.autopilot, "t1")
    assert sorted(reported) == list(range(6))  # each unit exactly once
    results: dict[int, bytes] = {}
    for message in wiring.autopilot.all(TaskUnits):
        results.update(message.units)
    assert job_digest([results[i] for i in range(6)]) == job_digest([unit(0, i) for i in range(6)])


def test_mem_task_succeeds(wiring: Wiring) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("m1", "j1", MemJob(64, 50), 0, 1))

    done = done_of(wiring.autopilot, "m1")

    assert done.ok and done.exit_code == 0 and done.error == ""
    assert done.seconds >= 0.05
    assert "touch_seconds" in done.detail


# -- exec ------------------------------------------------------------------------------------------


def test_exec_relays_output_and_returns_the_commands_status(wiring: Wiring, job_id: str) -> None:
    done = run_exec(wiring, job_id, ["sh", "-c", "echo out; echo err >&2; exit 3"])

    assert done.ok, "the command ran: its status is its result"
    assert done.exit_code == 3 and done.error == ""
    assert output_of(wiring.autopilot, "t1", "stdout") == b"out\n"
    assert output_of(wiring.autopilot, "t1", "stderr") == b"err\n"


def test_exec_runs_in_a_fresh_directory_removed_afterwards(wiring: Wiring, job_id: str) -> None:
    done = run_exec(wiring, job_id, ["sh", "-c", "pwd; ls -A | wc -l; readlink /proc/$$/fd/0"])

    assert done.ok and done.exit_code == 0
    workdir, entries, stdin = output_of(wiring.autopilot, "t1").decode().splitlines()
    assert Path(workdir).parent == Path(tempfile.gettempdir())
    assert Path(workdir).name.startswith("vesta-job-")
    assert Path(workdir) != Path.cwd()
    assert entries.strip() == "0"
    assert stdin == "/dev/null"
    assert not os.path.exists(workdir)


def test_exec_environment_holds_only_path_home_lang_the_job_id_and_the_node(
    wiring: Wiring, job_id: str
) -> None:
    done = run_exec(wiring, job_id, ["env"])

    assert done.ok and done.exit_code == 0
    lines = output_of(wiring.autopilot, "t1").decode().splitlines()
    env = dict(line.split("=", 1) for line in lines)
    assert set(env) == {"PATH", "HOME", "LANG", "VESTA_JOB_ID", "VESTA_NODE"}
    assert env["VESTA_JOB_ID"] == job_id
    assert "VESTA_NODE" in env  # the node it runs on (a daemon has its name from its start)
    assert env["PATH"] == os.environ.get("PATH", os.defpath)


def test_exec_timeout_gives_124_and_kills_the_command(wiring: Wiring, job_id: str) -> None:
    started = time.monotonic()
    done = run_exec(wiring, job_id, ["sleep", "60"], timeout=0.5)

    assert done.exit_code == 124
    assert not done.ok and "timed out" in done.error
    assert time.monotonic() - started < 10
    wait_for(lambda: not marked_processes(job_id), timeout=5, what="the command to be gone")


def test_exec_timeout_holds_for_a_command_that_closes_its_output(
    wiring: Wiring, job_id: str, workdirs: list[str]
) -> None:
    ref = start_executor(wiring)
    script = "pwd; exec >/dev/null 2>&1; sleep 30"
    ref.tell(RunTask("t1", job_id, ExecJob(["sh", "-c", script], 0.5), 0, 1))
    workdirs.append(first_line(wiring.autopilot, "t1"))

    done = done_of(wiring.autopilot, "t1", timeout=4)

    assert done.exit_code == 124


@pytest.mark.parametrize("argv0", ["no-such-command-vesta", "/nonexistent/vesta-cmd"])
def test_exec_missing_command_gives_127(wiring: Wiring, job_id: str, argv0: str) -> None:
    done = run_exec(wiring, job_id, [argv0, "arg"])

    assert done.exit_code == 127
    assert not done.ok and "not found" in done.error


def test_exec_non_executable_file_gives_126(
    wiring: Wiring, job_id: str, tmp_path: Path
) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o644)

    done = run_exec(wiring, job_id, [str(script)])

    assert done.exit_code == 126
    assert not done.ok and done.error
    assert output_of(wiring.autopilot, "t1") == b""


def test_exec_output_streams_whole_within_its_credit_window(
    wiring: Wiring, job_id: str
) -> None:
    """Far more than the window: what is out never passes it until credits come back, and every
    byte arrives; the command waits on its full pipe meanwhile instead of being cut."""
    ref = start_executor(wiring)
    size = 3 * OUTPUT_WINDOW + 12345
    ref.tell(RunTask("t1", job_id, ExecJob(["head", "-c", str(size), "/dev/zero"]), 0, 1))
    received = credited = 0
    while True:
        event = wiring.autopilot.expect(
            object, lambda m: isinstance(m, TaskOutput | TaskDone) and m.task_id == "t1")
        if isinstance(event, TaskDone):
            break
        assert isinstance(event, TaskOutput)
        received += len(event.data)
        assert received - credited <= OUTPUT_WINDOW + 65536, "output ran past its window"
        if received - credited >= OUTPUT_WINDOW // 2:
            ref.tell(TaskCredit("t1", received - credited))
            credited = received
    assert event.ok and event.exit_code == 0
    assert received == size


@pytest.mark.parametrize(
    "script, sleeps",
    [
        ("pwd; exec sleep 60", 1),
        ("pwd; sleep 60 & sleep 60", 2),  # a background grandchild in the command's group
    ],
)
def test_cancel_kills_an_exec_task_and_all_it_started(
    wiring: Wiring, job_id: str, workdirs: list[str], script: str, sleeps: int
) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("t1", job_id, ExecJob(["sh", "-c", script]), 0, 1))
    workdirs.append(first_line(wiring.autopilot, "t1"))
    wait_for(lambda: len([p for p in marked_processes(job_id) if p.name() == "sleep"]) == sleeps,
             what=f"{sleeps} sleep processes")

    started = time.monotonic()
    ref.tell(CancelTask("t1"))
    done = done_of(wiring.autopilot, "t1")

    assert time.monotonic() - started < 3, "cancel is prompt"
    assert done.cancelled and not done.ok
    wait_for(lambda: not marked_processes(job_id), timeout=5, what="every job process to end")
    assert not our_sleeps()
    wait_for(lambda: not worker_processes(), timeout=5, what="the worker to end")


def test_cancel_kills_a_grandchild_in_its_own_process_group(
    wiring: Wiring, job_id: str, workdirs: list[str]
) -> None:
    ref = start_executor(wiring)
    script = "pwd; setsid sleep 60 & sleep 60"
    ref.tell(RunTask("t1", job_id, ExecJob(["sh", "-c", script]), 0, 1))
    workdirs.append(first_line(wiring.autopilot, "t1"))
    wait_for(lambda: len([p for p in marked_processes(job_id) if p.name() == "sleep"]) == 2,
             what="two sleep processes")

    ref.tell(CancelTask("t1"))
    done = done_of(wiring.autopilot, "t1")

    assert done.cancelled and not done.ok
    wait_for(lambda: not marked_processes(job_id), timeout=3, what="every job process to end")


def test_cancel_removes_the_working_directory(
    wiring: Wiring, job_id: str, workdirs: list[str]
) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("t1", job_id, ExecJob(["sh", "-c", "pwd; exec sleep 60"]), 0, 1))
    workdir = first_line(wiring.autopilot, "t1")
    workdirs.append(workdir)
    assert os.path.isdir(workdir)

    ref.tell(CancelTask("t1"))
    assert done_of(wiring.autopilot, "t1").cancelled

    wait_for(lambda: not os.path.exists(workdir), timeout=2, what=f"{workdir} to be removed")


def test_a_worker_killed_from_outside_fails_its_task_only(wiring: Wiring) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("victim", "j1", LONG_CPU, 0, 5000, workers=1))
    (victim,) = wait_for(worker_processes, what="the victim's worker process")
    ref.tell(RunTask("other", "j2", CpuJob(1), 0, 2, workers=1))
    wait_for(lambda: len(worker_processes()) == 2, what="the other task's worker")

    victim.send_signal(signal.SIGKILL)
    done = done_of(wiring.autopilot, "victim")

    assert not done.ok and not done.cancelled
    assert "signal 9" in done.error
    assert done.exit_code == 128 + 9
    other = done_of(wiring.autopilot, "other")
    assert other.ok
    assert sorted(units_of(wiring.autopilot, "other")) == [0, 1]


# -- stress ----------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_stress_spins_a_core_until_stopped(wiring: Wiring) -> None:
    ref = start_executor(wiring)
    ref.tell(StartStress(5, 1, 30.0))

    reply = wiring.control.expect(ToClient)
    assert reply == ToClient(5, StressReply(1, 30.0))
    (spinner,) = wait_for(worker_processes, what="the stress process")
    first_core = sorted(os.sched_getaffinity(0))[0]
    wait_for(lambda: spinner.cpu_affinity() == [first_core], what="the stress process's pinning")
    wait_for(lambda: sum(spinner.cpu_times()[:2]) > 0.2, what="the stress process to burn CPU")

    ref.tell(StopStress(5))

    assert wiring.control.expect(ToClient) == ToClient(5, StressReply(0, 0.0, 1))
    _, alive = psutil.wait_procs([spinner], timeout=5)
    assert not alive, "the stress process ended"
    wait_for(lambda: not worker_processes(), timeout=5, what="every job process to end")


# -- stopping and lending --------------------------------------------------------------------------


def test_stopping_the_executor_kills_every_job_process(
    wiring: Wiring, job_id: str, workdirs: list[str]
) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("e", job_id, ExecJob(["sh", "-c", "pwd; sleep 60 & sleep 60"]), 0, 1))
    workdirs.append(first_line(wiring.autopilot, "e"))
    ref.tell(RunTask("c", "j2", LONG_CPU, 0, 5000, workers=1))
    ref.tell(StartStress(1, 1, 30.0))
    wait_for(lambda: len(worker_processes()) == 3 and len(marked_processes(job_id)) == 3,
             what="every job process to start")

    ref.stop(timeout=DEADLINE)

    wait_for(lambda: not worker_processes(), timeout=5, what="every worker to end")
    wait_for(lambda: not marked_processes(job_id), timeout=5, what="every exec process to end")
    assert not our_sleeps()


@pytest.mark.parametrize("lend", [True, False])
def test_lent_work_runs_at_the_lowest_priority(wiring: Wiring, job_id: str, lend: bool) -> None:
    probe = "import os; print(os.nice(0), os.sched_getscheduler(0))"
    done = run_exec(wiring, job_id, [sys.executable, "-c", probe], lend=lend)

    assert done.ok and done.exit_code == 0
    nice, policy = map(int, output_of(wiring.autopilot, "t1").split())
    if lend:
        assert nice == 19
        if hasattr(os, "SCHED_IDLE"):
            assert policy == os.SCHED_IDLE
    else:
        assert nice == os.nice(0)
        assert policy == os.sched_getscheduler(0)


def test_a_draining_executor_refuses_new_tasks(wiring: Wiring) -> None:
    ref = start_executor(wiring)
    ref.tell(Drain())
    ref.tell(RunTask("t1", "j1", CpuJob(1), 0, 2))

    done = done_of(wiring.autopilot, "t1")

    assert not done.ok and "stopping" in done.error
    assert not worker_processes()


# -- warm job processes ----------------------------------------------------------------------------


def worker_pid(probe: ProbeHandle, task_id: str) -> int:
    """The job process an exec task ran in: its command printed ``$PPID`` first."""
    return int(first_line(probe, task_id))


def test_tasks_run_one_after_another_in_a_warm_process_of_their_pool(
    wiring: Wiring, job_id: str
) -> None:
    ref = start_executor(wiring)
    pids = {}
    for task_id, lend in (("l1", False), ("p1", True), ("l2", False), ("p2", True)):
        ref.tell(RunTask(task_id, job_id, ExecJob(["sh", "-c", "echo $PPID"]), 0, 1, lend))
        assert done_of(wiring.autopilot, task_id).ok
        pids[task_id] = worker_pid(wiring.autopilot, task_id)

    assert pids["l1"] == pids["l2"], "local work reuses the local process"
    assert pids["p1"] == pids["p2"], "lent work reuses the lent process"
    assert pids["l1"] != pids["p1"], "and the two are never mixed"
    assert {p.pid for p in worker_processes()} == {pids["l1"], pids["p1"]}


def test_a_cancelled_tasks_process_is_not_reused(
    wiring: Wiring, job_id: str, workdirs: list[str]
) -> None:
    ref = start_executor(wiring)
    ref.tell(RunTask("t1", job_id, ExecJob(["sh", "-c", "echo $PPID"]), 0, 1))
    assert done_of(wiring.autopilot, "t1").ok
    warm = worker_pid(wiring.autopilot, "t1")
    ref.tell(RunTask("t2", job_id, ExecJob(["sh", "-c", "echo $PPID; pwd; exec sleep 60"]), 0, 1))

    def started() -> list[str]:
        lines = output_of(wiring.autopilot, "t2").decode().split()
        return lines if len(lines) >= 2 else []

    pid, workdir = wait_for(started, what="the long command to start")[:2]
    workdirs.append(workdir)
    assert int(pid) == warm

    ref.tell(CancelTask("t2"))
    assert done_of(wiring.autopilot, "t2").cancelled
    ref.tell(RunTask("t3", job_id, ExecJob(["sh", "-c", "echo $PPID"]), 0, 1))
    assert done_of(wiring.autopilot, "t3").ok

    assert worker_pid(wiring.autopilot, "t3") != warm
    wait_for(lambda: warm not in {p.pid for p in worker_processes()}, timeout=5,
             what="the cancelled task's process to end")
