"""Warm job processes: the supervisor keeps a process that ran a task for the next task of its
pool, retires it once idle, and never reuses one that was killed; each exec command still gets
its own working directory, and runs in its job process's cgroup.

The tests drive a real :class:`Supervisor` with real job processes. An exec command finds its
worker as ``$PPID``; a cpu worker is found among the fork server's children.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
from collections.abc import Callable
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Daemon, wait_for
from tests.workers.conftest import (
    DEADLINE,
    Reports,
    cgroup_of,
    exec_params,
    gone,
    job_processes,
)
from vesta.messages import Message, WorkerOutput
from vesta.workers import jobs, supervisor
from vesta.workers.supervisor import JobSpace, Supervisor

pytestmark = pytest.mark.timeout(60)



def run_exec(sup: Supervisor, reports: Reports, worker: str, script: str, lend: bool = False,
             **extra: Any) -> list[str]:
    """Run a command to its end; its output lines."""
    sup.start_worker(worker, "exec", {**exec_params(script), **extra}, lend)
    exited = reports.exit_of(worker)
    assert exited.exit_code == 0 and not exited.error, exited
    return reports.output.get(worker, b"").decode().splitlines()


#: The worker's pid, the command's working directory and its cgroup (v2).
WHERE = "echo $PPID; pwd; grep ^0:: /proc/self/cgroup"


# -- reuse -----------------------------------------------------------------------------------------


def test_an_exec_worker_runs_the_next_command_in_a_fresh_directory_and_its_own_cgroup(
    start: Callable[..., tuple[Supervisor, Reports]], space: JobSpace
) -> None:
    sup, reports = start()
    first = run_exec(sup, reports, "w1", WHERE)
    second = run_exec(sup, reports, "w2", WHERE)

    assert first[0] == second[0], "the second command ran in the same job process"
    assert not gone(int(first[0])), "which waits for the next task"
    assert first[1] != second[1], "in a working directory of its own"
    for lines in (first, second):
        workdir = Path(lines[1])
        assert workdir.parent == Path(str(space.tmpdir)) and workdir.name.startswith("vesta-job-")
        assert not workdir.exists(), "removed before the command's end was reported"
    if space.cgroup is not None:  # the job process's own cgroup, where its commands start
        assert first[2] == second[2] == cgroup_of(int(first[0])), (first, second)
        cgroup = Path(space.cgroup) / first[2].rsplit("/", 1)[1]
        assert cgroup.is_dir() and first[2] != cgroup_of(os.getpid())
        sup.shutdown()
        assert not cgroup.exists(), "removed once its process ended"


def test_the_fork_servers_cpu_is_counted_as_the_daemons_own(
    start: Callable[..., tuple[Supervisor, Reports]],
) -> None:
    """The fork server's start and each fork cost CPU outside the daemon's own process: the
    sampler counts it as the daemon's, not as its owner's load."""
    sup, reports = start()
    run_exec(sup, reports, "w1", "true")
    before = supervisor.servers_cpu_seconds()
    assert before > 0
    for i in range(20):  # each in a new job process: forked by the server
        sup.start_worker(f"s{i}", "stress", {"seconds": 0.01}, False)
        reports.exit_of(f"s{i}")
    assert supervisor.servers_cpu_seconds() >= before


def test_a_program_the_kernel_cannot_execute_is_not_executable(
    start: Callable[..., tuple[Supervisor, Reports]], tmp_path: Path
) -> None:
    """Neither a script nor a binary: it fails as it always did (setpriv's exec would have run
    it with /bin/sh)."""
    program = tmp_path / "plain-text"
    program.write_text("echo should not run\n")
    program.chmod(0o755)
    sup, reports = start()
    sup.start_worker("w1", "exec", {**exec_params(""), "argv": [str(program)]}, False)

    exited = reports.exit_of("w1")

    assert exited.exit_code == 126 and "not executable" in exited.error, exited
    assert not reports.output.get("w1")


def test_output_credit_in_many_small_pieces_never_stalls_a_command(
        space: JobSpace) -> None:
    """Output acknowledged in many small credits (a command that writes a byte at a time gets
    one per write) while the command writes as fast as it can: the supervisor sums them and
    never waits on a job process that waits on it."""
    reports = Reports()
    sup: Supervisor

    def report(message: Message) -> None:
        if isinstance(message, WorkerOutput):
            for _ in range(len(message.data) // 16):
                sup.credit(message.worker, 16)
            sup.credit(message.worker, len(message.data) % 16)
        reports.inbox.put(message)

    sup = Supervisor(report, space=space)
    sup.start()
    try:
        size = 1 << 21
        sup.start_worker("w1", "exec", {**exec_params(f"head -c {size} /dev/zero"),
                                        "window": 1 << 16}, False)
        assert reports.exit_of("w1").exit_code == 0
        assert len(reports.output["w1"]) == size
    finally:
        sup.shutdown()
    assert not sup.is_alive()


def test_a_mem_worker_is_reused(start: Callable[..., tuple[Supervisor, Reports]]) -> None:
    sup, reports = start()
    sup.start_worker("m1", "mem", {"mb": 1, "ms": 0}, False)
    assert not reports.exit_of("m1").error
    (worker,) = job_processes()
    sup.start_worker("m2", "mem", {"mb": 1, "ms": 0}, False)
    assert not reports.exit_of("m2").error
    assert job_processes() == {worker}


def test_cpu_workers_share_a_new_counter_for_each_task(
    start: Callable[..., tuple[Supervisor, Reports]]
) -> None:
    """The counter a running process is given with its task: every unit once, in each task."""
    sup, reports = start()
    for worker in ("a1", "a2"):
        sup.start_worker(worker, "cpu", {"seed": 1, "start": 0, "end": 4, "share": "t1"}, False)
    for worker in ("a1", "a2"):
        assert not reports.exit_of(worker).error
    first = job_processes()
    assert len(first) == 2
    for worker in ("b1", "b2"):
        sup.start_worker(worker, "cpu", {"seed": 1, "start": 10, "end": 14, "share": "t2"}, False)
    for worker in ("b1", "b2"):
        assert not reports.exit_of(worker).error

    assert job_processes() == first, "the second task ran in the same two processes"
    taken = reports.units
    assert sorted(taken.get("a1", []) + taken.get("a2", [])) == [0, 1, 2, 3]
    assert sorted(taken.get("b1", []) + taken.get("b2", [])) == [10, 11, 12, 13]


def hold_the_lock(conn: Connection) -> None:
    """Take a unit counter's lock and keep it until killed."""
    counter = jobs.UnitCounter(reduction.recv_handle(conn))
    fcntl.lockf(counter.fd, fcntl.LOCK_EX)
    conn.send("locked")
    signal.pause()  # until the test kills it


