"""The Transport actor with real sockets: two nodes on loopback, each with its own IoLoop.

Each node has its own identity and counters, and probes in the roles of its autopilot, discovery
and executor; the Transport itself is its transport. Heartbeats run at 0.1 s, so a link is
declared dead after 0.5 s of silence.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from tests.actors.conftest import DEADLINE, ProbeHandle, by_fingerprint, new_identity
from tests.conftest import wait_for
from vesta import exits
from vesta.actors.links import Links
from vesta.actors.transport import Transport, open_peer_listener
from vesta.counters import Counters
from vesta.identity import Identity
from vesta.messages import (
    CpuJob,
    Dial,
    Drain,
    ForPeer,
    LendTask,
    LinkRefused,
    PeerLinked,
    PeerSeen,
    Ping,
    RunTask,
    TaskDone,
    TaskOutput,
)
from vesta.transport.crypto import FederationKeys
from vesta.transport.link import LinkChannel
from vesta.transport.loop import IoLoop

pytestmark = pytest.mark.timeout(30)

KEYS = FederationKeys.from_stretched(b"x" * 32)
OTHER_KEYS = FederationKeys.from_stretched(b"z" * 32)
HEARTBEAT_S = 0.1
DEAD_AFTER_S = 4 * HEARTBEAT_S


@dataclass
class Node:
    """One node's transport, its loop, listener and the probes around it."""

    identity: Identity
    counters: Counters
    loop: IoLoop
    listener: socket.socket
    ref: pykka.ActorRef[Any]
    autopilot: ProbeHandle
    discovery: ProbeHandle
    executor: ProbeHandle

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def dial(self, other: Node) -> None:
        self.ref.tell(Dial(other.fingerprint, "127.0.0.1", other.port))

    def linked(self, other: Node, up: bool = True, timeout: float = DEADLINE) -> PeerLinked:
        return self.discovery.expect(
            PeerLinked, lambda m: m.fingerprint == other.fingerprint and m.up == up, timeout)

    def settle(self) -> None:
        assert self.ref.ask(Ping(), timeout=DEADLINE) is True

    def current_link(self, other: Node) -> int:
        """The connection id the transport routes ``other``'s messages by (0: none)."""
        peer = self.ref.proxy().peers.get(timeout=DEADLINE).get(other.fingerprint)
        return peer.conn_id if peer is not None else 0

    def conn_to(self, port: int) -> int:
        """The id of this node's outbound connection to ``port`` of loopback (-1: none)."""
        return next((c.conn_id for c in self.loop.connections()
                     if c.peer == ("127.0.0.1", port)), -1)

    def links_up(self) -> list[tuple[Any, Any]]:
        """(local, remote) address of every link this node's loop holds with its handshake done."""
        return [ends for ends, up in self.connections() if up]

    def connections(self) -> list[tuple[Any, bool]]:
        """Every peer connection of this node's loop, handshake done or not, as ((local address,
        remote address), whether it is up)."""
        found = []
        for conn in self.loop.connections():
            if isinstance(conn.channel, LinkChannel):
                try:
                    ends = (conn.sock.getsockname(), conn.sock.getpeername())
                except OSError:  # still connecting, or closed meanwhile
                    ends = (None, conn.peer)
                found.append((ends, conn.channel.up))
        return found


@pytest.fixture
def make_node() -> Iterator[Any]:
    """Start nodes: ``make_node(keys=..., identity=..., **transport_kwargs)``."""
    made: list[Node] = []

    def make(keys: FederationKeys = KEYS, identity: Identity | None = None,
             **kwargs: Any) -> Node:
        identity = identity or new_identity()
        counters = Counters()
        loop = IoLoop(name="vesta-io-test")
        loop.start()
        listener = open_peer_listener("127.0.0.1", 0)
        links = Links()
        probes = {role: ProbeHandle.start() for role in ("autopilot", "discovery", "executor")}
        for role, probe in probes.items():
            setattr(links, role, probe.ref)
        kwargs.setdefault("heartbeat_s", HEARTBEAT_S)
        ref = Transport.start(counters, links, loop, listener, keys, identity, **kwargs)
        links.transport = ref
        node = Node(identity, counters, loop, listener, ref, **probes)
        made.append(node)
        return node

    yield make
    for node in made:
        with contextlib.suppress(pykka.ActorDeadError):
            node.ref.stop(timeout=DEADLINE)
        node.loop.stop()
        node.listener.close()


