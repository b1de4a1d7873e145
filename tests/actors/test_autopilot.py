"""The Autopilot actor: accepting, queueing, placing, retrying, cancelling, refusing and status.

The test plays the executor: it reads the RunTask and CancelTask the autopilot sends to the
executor probe and answers with TaskUnits and TaskDone. The control probe receives what the
autopilot tells clients; every such message is also checked to survive the wire codec, since
Control encodes it for the socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pykka
import pytest

from tests.actors.conftest import Wiring, unit
from tests.conftest import wait_for
from vesta import PROTOCOL_VERSION
from vesta.actors.autopilot import MAX_ATTEMPTS, Autopilot
from vesta.config import build_config
from vesta.messages import (
    AnyJob,
    CancelRequest,
    CancelTask,
    ClientGone,
    ClientRequest,
    CountRunning,
    CpuJob,
    Drain,
    ExecJob,
    JobAccepted,
    JobDone,
    JobStarted,
    MemJob,
    Message,
    RunTask,
    Scope,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    TaskDone,
    TaskUnits,
    ToClient,
    decode,
    encode,
)
from vesta.sampler import Sampler
from vesta.sysstat import Sysstat
from vesta.workers.jobs import job_digest

pytestmark = pytest.mark.timeout(30)

M = TypeVar("M", bound=Message)

MEM_TOTAL_MB = 4096
MEM_AVAILABLE_MB = 2048
FAKE = b"\xab" * 32  # a unit result where its value does not matter


def write_meminfo(root: Path, available_mb: int) -> None:
    (root / "proc/meminfo").write_text(
        f"MemTotal: {MEM_TOTAL_MB * 1024} kB\nMemFree: 1024 kB\n"
        f"MemAvailable: {available_mb * 1024} kB\n"
    )


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A machine with two CPUs, 4 GiB of memory (2 GiB available), no battery and no GPU."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/stat").write_text(
        "cpu  200 0 100 1000 0 0 0 0 0 0\n"
        "cpu0 100 0 50 500 0 0 0 0 0 0\n"
        "cpu1 100 0 50 500 0 0 0 0 0 0\n"
    )
    write_meminfo(root, MEM_AVAILABLE_MB)
    return root


@dataclass
class Pilot:
    """A running Autopilot, and the probes that stand for the executor and the control actor."""

    ref: pykka.ActorRef[Any]
    wiring: Wiring

    def submit(self, client: int, job: AnyJob) -> JobAccepted:
        self.ref.tell(ClientRequest(client, SubmitRequest(job)))
        return self.to_client(client, JobAccepted)

    def to_client(
        self, client: int, kind: type[M], where: Callable[[M], bool] | None = None
    ) -> M:
        """The next ``kind`` told to ``client``; it must also survive the wire codec."""
        told = self.wiring.control.expect(
            ToClient,
            lambda m: m.client == client and isinstance(m.msg, kind)
            and (where is None or where(m.msg)),
        )
        assert decode(encode(told.msg), Scope.CLIENT) == told.msg
        return told.msg

    def run_task(self, job_id: str) -> RunTask:
        return self.wiring.executor.expect(RunTask, lambda m: m.job_id == job_id)

    def finish_task(
        self, run: RunTask, units: dict[int, bytes] | None = None, ok: bool = True,
        **done: Any,
    ) -> None:
        """Answer as the executor: units (by default fake ones for the whole range), then done."""
        if units is None:
            units = dict.fromkeys(range(run.start, run.end), FAKE) if ok else {}
        if units:
            self.ref.tell(TaskUnits(run.task_id, units))
        self.ref.tell(TaskDone(run.task_id, ok, 0.5, **done))

    def done(self, client: int, job_id: str | None = None) -> JobDone:
        return self.to_client(
            client, JobDone, None if job_id is None else (lambda m: m.job_id == job_id)
        )

    def status(self, client: int = 99) -> dict[str, Any]:
        self.ref.tell(ClientRequest(client, StatusRequest()))
        return self.to_client(client, StatusReply).doc


@pytest.fixture
def pilot(wiring: Wiring, fake_root: Path) -> Iterator[Pilot]:
    config = build_config({"key": "node1-test-key-0123", "name": "node1",
                           "advertise_spare_ms": 100})
    sampler = Sampler(Sysstat(fake_root, cpus={0, 1}), config, "fp-node1", "127.0.0.1", 0.1)
    ref = Autopilot.start(wiring.counters, wiring.links, config, sampler.sample(), 2)
    wiring.links.autopilot = ref
    sampler.targets = [ref.tell]
    sampler.start()
    yield Pilot(ref, wiring)
    sampler.stop()


def real_units(start: int, end: int) -> dict[int, bytes]:
    return {i: unit(0, i) for i in range(start, end)}


# -- running ---------------------------------------------------------------------------------------


def test_a_cpu_job_runs_on_every_free_slot_and_gives_the_digest(pilot: Pilot) -> None:
    accepted = pilot.submit(1, CpuJob(1))

    assert accepted.job_id.startswith("node1-")
    assert (accepted.queued, accepted.position) == (False, 0)
    run = pilot.run_task(accepted.job_id)
    assert (run.start, run.end, run.workers, run.lend) == (0, 10, 2, False)
    assert run.job == CpuJob(1)
    started = pilot.to_client(1, JobStarted)
    assert started == JobStarted(accepted.job_id, "node1", 10)

    pilot.finish_task(run, real_units(0, 10))
    done = pilot.done(1)

    assert done.ok and done.exit_code == 0 and done.job_id == accepted.job_id
    assert done.result["digest"] == job_digest([unit(0, i) for i in range(10)])
    assert done.result["retried"] == 0
    assert [(p["node"], p["units"]) for p in done.result["placements"]] == [("node1", 10)]


def test_workers_are_the_free_slots_at_most(pilot: Pilot) -> None:
    first = pilot.submit(1, ExecJob(["true"]))
    assert pilot.run_task(first.job_id).workers == 1

    second = pilot.submit(2, CpuJob(1))

    assert not second.queued
    run = pilot.run_task(second.job_id)
    assert (run.start, run.end, run.workers) == (0, 10, 1)


def test_jobs_wait_for_a_free_slot_first_come_first_served(pilot: Pilot) -> None:
    busy = [pilot.submit(client, ExecJob(["sleep", "1"])) for client in (1, 2)]
    runs = [pilot.run_task(job.job_id) for job in busy]

    first = pilot.submit(3, CpuJob(1))
    second = pilot.submit(4, MemJob(1, 0))

    assert (first.queued, first.position) == (True, 1)
    assert (second.queued, second.position) == (True, 2)
    pilot.wiring.executor.expect_none(RunTask, after=[pilot.ref])

    pilot.finish_task(runs[0])
    assert pilot.done(1).ok
    run = pilot.run_task(first.job_id)
    assert run.workers == 1
    pilot.wiring.executor.expect_none(RunTask, lambda m: m.job_id == second.job_id,
                                       after=[pilot.ref])

    pilot.finish_task(runs[1])
    assert pilot.run_task(second.job_id).workers == 1


# -- failures --------------------------------------------------------------------------------------


def test_a_failed_task_reruns_exactly_its_missing_units(pilot: Pilot) -> None:
    accepted = pilot.submit(1, CpuJob(1))
    first = pilot.run_task(accepted.job_id)
    finished = {0, 1, 2, 5, 6}

    pilot.finish_task(first, {i: unit(0, i) for i in finished}, ok=False, exit_code=137,
                      error="the job process was killed by signal 9")
    rerun: list[int] = []
    while len(rerun) < 10 - len(finished):
        run = pilot.run_task(accepted.job_id)
        rerun += range(run.start, run.end)
        pilot.finish_task(run, real_units(run.start, run.end))
    done = pilot.done(1)

    assert sorted(rerun) == [3, 4, 7, 8, 9]  # each missing unit once, none that had finished
    assert done.ok and done.exit_code == 0
    assert done.result["retried"] == 5
    assert done.result["digest"] == job_digest([unit(0, i) for i in range(10)])
    assert sum(p["units"] for p in done.result["placements"]) == 10


def test_a_job_fails_after_three_failed_attempts(pilot: Pilot) -> None:
    accepted = pilot.submit(1, CpuJob(1))

    for _ in range(MAX_ATTEMPTS):
        pilot.finish_task(pilot.run_task(accepted.job_id), ok=False, exit_code=1,
                          error="cpu job failed: boom")
    done = pilot.done(1)

    assert MAX_ATTEMPTS == 3
    assert not done.ok and done.exit_code == 1
    assert "3 attempts" in done.error and "boom" in done.error
    assert len(pilot.wiring.executor.all(RunTask)) == 3
    pilot.wiring.executor.expect_none(RunTask, after=[pilot.ref])


# -- cancelling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["by job id", "by its connection", "client gone"])
def test_cancelling_a_running_job_cancels_its_task(pilot: Pilot, how: str) -> None:
    accepted = pilot.submit(1, ExecJob(["sleep", "60"]))
    run = pilot.run_task(accepted.job_id)

    if how == "by job id":
        pilot.ref.tell(ClientRequest(2, CancelRequest(accepted.job_id)))
    elif how == "by its connection":
        pilot.ref.tell(ClientRequest(1, CancelRequest()))
    else:
        pilot.ref.tell(ClientGone(1))
    cancel = pilot.wiring.executor.expect(CancelTask)

    assert cancel == CancelTask(run.task_id)
    pilot.ref.tell(TaskDone(run.task_id, False, 0.1, 137, "cancelled", cancelled=True))
    done = pilot.done(1)
    assert not done.ok and done.exit_code == 130 and done.job_id == accepted.job_id


def test_cancelling_a_queued_job_finishes_it_at_once(pilot: Pilot) -> None:
    running = pilot.submit(1, CpuJob(1))
    run = pilot.run_task(running.job_id)
    queued = pilot.submit(2, ExecJob(["true"]))
    gone = pilot.submit(3, MemJob(1, 0))
    assert queued.queued and gone.queued

    pilot.ref.tell(ClientRequest(1, CancelRequest(queued.job_id)))
    pilot.ref.tell(ClientGone(3))

    assert pilot.done(2).exit_code == 130
    assert pilot.done(3).exit_code == 130
    assert [j["job_id"] for j in pilot.status()["jobs"]] == [running.job_id]
    pilot.finish_task(run)
    assert pilot.done(1).ok
    pilot.wiring.executor.expect_none(RunTask, lambda m: m.job_id != running.job_id,
                                       after=[pilot.ref])
    pilot.wiring.executor.expect_none(CancelTask, after=[pilot.ref])


# -- refusing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job, exit_code",
    [
        (CpuJob(0), 2),
        (MemJob(MEM_AVAILABLE_MB + 1, 10), 1),
        (ExecJob([]), 2),
        (ExecJob(["nvidia-smi"], gpu=True), 125),
    ],
    ids=["cpu 0", "mem over memory", "exec no argv", "exec gpu without gpu"],
)
def test_invalid_jobs_are_refused(pilot: Pilot, job: AnyJob, exit_code: int) -> None:
    pilot.ref.tell(ClientRequest(1, SubmitRequest(job)))
    done = pilot.done(1)

    assert done.job_id == "" and not done.ok
    assert done.exit_code == exit_code
    assert done.error
    assert pilot.wiring.counters.get("refused_jobs") == 1
    pilot.wiring.executor.expect_none(RunTask, after=[pilot.ref])
    assert pilot.status()["jobs"] == []


# -- status, counting and draining -----------------------------------------------------------------


def test_status_describes_the_node_its_jobs_and_counters(pilot: Pilot, fake_root: Path) -> None:
    accepted = pilot.submit(1, CpuJob(2, seed=3))
    doc = pilot.status()

    assert set(doc) >= {"node", "peers", "ledger", "jobs", "counters"}
    node = doc["node"]
    assert set(node) >= {"name", "address", "fingerprint", "cpu_pct", "mem_available_mb", "power",
                         "last_seen_s", "willingness", "version"}
    assert (node["name"], node["address"], node["fingerprint"]) == ("node1", "127.0.0.1",
                                                                    "fp-node1")
    assert node["mem_available_mb"] == MEM_AVAILABLE_MB
    assert (node["power"], node["willingness"]) == ("grid", 1.0)
    assert node["version"] == PROTOCOL_VERSION
    assert isinstance(node["cpu_pct"], float)
    (job,) = doc["jobs"]
    assert (job["job_id"], job["kind"], job["state"], job["total"]) == (
        accepted.job_id, "cpu", "running", 20)
    assert {"refused_jobs", "actor_errors", "bad_control_requests"} <= set(doc["counters"])

    write_meminfo(fake_root, 1000)  # the sampling timer picks up the machine's new state
    wait_for(lambda: pilot.status()["node"]["mem_available_mb"] == 1000,
             what="a sample showing the new available memory")


def test_count_running_counts_the_running_tasks(pilot: Pilot) -> None:
    assert pilot.ref.ask(CountRunning(), timeout=5) == 0
    jobs = [pilot.submit(client, ExecJob(["true"])) for client in (1, 2)]
    runs = [pilot.run_task(job.job_id) for job in jobs]
    third = pilot.submit(3, ExecJob(["true"]))  # queued: not running

    assert pilot.ref.ask(CountRunning(), timeout=5) == 2
    pilot.finish_task(runs[0])
    last = pilot.run_task(third.job_id)
    assert pilot.ref.ask(CountRunning(), timeout=5) == 2  # the queued one took the slot
    pilot.finish_task(runs[1])
    assert pilot.ref.ask(CountRunning(), timeout=5) == 1
    pilot.finish_task(last)
    assert pilot.ref.ask(CountRunning(), timeout=5) == 0


def test_drain_finishes_queued_jobs_and_refuses_new_ones(pilot: Pilot) -> None:
    running = pilot.submit(1, CpuJob(1))
    run = pilot.run_task(running.job_id)
    queued = pilot.submit(2, MemJob(1, 0))
    assert queued.queued

    pilot.ref.tell(Drain())

    stopped = pilot.done(2)
    # a mem job that never ran failed (1); an exec job would be 125, "could not run it"
    assert stopped.job_id == queued.job_id and not stopped.ok and stopped.exit_code == 1
    pilot.ref.tell(ClientRequest(3, SubmitRequest(ExecJob(["true"]))))
    refused = pilot.done(3)
    assert refused.job_id == "" and refused.exit_code == 125
    assert pilot.wiring.counters.get("refused_jobs") == 1

    pilot.finish_task(run)  # what already runs may finish
    assert pilot.done(1).ok
    pilot.wiring.executor.expect_none(RunTask, lambda m: m.job_id != running.job_id,
                                       after=[pilot.ref])