def test_a_worker_killed_holding_the_counter_does_not_stop_its_siblings() -> None:
    counter = jobs.UnitCounter.create(0)
    ctx = supervisor.job_context()
    ours, theirs = ctx.Pipe(duplex=True)
    holder = ctx.Process(target=hold_the_lock, args=(theirs,), daemon=True)
    holder.start()
    theirs.close()
    try:
        reduction.send_handle(ours, counter.fd, holder.pid)
        assert ours.poll(DEADLINE) and ours.recv() == "locked"

        holder.kill()
        holder.join(5)

        assert counter.take(10) == 0  # at once: the kernel dropped the dead holder's lock
    finally:
        holder.kill()
        ours.close()
        counter.close()


# -- two pools -------------------------------------------------------------------------------------


def test_local_and_lent_work_never_share_a_process(
    start: Callable[..., tuple[Supervisor, Reports]]
) -> None:
    sup, reports = start()
    probe = "echo $PPID; nice; grep Cpus_allowed_list /proc/self/status"
    allowed = sorted(os.sched_getaffinity(0))
    last = allowed[-1:]

    local = run_exec(sup, reports, "l1", probe)
    lent = run_exec(sup, reports, "p1", probe, lend=True, cpus=last)
    local_again = run_exec(sup, reports, "l2", probe)
    lent_again = run_exec(sup, reports, "p2", probe, lend=True)

    assert local[0] != lent[0]
    assert local_again[0] == local[0] and lent_again[0] == lent[0]
    assert local[1] == local_again[1] == str(os.nice(0))
    assert lent[1] == lent_again[1] == "19"
    assert lent[2].split()[-1] == str(last[0]), "a lent command runs on the CPUs it was given"
    if len(allowed) > 1:  # and the next one on all of them again
        assert lent_again[2].split()[-1] == f"{allowed[0]}-{allowed[-1]}"


# -- retirement and the processes not reused -------------------------------------------------------


def test_an_idle_worker_retires(start: Callable[..., tuple[Supervisor, Reports]]) -> None:
    sup, reports = start(idle_seconds=0.3)
    (pid, *_) = run_exec(sup, reports, "w1", "echo $PPID")

    wait_for(lambda: gone(int(pid)), timeout=5, what="the idle worker to retire")
    assert not job_processes(), "a supervisor with nothing to do keeps no job process"
    (again, *_) = run_exec(sup, reports, "w2", "echo $PPID")
    assert again != pid


def test_a_cancelled_exec_worker_is_not_reused(
    start: Callable[..., tuple[Supervisor, Reports]]
) -> None:
    sup, reports = start()
    (pid, *_) = run_exec(sup, reports, "w1", "echo $PPID")
    sup.start_worker("w2", "exec", exec_params("echo $PPID; exec sleep 60"), False)
    assert reports.lines("w2", 1) == [pid], "the long command runs in the warm process"

    sup.kill("w2")
    killed = reports.exit_of("w2")

    # it cleaned up after SIGTERM and exited, or its command's end came first
    assert killed.exit_code != 0
    wait_for(lambda: gone(int(pid)), timeout=5, what="the cancelled worker to end")
    (again, *_) = run_exec(sup, reports, "w3", "echo $PPID")
    assert again != pid


