"""The Executor as a lender: admitting a peer's task against the offer and the exec rules,
reporting to the peer under its own task id, and handing lent work back when the node drains.

A probe plays the transport: what a lent task produces, and every refusal, reaches it as
``ForPeer`` to the peer that asked. Lent tasks run in real job processes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pykka
import pytest

from tests.actors.conftest import (
    DEADLINE,
    Wiring,
    new_identity,
    node_info,
    worker_processes,
)
from tests.conftest import wait_for
from vesta import exits
from vesta.actors.executor import Executor
from vesta.actors.peerlink import lent_task_id
from vesta.messages import (
    CancelTask,
    Charge,
    CpuJob,
    Drain,
    ExecJob,
    ForPeer,
    LedgerSnapshot,
    LendTask,
    LentFlows,
    Message,
    RunTask,
    TaskDone,
    TaskOutput,
    TaskPaused,
    Woke,
)

pytestmark = pytest.mark.timeout(30)

#: A cpu task this long is still running when the test is done with it (each unit takes ~0.2 s).
LONG_CPU = CpuJob(1000)
PEER = new_identity().fingerprint


def start_lender(wiring: Wiring, cores: list[int] | None = None, ratio: float = 5.0,
                 goodwill: float = 120.0, **offer: Any) -> pykka.ActorRef[Any]:
    """An Executor that knows its node: named "n1", offering what ``offer`` says."""
    ref = Executor.start(wiring.counters, wiring.links, cores, ratio, goodwill)
    wiring.links.executor = ref
    ref.tell(node_info("n1", "f" * 32, **offer))
    return ref


def lend(ref: pykka.ActorRef[Any], task_id: str, job: Any, job_id: str = "their-job",
         workers: int = 1, peer: str = PEER) -> None:
    end = 5000 if isinstance(job, CpuJob) else 1
    ref.tell(LendTask(peer, "borrower", RunTask(task_id, job_id, job, 0, end, workers=workers)))


def to_peer(wiring: Wiring, kind: type[Message], task_id: str, peer: str = PEER) -> Any:
    """The next ``kind`` for ``task_id`` sent to ``peer`` through the transport."""
    sent = wiring.transport.expect(
        ForPeer, lambda m: m.fingerprint == peer and isinstance(m.msg, kind)
        and m.msg.task_id == task_id)
    return sent.msg


def test_an_exec_is_refused_when_allow_exec_is_false(wiring: Wiring, job_id: str) -> None:
    ref = start_lender(wiring, allow_exec=False)

    lend(ref, "t1", ExecJob(["true"]), job_id)

    done = to_peer(wiring, TaskDone, "t1")
    assert done.refused and not done.ok and done.exit_code == exits.NOT_RUN
    assert done.error.startswith("n1 refused 'true': ")
    assert "allow_exec is false" in done.error
    assert wiring.counters.get("refused_jobs") == 1
    assert not worker_processes()


def test_an_exec_not_in_the_allowlist_is_refused_naming_the_list(
    wiring: Wiring, job_id: str
) -> None:
    ref = start_lender(wiring, allow_exec=True, exec_allowlist=["echo", "hostname"])

    lend(ref, "t1", ExecJob(["/bin/true"]), job_id)

    done = to_peer(wiring, TaskDone, "t1")
    assert done.refused
    assert done.error == ("n1 refused '/bin/true': '/bin/true' is not in exec_allowlist "
                          "(echo, hostname)")
    assert wiring.counters.get("refused_jobs") == 1


def test_an_allowed_exec_runs_and_reports_to_the_peer_under_its_own_task_id(
    wiring: Wiring, job_id: str
) -> None:
    ref = start_lender(wiring, allow_exec=True, exec_allowlist=["echo"])

    lend(ref, "t1", ExecJob(["echo", "hi"]), job_id)

    assert to_peer(wiring, TaskOutput, "t1") == TaskOutput("t1", "stdout", b"hi\n")
    done = to_peer(wiring, TaskDone, "t1")
    assert done.ok and done.exit_code == 0 and not done.refused and not done.cancelled
    wiring.autopilot.expect_none(object, lambda m: not isinstance(m, LentFlows), after=[ref])
    lent_id = lent_task_id(PEER, "t1")
    assert not [m for m in wiring.transport.all(ForPeer)
                if getattr(m.msg, "task_id", "") == lent_id]
    assert wiring.counters.get("refused_jobs") == 0


def test_two_peers_may_lend_tasks_of_the_same_id(wiring: Wiring, job_id: str) -> None:
    ref = start_lender(wiring, allow_exec=True, offer_workers=2)
    other = new_identity().fingerprint

    lend(ref, "t1", ExecJob(["echo", "first"]), job_id)
    lend(ref, "t1", ExecJob(["echo", "second"]), job_id, peer=other)

    assert to_peer(wiring, TaskOutput, "t1").data == b"first\n"
    assert to_peer(wiring, TaskOutput, "t1", peer=other).data == b"second\n"
    assert to_peer(wiring, TaskDone, "t1").ok
    assert to_peer(wiring, TaskDone, "t1", peer=other).ok


def test_a_lent_exec_runs_on_the_last_cpus_the_node_offers(wiring: Wiring, job_id: str) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two CPUs")
    ref = start_lender(wiring, cores=cores, allow_exec=True, offer_workers=1)
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"

    lend(ref, "t1", ExecJob([sys.executable, "-c", probe]), job_id)

    assert to_peer(wiring, TaskOutput, "t1").data == f"{cores[-1:]}\n".encode()
    assert to_peer(wiring, TaskDone, "t1").ok


def test_lent_workers_beyond_the_offer_are_refused_until_one_is_free(
    wiring: Wiring, job_id: str
) -> None:
    ref = start_lender(wiring, allow_exec=True, offer_workers=2)
    lend(ref, "c1", LONG_CPU, workers=4)  # asks for 4: gets the 2 offered
    wait_for(lambda: len(worker_processes()) == 2, what="the two offered workers")

    lend(ref, "c2", CpuJob(1), workers=1)
    lend(ref, "e1", ExecJob(["true"]), job_id)

    for task_id in ("c2", "e1"):
        done = to_peer(wiring, TaskDone, task_id)
        assert done.refused
        assert "every worker it offers is busy (2 of 2)" in done.error
    assert wiring.counters.get("refused_jobs") == 2

    ref.tell(CancelTask(lent_task_id(PEER, "c1")))  # the peer cancels, through its link
    assert to_peer(wiring, TaskDone, "c1").cancelled
    lend(ref, "e2", ExecJob(["true"]), job_id)

    done = to_peer(wiring, TaskDone, "e2")
    assert done.ok and not done.refused


def test_drain_cancels_lent_tasks_and_lets_the_nodes_own_finish(
    wiring: Wiring, job_id: str
) -> None:
    ref = start_lender(wiring, allow_exec=True, offer_workers=1)
    lend(ref, "lent", LONG_CPU)
    ref.tell(RunTask("own", "our-job", CpuJob(1), 0, 2))
    wait_for(lambda: len(worker_processes()) == 2, what="both tasks' workers")

    ref.tell(Drain())

    done = to_peer(wiring, TaskDone, "lent")
    assert done.cancelled and not done.ok
    own = wiring.autopilot.expect(TaskDone, lambda m: m.task_id == "own", timeout=DEADLINE)
    assert own.ok and not own.cancelled
    lend(ref, "late", ExecJob(["true"]), job_id)
    late = to_peer(wiring, TaskDone, "late")
    assert late.refused and late.error == "n1 refused 'true': it is stopping"


def balance(lent: float, borrowed: float) -> LedgerSnapshot:
    return LedgerSnapshot({PEER: {"name": "borrower", "lent": lent, "borrowed": borrowed,
                                  "lent_mib_s": 0.0, "borrowed_mib_s": 0.0}})


def test_a_peer_over_its_cap_is_refused_naming_the_rule_until_it_lends(
    wiring: Wiring, job_id: str,
) -> None:
    ref = start_lender(wiring, ratio=2.0, goodwill=10.0, allow_exec=True)
    ref.tell(balance(lent=25.0, borrowed=0.0))  # cap 2 x (10 + 0) = 20

    lend(ref, "t1", ExecJob(["true"]), job_id)

    done = to_peer(wiring, TaskDone, "t1")
    assert done.refused and not done.ok
    assert done.error == (
        "n1 refused 'true': borrower has used 25 core-seconds of this node, over its cap of 20 "
        "(max_borrow_ratio 2 x (goodwill_core_s 10 + the 0 core-seconds it ran for this "
        "node)); it gets room by lending")
    assert wiring.counters.get("refused_jobs") == 1

    ref.tell(balance(lent=25.0, borrowed=5.0))  # it lent: cap 2 x (10 + 5) = 30
    lend(ref, "t2", ExecJob(["true"]), job_id)
    assert to_peer(wiring, TaskDone, "t2").ok


def test_a_lent_task_is_charged_to_its_peer_with_the_cpu_its_processes_used(
    wiring: Wiring, job_id: str,
) -> None:
    ref = start_lender(wiring, allow_exec=True)
    burn = "import time\nt = time.process_time() + 0.3\nwhile time.process_time() < t: pass"

    lend(ref, "t1", ExecJob([sys.executable, "-c", burn]), job_id)

    done = to_peer(wiring, TaskDone, "t1")
    assert done.ok, done.error
    charge = wiring.ledger.expect(Charge)
    assert charge == Charge(PEER, "borrower", True, done.cpu_s, 0.0)
    assert 0.3 <= done.cpu_s < 0.3 + 2.0  # the command's CPU, its interpreter's start included


def test_what_is_lent_is_told_to_the_autopilot_as_flows_while_it_runs(
    wiring: Wiring, job_id: str,
) -> None:
    ref = start_lender(wiring)
    lend(ref, "t1", CpuJob(1), job_id)

    started = wiring.autopilot.expect(LentFlows, lambda m: bool(m.flows)).flows
    assert [{k: f[k] for k in ("job_id", "from", "to", "units", "paused")} for f in started] == [
        {"job_id": job_id, "from": "borrower", "to": "n1", "units": 5000, "paused": False}]
    going = wiring.autopilot.expect(LentFlows, lambda m: bool(m.flows)
                                    and m.flows[0]["units_done"] > 0).flows
    assert going[0]["rate"] > 0
    ref.tell(CancelTask(lent_task_id(PEER, "t1")))
    assert wiring.autopilot.expect(LentFlows, lambda m: not m.flows).flows == []


def test_lent_work_pauses_for_the_owner_and_the_peer_is_told(
    wiring: Wiring, job_id: str,
) -> None:
    ref = start_lender(wiring, allow_exec=True, offer_workers=2)
    lend(ref, "t1", ExecJob(["sh", "-c", "echo go; sleep 30"]), job_id)
    assert to_peer(wiring, TaskOutput, "t1").data == b"go\n"

    why = "its owner's load is 95%, at or over the 80% spill line"
    ref.tell(node_info("n1", "f" * 32, allow_exec=True, offer_workers=0, paused=why))
    assert to_peer(wiring, TaskPaused, "t1") == TaskPaused("t1", why)
    lend(ref, "t2", ExecJob(["true"]), job_id)
    refused = to_peer(wiring, TaskDone, "t2")
    assert refused.refused
    assert refused.error == f"n1 refused 'true': it is paused for its owner: {why}"

    ref.tell(node_info("n1", "f" * 32, allow_exec=True, offer_workers=2))
    assert to_peer(wiring, TaskPaused, "t1") == TaskPaused("t1", "")
    ref.tell(CancelTask(lent_task_id(PEER, "t1")))
    assert to_peer(wiring, TaskDone, "t1").cancelled


def test_after_a_suspend_lent_work_is_ended_its_submitters_have_placed_it_elsewhere(
    wiring: Wiring, job_id: str,
) -> None:
    ref = start_lender(wiring, allow_exec=True)
    lend(ref, "t1", ExecJob(["sh", "-c", "echo go; sleep 30"]), job_id)
    assert to_peer(wiring, TaskOutput, "t1").data == b"go\n"

    ref.tell(Woke(3600.0))

    assert to_peer(wiring, TaskDone, "t1").cancelled