def link_both(a: Node, b: Node) -> None:
    a.dial(b)
    a.linked(b)
    b.linked(a)


def task(task_id: str) -> RunTask:
    return RunTask(task_id, "j1", CpuJob(1), 0, 10)


def test_a_dial_brings_a_link_up_on_both_sides_that_carries_tasks_both_ways(
    make_node: Any,
) -> None:
    a, b = make_node(), make_node()

    a.dial(b)

    assert a.linked(b) == PeerLinked(b.fingerprint, True, 1)
    assert b.linked(a) == PeerLinked(a.fingerprint, True, 1)
    a.ref.tell(ForPeer(b.fingerprint, task("t1")))
    lend = b.executor.expect(LendTask)
    assert lend == LendTask(a.fingerprint, a.fingerprint[:8], task("t1"))
    b.ref.tell(ForPeer(a.fingerprint, TaskOutput("t1", "stdout", b"hi\n")))
    b.ref.tell(ForPeer(a.fingerprint, TaskDone("t1", True, 0.1)))
    assert a.autopilot.expect(TaskOutput) == TaskOutput("t1", "stdout", b"hi\n")
    assert a.autopilot.expect(TaskDone) == TaskDone("t1", True, 0.1)
    assert a.counters.get("failed_handshakes") == b.counters.get("failed_handshakes") == 0


def test_a_task_for_a_node_with_no_link_fails_at_once_as_lost(make_node: Any) -> None:
    a = make_node()

    a.ref.tell(ForPeer(new_identity().fingerprint, task("t1")))

    done = a.autopilot.expect(TaskDone)
    assert done.task_id == "t1" and done.lost and not done.ok
    assert done.exit_code == exits.NOT_RUN and "link to that node is down" in done.error


@pytest.mark.parametrize("dialler", ["stranger", "member"])
def test_a_node_with_another_key_never_links(make_node: Any, dialler: str) -> None:
    member, stranger = make_node(), make_node(keys=OTHER_KEYS)
    if dialler == "stranger":
        stranger.dial(member)
    else:
        member.dial(stranger)

    wait_for(lambda: member.counters.get("failed_handshakes") >= 1
             and stranger.counters.get("failed_handshakes") >= 1,
             what="both sides to count a failed handshake")

    for node in (member, stranger):
        node.discovery.expect_none(PeerLinked, after=[member.ref, stranger.ref])
    assert not member.links_up() and not stranger.links_up()


def test_a_node_on_another_protocol_version_is_refused_naming_both(make_node: Any) -> None:
    old, new = make_node(), make_node(versions=(2, 3))

    new.dial(old)

    for here, there in ((old, new), (new, old)):
        refused = here.discovery.expect(LinkRefused)
        assert refused.fingerprint == there.fingerprint
        assert "versions 2 to 3" in refused.reason and "version 1" in refused.reason
    for node in (old, new):
        node.discovery.expect_none(PeerLinked, after=[old.ref, new.ref])


def test_stopping_one_side_takes_the_link_down_on_the_other(make_node: Any) -> None:
    a, b = make_node(), make_node()
    link_both(a, b)
    a.ref.tell(ForPeer(b.fingerprint, task("t1")))
    b.executor.expect(LendTask)

    b.ref.stop(timeout=DEADLINE)

    down = a.linked(b, up=False, timeout=DEAD_AFTER_S + 1.0)
    assert down.reason
    done = a.autopilot.expect(TaskDone)
    assert done.task_id == "t1" and done.lost and not done.ok