def test_a_killed_cpu_worker_is_not_reused(
    start: Callable[..., tuple[Supervisor, Reports]]
) -> None:
    sup, reports = start()
    sup.start_worker("c1", "cpu", {"seed": 0, "start": 0, "end": 1}, False)
    assert not reports.exit_of("c1").error
    (warm,) = job_processes()
    sup.start_worker("c2", "cpu", {"seed": 0, "start": 0, "end": 5000}, False)
    reports.until(lambda: reports.units.get("c2"), "a unit of the long task")

    sup.kill("c2")
    killed = reports.exit_of("c2")

    assert "signal 9" in killed.error
    wait_for(lambda: gone(warm), timeout=5, what="the killed worker to end")
    sup.start_worker("c3", "cpu", {"seed": 0, "start": 0, "end": 1}, False)
    assert not reports.exit_of("c3").error
    assert warm not in job_processes()


def test_a_worker_that_failed_inside_is_not_reused(
    start: Callable[..., tuple[Supervisor, Reports]]
) -> None:
    sup, reports = start()
    sup.start_worker("c1", "cpu", {"seed": 0, "start": 0, "end": 1}, False)
    assert not reports.exit_of("c1").error
    (warm,) = job_processes()

    sup.start_worker("c2", "cpu", {"start": 0, "end": 1}, False)  # no seed: the job code fails
    failed = reports.exit_of("c2")

    assert "cpu job failed" in failed.error
    wait_for(lambda: gone(warm), timeout=5, what="the failed worker to end")


def test_a_worker_that_died_while_idle_is_replaced(
    start: Callable[..., tuple[Supervisor, Reports]]
) -> None:
    sup, reports = start()
    (pid, *_) = run_exec(sup, reports, "w1", "echo $PPID")
    os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: gone(int(pid)), timeout=5, what="the idle worker to die")

    (again, *_) = run_exec(sup, reports, "w2", "echo $PPID")

    assert again != pid


# -- a command dies with its worker ----------------------------------------------------------------


def exec_alone(conn: Connection, launcher: list[str] | None, params: dict[str, Any]) -> None:
    """A job process with no supervisor behind it: it runs one exec task, started with
    ``launcher`` (None: the one :func:`jobs.command_launcher` finds)."""
    jobs.prepare_child(False, signal.SIGTERM)
    jobs._launcher = launcher
    jobs.run(conn, "exec", params, os.sched_getaffinity(0))


@pytest.mark.parametrize("launcher", [None, []], ids=["setpriv", "fork"])
def test_a_command_dies_with_its_worker(launcher: list[str] | None, tmp_path: Path) -> None:
    """The worker killed with SIGKILL and nobody to clean up: its command's death signal."""
    if launcher is None and not jobs.command_launcher():
        pytest.skip("no setpriv with --pdeathsig here: every command is started with a fork")
    ctx = supervisor.job_context()
    ours, theirs = ctx.Pipe(duplex=True)
    params = {**exec_params(""), "argv": ["sleep", "60"], "tmpdir": str(tmp_path)}
    worker = ctx.Process(target=exec_alone, args=(theirs, launcher, params), daemon=True)
    worker.start()
    theirs.close()
    command = 0
    try:
        assert ours.poll(DEADLINE)
        kind, command = ours.recv()
        assert kind == "pgid"
        assert psutil.Process(command).ppid() == worker.pid

        os.kill(worker.pid, signal.SIGKILL)

        wait_for(lambda: gone(command), timeout=5, what="the command to die with its worker")
    finally:
        worker.kill()
        worker.join(5)
        ours.close()
        if command:
            with contextlib.suppress(psutil.Error):
                psutil.Process(command).kill()


# -- the daemon killed with warm workers idle ------------------------------------------------------


def test_kill9_of_a_daemon_leaves_no_idle_warm_worker(daemon: Daemon) -> None:
    try:
        assert daemon.cli("exec", "--", "true").returncode == 0
        assert daemon.cli("mem", "1", "0").returncode == 0
        tree = {p.pid: p for p in daemon.descendants()}
        server = [p for p in tree.values() if p.ppid() == daemon.proc.pid
                  and "multiprocessing.forkserver" in " ".join(p.cmdline())]
        assert server and server[0].children(), "a warm worker waits, idle"

        daemon.proc.kill()
        daemon.proc.wait(10)

        wait_for(lambda: all(gone(pid) for pid in tree), timeout=1.5, interval=0.005,
                 what="every process of the killed daemon to end")
    finally:
        remove_cgroups_of(daemon.name)


def remove_cgroups_of(name: str) -> None:
    """What a daemon killed after an exec job leaves for its next start: its (empty) cgroup."""
    own = supervisor.own_cgroup_dir(Path("/proc/self/cgroup").read_text(),
                                    Path("/proc/self/mountinfo").read_text())
    if own is not None:
        supervisor._remove_cgroups(os.path.join(own, f"vestad-{name}.{os.getuid()}"))
