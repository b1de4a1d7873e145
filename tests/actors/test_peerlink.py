"""The PeerLink actor: the Executor's protocol to one peer, both ways, and what a dead link ends.

The link only ever calls ``loop.send``, so a :class:`Wire` stands in for the IoLoop and keeps
every frame it is given, decoded as the peer would. What the peer sends arrives as
:class:`LinkMessage`, as the Transport routes it. Probes play the autopilot (results of the tasks
sent there), the executor (the tasks lent here) and discovery (what the peer says of itself).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from tests.actors.conftest import DEADLINE, Wiring, new_identity, node_info
from vesta import exits
from vesta.actors.peerlink import PeerLink, lent_task_id
from vesta.messages import (
    CancelTask,
    CpuJob,
    ExecJob,
    ForPeer,
    Leases,
    LendTask,
    LinkDown,
    LinkMessage,
    LinkUp,
    Message,
    PeerHello,
    PeerLeaving,
    PeerSeen,
    Ping,
    RunTask,
    Scope,
    TaskCredit,
    TaskDone,
    TaskOutput,
    TaskUnits,
    decode,
)

pytestmark = pytest.mark.timeout(30)

CONN = 7
HOST = "198.51.100.20"


class Wire:
    """Stands in for the IoLoop: keeps every frame the link queues, decoded in the peer scope."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames: list[tuple[int, Message]] = []

    def send(self, conn_id: int, payload: bytes, close_after: bool = False,
             plain: bool = False, written: Callable[[], object] | None = None) -> bool:
        assert not plain and not close_after
        with self._lock:
            self._frames.append((conn_id, decode(payload, Scope.PEER)))
        return True

    def frames(self) -> list[tuple[int, Message]]:
        with self._lock:
            return list(self._frames)


@dataclass
class Link:
    """A running PeerLink to the peer ``fingerprint``, its wire and the probes around it."""

    ref: pykka.ActorRef[Any]
    wire: Wire
    wiring: Wiring
    fingerprint: str

    def from_peer(self, msg: Message) -> None:
        self.ref.tell(LinkMessage(CONN, self.fingerprint, msg))

    def to_peer(self, msg: Message) -> None:
        self.ref.tell(ForPeer(self.fingerprint, msg))

    def sent(self, leases: bool = False) -> list[Message]:
        """What went out on the wire so far (once the link handled everything told before);
        the list of leases each link starts with only if ``leases``."""
        assert self.ref.ask(Ping(), timeout=DEADLINE) is True
        frames = self.wire.frames()
        assert all(conn == CONN for conn, _ in frames), frames
        return [msg for _, msg in frames if leases or not isinstance(msg, Leases)]

    def lend(self, task_id: str) -> RunTask:
        """The peer asks for a task; the executor probe receives it."""
        run = RunTask(task_id, "their-job", ExecJob(["true"]), 0, 1)
        self.from_peer(run)
        lend = self.wiring.executor.expect(LendTask, lambda m: m.run.task_id == task_id)
        assert lend.run == run
        return run


def run(task_id: str) -> RunTask:
    return RunTask(task_id, "our-job", CpuJob(1), 0, 10, workers=2)


@pytest.fixture
def link(wiring: Wiring) -> Link:
    fingerprint = new_identity().fingerprint
    wire = Wire()
    ref = PeerLink.start(wiring.counters, wiring.links, wire, fingerprint, new_identity())
    ref.tell(LinkUp(CONN, fingerprint, 1, True, HOST))
    return Link(ref, wire, wiring, fingerprint)


# -- tasks sent to the peer ------------------------------------------------------------------------


def test_a_task_sent_goes_out_and_its_results_come_back_to_the_autopilot(link: Link) -> None:
    link.to_peer(run("t1"))
    assert link.sent() == [run("t1")]

    units = TaskUnits("t1", {0: b"\x01" * 32})
    output = TaskOutput("t1", "stdout", b"hi\n")
    done = TaskDone("t1", True, 0.5)
    for msg in (units, output, done):
        link.from_peer(msg)

    autopilot = link.wiring.autopilot
    assert autopilot.expect(TaskUnits) == units
    assert autopilot.expect(TaskOutput) == output
    assert autopilot.expect(TaskDone) == done

    link.from_peer(TaskUnits("t1", {1: b"\x02" * 32}))  # after its end: the task is gone
    autopilot.expect_none(TaskUnits, after=[link.ref])


def test_results_of_tasks_never_sent_there_are_dropped(link: Link) -> None:
    link.to_peer(run("t1"))
    for msg in (TaskUnits("t9", {0: b"x"}), TaskOutput("t9", "stdout", b"x"),
                TaskDone("t9", True, 0.1)):
        link.from_peer(msg)

    link.wiring.autopilot.expect_none(object, after=[link.ref])


def test_cancel_and_credit_go_out_only_for_tasks_sent_there(link: Link) -> None:
    link.to_peer(run("t1"))
    link.to_peer(CancelTask("t9"))
    link.to_peer(TaskCredit("t9", 1000))
    link.to_peer(TaskCredit("t1", 1000))
    link.to_peer(CancelTask("t1"))

    assert link.sent() == [run("t1"), TaskCredit("t1", 1000), CancelTask("t1")]