def test_a_silent_peer_is_declared_dead_after_the_heartbeat_deadline(make_node: Any) -> None:
    """The other side's loop is stuck: its socket stays open, but nothing comes any more."""
    a, b = make_node(), make_node()
    link_both(a, b)
    stuck, release = threading.Event(), threading.Event()

    def hang() -> None:
        stuck.set()
        release.wait(DEADLINE)

    b.loop.call(hang)
    try:
        assert stuck.wait(DEADLINE)
        started = time.monotonic()
        down = a.linked(b, up=False, timeout=DEAD_AFTER_S + 1.0)
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert down.reason == f"silent for {DEAD_AFTER_S:g} s"
    assert elapsed >= DEAD_AFTER_S - 2 * HEARTBEAT_S


def test_a_draining_node_tells_its_peers_it_is_leaving(make_node: Any) -> None:
    a, b = make_node(), make_node()
    link_both(a, b)
    a.ref.tell(ForPeer(b.fingerprint, task("t1")))
    b.executor.expect(LendTask)

    b.ref.tell(Drain())

    seen = a.discovery.expect(PeerSeen)
    assert seen.fingerprint == b.fingerprint and seen.leaving == "the node is stopping"
    done = a.autopilot.expect(TaskDone)
    assert done.task_id == "t1" and done.lost and "left (the node is stopping)" in done.error


def test_a_draining_node_dials_no_one(make_node: Any) -> None:
    a, b = make_node(), make_node()
    a.ref.tell(Drain())

    a.dial(b)

    a.settle()
    assert not a.loop.connections()
    b.discovery.expect_none(PeerLinked, after=[a.ref, b.ref])


def test_both_dialling_at_once_ends_with_one_link_both_sides_agree_on(make_node: Any) -> None:
    low, high = (make_node(identity=i) for i in by_fingerprint(2))

    low.dial(high)
    high.dial(low)

    low.linked(high)
    high.linked(low)

    def one_link() -> bool:  # and no other connection left, up or in its handshake
        here, there = low.connections(), high.connections()
        return (len(here) == len(there) == 1 and here[0][1] and there[0][1]
                and here[0][0] == there[0][0][::-1])

    wait_for(one_link, what="one link, the same TCP connection seen from both ends")
    (_local, remote) = low.links_up()[0]
    assert remote[1] == high.port, "the link the lower fingerprint opened is kept"
    for here, there in ((low, high), (high, low)):
        here.settle()
        assert [m.up for m in here.discovery.all(PeerLinked)] == [True]
        here.ref.tell(ForPeer(there.fingerprint, task(f"from-{here.fingerprint[:4]}")))
    for here, there in ((low, high), (high, low)):
        lend = there.executor.expect(LendTask)
        assert lend.fingerprint == here.fingerprint


# -- a task sent while both dial -------------------------------------------------------------------


