"""The PeerLink actor: one per linked peer, the Executor's protocol spoken across the network.

For the tasks this node sends the peer (it borrows), the link is another executor: ``RunTask`` and
``CancelTask`` go out, ``TaskUnits``, ``TaskOutput`` and ``TaskDone`` come back and go to the
Autopilot, and only for tasks that were sent to this very peer. When the link goes down, or the
peer says it is leaving, every such task ends with a failed ``TaskDone`` so the Autopilot places
its work elsewhere at once. For the tasks the peer sends here (this node lends), the link hands
them to the Executor, which admits or refuses them, and cancels them all if the link goes down:
nothing runs on for a peer that cannot hear the result. Each time a link comes up, it first tells
the peer which of its tasks it still waits for (``Leases``); the peer ends every other task it
runs for this node, which a partition that one side did not notice could have left behind. The
Transport actor starts and stops it.
"""

from __future__ import annotations

import logging
from typing import Any

from vesta import exits
from vesta.actors.base import VestaActor
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.identity import Identity
from vesta.messages import (
    CancelTask,
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
    RunTask,
    TaskCredit,
    TaskDone,
    TaskOutput,
    TaskPaused,
    TaskUnits,
    encode,
)
from vesta.transport.loop import IoLoop

logger = logging.getLogger(__name__)


def lent_task_id(fingerprint: str, task_id: str) -> str:
    """The id a task lent to ``fingerprint`` runs under here: submitters never collide."""
    return f"{fingerprint}/{task_id}"


class PeerLink(VestaActor):
    """One peer: what was sent to it, what it runs here, and the messages between."""

    def __init__(self, counters: Counters, links: Links, loop: IoLoop, fingerprint: str,
                 identity: Identity) -> None:
        super().__init__(counters)
        self.links = links
        self.loop = loop
        self.fingerprint = fingerprint
        self.peer_name = fingerprint[:8]
        self.host = ""
        self.conn_id = 0
        self.sent: dict[str, RunTask] = {}  # our tasks running there
        self.lent: set[str] = set()  # its tasks running here, by the id it gave them
        self.unsent: list[bytes] = []  # refused by a connection that went away meanwhile
        self.down = ""  # why the link went down: this PeerLink only lingers

    def handle(self, message: Message) -> Any:
        match message:
            case LinkUp(conn_id=conn_id, host=host):
                if self.conn_id and self.conn_id != conn_id:
                    self.loop.retire(self.conn_id)  # after all this link sent on it
                self.conn_id, self.host = conn_id, host
                unsent, self.unsent = self.unsent, []
                self.loop.send(conn_id, encode(Leases(sorted(self.sent))))
                for payload in unsent:
                    self.loop.send(conn_id, payload)
            case LinkMessage(msg=msg):
                self.received(msg)
            case ForPeer(msg=msg):
                self.send(msg)
            case LinkDown(reason=reason):
                self.down = f"the link to {self.peer_name} went down ({reason})"
                self.gone(self.down)
            case _:
                return super().handle(message)
        return None

    def send(self, msg: Message) -> None:
        if self.down:  # sent as the link went down: a task is lost, the rest has no reader
            if isinstance(msg, RunTask):
                self.links.autopilot.tell(TaskDone(msg.task_id, False, 0.0, exits.NOT_RUN,
                                                   self.down, lost=True))
            return
        match msg:
            case RunTask(task_id=task_id):
                self.sent[task_id] = msg
            case TaskDone(task_id=task_id):
                self.lent.discard(task_id)
            case CancelTask(task_id=task_id) | TaskCredit(task_id=task_id) if (
                    task_id not in self.sent):
                return
        payload = encode(msg)
        if not self.loop.send(self.conn_id, payload):
            self.unsent.append(payload)

    def received(self, msg: Message) -> None:
        match msg:
            case RunTask(task_id=task_id):
                if task_id in self.lent:
                    self.counters.add("dropped_frames")
                    return
                self.lent.add(task_id)
                self.links.executor.tell(LendTask(self.fingerprint, self.peer_name, msg))
            case CancelTask(task_id=task_id):
                if task_id in self.lent:
                    self.links.executor.tell(CancelTask(lent_task_id(self.fingerprint, task_id)))
            case TaskCredit(task_id=task_id, size=size):
                if task_id in self.lent:
                    self.links.executor.tell(
                        TaskCredit(lent_task_id(self.fingerprint, task_id), size))
            case TaskUnits(task_id=task_id) | TaskOutput(task_id=task_id) | TaskPaused(
                    task_id=task_id):
                if task_id in self.sent:
                    self.links.autopilot.tell(msg)
            case TaskDone(task_id=task_id):
                if self.sent.pop(task_id, None) is not None:
                    self.links.autopilot.tell(msg)
            case Leases(task_ids=held):
                stale = self.lent - set(held)
                for task_id in stale:  # placed elsewhere while the link was down
                    self.links.executor.tell(CancelTask(lent_task_id(self.fingerprint, task_id)))
                self.lent -= stale
                if stale:
                    self.counters.add("stale_leases_ended", len(stale))
                    logger.info("%s no longer waits for %d task(s) it lent here; ended them",
                                self.peer_name, len(stale))
            case PeerHello(node=node):
                self.peer_name = node.name
                self.links.discovery.tell(PeerSeen(self.fingerprint, self.host, msg))
            case PeerLeaving(reason=reason):
                self.links.discovery.tell(PeerSeen(self.fingerprint, self.host, leaving=reason))
                self.fail_sent(f"{self.peer_name} left ({reason})")
            case _:
                self.counters.add("dropped_frames")
                logger.warning("%s sent %s, which has no place on a link", self.peer_name, msg.tag)

    def gone(self, why: str) -> None:
        self.fail_sent(why)
        for task_id in self.lent:
            self.links.executor.tell(CancelTask(lent_task_id(self.fingerprint, task_id)))
        self.lent.clear()

    def fail_sent(self, why: str) -> None:
        """Every task that was running there ends, failed, so its work is placed again."""
        for task_id in list(self.sent):
            self.links.autopilot.tell(TaskDone(task_id, False, 0.0, exits.NOT_RUN, why,
                                               lost=True))
        self.sent.clear()