def test_a_link_down_fails_every_sent_task_and_cancels_every_lent_one(link: Link) -> None:
    for task_id in ("t1", "t2", "t3"):
        link.to_peer(run(task_id))
    link.from_peer(TaskDone("t3", True, 0.2))  # ended on its own: not failed again
    for task_id in ("p1", "p2", "p3"):
        link.lend(task_id)
    link.to_peer(TaskDone("p3", True, 0.1))  # its result left: nothing to cancel

    link.ref.tell(LinkDown(CONN, link.fingerprint, "the other side closed the connection"))

    autopilot, executor = link.wiring.autopilot, link.wiring.executor
    for task_id in ("t1", "t2"):
        done = autopilot.expect(TaskDone, lambda m, t=task_id: m.task_id == t and m.lost)
        assert not done.ok and done.exit_code == exits.NOT_RUN
        assert "went down (the other side closed the connection)" in done.error
    for task_id in ("p1", "p2"):
        executor.expect(CancelTask, lambda m, t=task_id: m.task_id == lent_task_id(
            link.fingerprint, t))
    autopilot.expect_none(TaskDone, lambda m: m.lost and m.task_id == "t3", after=[link.ref])
    executor.expect_none(CancelTask, lambda m: m.task_id.endswith("/p3"), after=[link.ref])
    assert lent_task_id(link.fingerprint, "p1") == f"{link.fingerprint}/p1"


def test_a_task_that_reaches_a_link_after_it_went_down_is_lost_not_sent(link: Link) -> None:
    """An actor may send to a PeerLink just before the Transport takes it off the map: the
    lingering link reports the task lost, so its units are placed again."""
    link.ref.tell(LinkDown(CONN, link.fingerprint, "the other side closed the connection"))
    link.to_peer(run("late"))
    link.to_peer(TaskCredit("late", 100))

    done = link.wiring.autopilot.expect(TaskDone, lambda m: m.task_id == "late")
    assert done.lost and not done.ok and "went down" in done.error
    assert link.sent() == []


def test_a_leaving_peer_fails_the_sent_tasks_at_once_and_tells_discovery(link: Link) -> None:
    link.to_peer(run("t1"))

    link.from_peer(PeerLeaving("the node is stopping"))

    done = link.wiring.autopilot.expect(TaskDone)
    assert done.task_id == "t1" and done.lost and not done.ok
    assert "left (the node is stopping)" in done.error
    seen = link.wiring.discovery.expect(PeerSeen)
    assert seen == PeerSeen(link.fingerprint, HOST, leaving="the node is stopping")
    link.from_peer(TaskDone("t1", True, 0.3))  # too late: its work is placed elsewhere already
    link.wiring.autopilot.expect_none(TaskDone, lambda m: not m.lost, after=[link.ref])


# -- tasks the peer lends here ---------------------------------------------------------------------


def test_a_task_received_goes_to_the_executor_as_a_lend_named_after_the_peer(link: Link) -> None:
    first = link.lend("p1")
    assert link.wiring.executor.all(LendTask)[0] == LendTask(
        link.fingerprint, link.fingerprint[:8], first)

    hello = PeerHello(node_info("lender-b", link.fingerprint), 7777, 7778)
    link.from_peer(hello)
    assert link.wiring.discovery.expect(PeerSeen) == PeerSeen(link.fingerprint, HOST, hello)
    second = link.lend("p2")

    assert link.wiring.executor.all(LendTask)[1] == LendTask(link.fingerprint, "lender-b", second)


def test_a_repeated_task_id_is_dropped_and_counted(link: Link) -> None:
    link.lend("p1")

    link.from_peer(RunTask("p1", "their-job", ExecJob(["false"]), 0, 1))

    link.wiring.executor.expect_none(LendTask, lambda m: m.run.task_id == "p1",
                                     after=[link.ref])
    assert link.wiring.counters.get("dropped_frames") == 1


def test_cancel_and_credit_from_the_peer_reach_the_executor_only_for_lent_tasks(
    link: Link,
) -> None:
    link.lend("p1")
    link.to_peer(run("t1"))  # ours, running there: the peer cannot cancel it here

    for task_id in ("p1", "t1", "nope"):
        link.from_peer(TaskCredit(task_id, 4096))
        link.from_peer(CancelTask(task_id))

    executor = link.wiring.executor
    lent = lent_task_id(link.fingerprint, "p1")
    assert executor.expect(TaskCredit) == TaskCredit(lent, 4096)
    assert executor.expect(CancelTask) == CancelTask(lent)
    executor.expect_none(TaskCredit, after=[link.ref])
    executor.expect_none(CancelTask, after=[link.ref])


def test_a_message_with_no_place_on_a_link_is_dropped_and_counted(link: Link) -> None:
    link.from_peer(node_info("stray", link.fingerprint))

    link.wiring.discovery.expect_none(object, after=[link.ref])
    assert link.wiring.counters.get("dropped_frames") == 1


def test_a_link_starts_with_the_leases_still_held_and_the_peer_ends_the_rest(
    link: Link,
) -> None:
    assert link.sent(leases=True) == [Leases([])]
    link.to_peer(run("t1"))
    link.to_peer(run("t2"))
    link.ref.tell(LinkUp(CONN, link.fingerprint, 1, True, HOST))  # the link came back up
    assert link.sent(leases=True)[-1] == Leases(["t1", "t2"])

    for task_id in ("p1", "p2", "p3"):  # tasks this node runs for the peer
        link.lend(task_id)
    link.from_peer(Leases(["p2", "gone"]))  # the peer placed p1 and p3 elsewhere meanwhile

    executor = link.wiring.executor
    ended = {executor.expect(CancelTask).task_id for _ in range(2)}
    assert ended == {lent_task_id(link.fingerprint, "p1"), lent_task_id(link.fingerprint, "p3")}
    executor.expect_none(CancelTask, after=[link.ref])
    assert link.wiring.counters.get("stale_leases_ended") == 2
    link.from_peer(CancelTask("p2"))  # p2 is still lent
    assert executor.expect(CancelTask) == CancelTask(lent_task_id(link.fingerprint, "p2"))