class Relay:
    """A TCP relay on loopback in front of a node's listener, that can hold the way back.

    Frames from the dialler pass at once; of the frames back, the first ``free`` pass and the
    rest are held (read, counted in :attr:`held`) until :meth:`release`. Holding a handshake's
    last message keeps the dialler's side of that link from coming up while the other side is.
    """

    def __init__(self, target_port: int, free: int = 1) -> None:
        self.target_port = target_port
        self.free = free
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(DEADLINE)
        self.port = int(self.listener.getsockname()[1])
        self._lock = threading.Lock()
        self._released = False
        self._back: list[bytes] = []  # held frames of the way back
        self._back_ended = False
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._back)

    def release(self) -> None:
        """Pass what was held, and from now on everything."""
        with self._lock:
            self._released = True
            held, self._back = self._back, []
            if len(self._socks) == 2:
                with contextlib.suppress(OSError):
                    for data in held:
                        self._socks[0].sendall(data)
                    if self._back_ended:
                        self._socks[0].shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.release()
        self.listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(DEADLINE)

    def _serve(self) -> None:
        try:
            dialler, _ = self.listener.accept()
            node = socket.create_connection(("127.0.0.1", self.target_port), timeout=DEADLINE)
        except OSError:
            return
        for sock in (dialler, node):
            sock.settimeout(None)
        with self._lock:
            self._socks += [dialler, node]
        back = threading.Thread(target=self._pump, args=(node, dialler, True), daemon=True)
        self._threads.append(back)
        back.start()
        self._pump(dialler, node, False)

    def _pump(self, src: socket.socket, dst: socket.socket, holding: bool) -> None:
        passed = 0
        with contextlib.suppress(OSError):
            while (data := _read_frame(src)) is not None:
                with self._lock:
                    if holding and passed >= self.free and not self._released:
                        self._back.append(data)
                        continue
                    dst.sendall(data)
                    passed += 1
            with self._lock:
                if holding and self._back:
                    self._back_ended = True  # the end passes after what is held
                    return
                dst.shutdown(socket.SHUT_WR)


def _read_frame(sock: socket.socket) -> bytes | None:
    """One length-prefixed frame, header included; None at the end of the stream."""
    header = _read_exactly(sock, 4)
    body = _read_exactly(sock, int.from_bytes(header, "big")) if header is not None else None
    return header + body if header is not None and body is not None else None


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


@pytest.fixture
def relay() -> Iterator[Any]:
    made: list[Relay] = []

    def make(target_port: int) -> Relay:
        made.append(Relay(target_port))
        return made[-1]

    yield make
    for r in made:
        r.close()


def settle_node(node: Node) -> None:
    """Return once the node's transport, its PeerLinks and its probes handled what they were
    told."""
    node.settle()
    for peer in node.ref.proxy().peers.get(timeout=DEADLINE).values():
        if peer.link is not None:
            with contextlib.suppress(pykka.ActorDeadError):
                assert peer.link.ask(Ping(), timeout=DEADLINE) is True
    for probe in (node.autopilot, node.discovery, node.executor):
        assert probe.ref.ask(Ping(), timeout=DEADLINE) is True


def test_a_task_sent_while_both_dial_is_delivered_or_failed_never_lost(
    make_node: Any, relay: Any
) -> None:
    """Each side's first link is the one it answered: the lower node's link is the one the
    higher node dialled, which both then drop for the one the lower node dialled. A task the
    lower node sends meanwhile must reach the higher node, or come back failed to be placed
    again; it must not hang."""
    low, high = (make_node(identity=i, heartbeat_s=1.0) for i in by_fingerprint(2))
    to_high, to_low = relay(high.port), relay(low.port)
    low.ref.tell(Dial(high.fingerprint, "127.0.0.1", to_high.port))
    high.ref.tell(Dial(low.fingerprint, "127.0.0.1", to_low.port))
    low.linked(high)  # on the link the higher node dialled (its confirmation to high is held)
    high.linked(low)  # on the link the lower node dialled (its confirmation to low is held)

    low.ref.tell(ForPeer(high.fingerprint, task("t1")))
    # the confirmation and the task, and the list of leases a link starts with where that link
    # is up on low's side by then
    wait_for(lambda: to_low.held >= 2, what="the confirmation and the task on the way to high")
    to_high.release()  # low completes the link it dialled and switches to it
    wait_for(lambda: low.current_link(high) == low.conn_to(to_high.port),
             what="low to switch to the link it dialled")
    to_low.release()  # high completes the other link, and drops it as the lower node's rule says
    for node in (low, high):
        wait_for(lambda n=node: [up for _, up in n.connections()] == [True],
                 what="the other link to be gone")
        settle_node(node)

    delivered = [m for m in high.executor.all(LendTask) if m.run.task_id == "t1"]
    failed = [m for m in low.autopilot.all(TaskDone) if m.task_id == "t1"]
    assert delivered or failed, "the task was neither delivered nor failed"
