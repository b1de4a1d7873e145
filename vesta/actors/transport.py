"""The Transport actor: owns the peer connections' life cycle and the PeerLink actors.

It listens on the peer port, dials the nodes Discovery hears of (one link per peer, with backoff
when a dial fails), bounds how many connections may be half-open, and, once a handshake proved a
peer's fingerprint, starts that peer's :class:`~vesta.actors.peerlink.PeerLink` and routes the
link's messages to it. It is the PeerLinks' owner: it keeps the fingerprint -> PeerLink map
(``Links.peer_links``), through which other actors reach a peer (``Links.to_peer``), and it
routes each link's channel to its PeerLink, so that a message crosses no actor on its way in
or out but the PeerLink. The sockets, the handshake and the ciphers live in the
:class:`~vesta.transport.loop.IoLoop` thread and its :class:`LinkChannel` objects.

A PeerLink whose link went down lingers for :data:`LINGER_S` before it stops: a message an
actor sent it just before the link left the map still finds it, and a task in it is reported
lost rather than dropped.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pykka

from vesta import exits
from vesta.actors.base import VestaActor, tell_quietly
from vesta.actors.links import Links
from vesta.actors.peerlink import PeerLink
from vesta.counters import Counters
from vesta.identity import Identity
from vesta.messages import (
    CancelTask,
    Dial,
    Drain,
    ForPeer,
    LinkDown,
    LinkMessage,
    LinkRefused,
    LinkUp,
    Message,
    PeerHello,
    PeerLeaving,
    PeerLinked,
    RunTask,
    TaskDone,
    encode,
)
from vesta.transport.crypto import FederationKeys
from vesta.transport.link import DEAD_AFTER_S, HEARTBEAT_S, Heartbeats, LinkChannel
from vesta.transport.loop import Channel, IoLoop

logger = logging.getLogger(__name__)

#: Connections still in their handshake beyond this are refused.
MAX_HALF_OPEN = 16
#: The first wait before dialling a peer again after a failure; it doubles up to the maximum.
BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def open_peer_listener(bind: str, port: int) -> socket.socket:
    """The TCP socket peers connect to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind or "0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    sock.listen(64)
    return sock


@dataclass
class _Peer:
    """What the transport knows of one peer."""

    fingerprint: str
    link: pykka.ActorRef[Any] | None = None
    conn_id: int = 0
    initiated_by_lower: bool = False
    dialling: int = 0  # conn id of a dial in progress
    next_dial: float = 0.0
    backoff: float = BACKOFF_S
    retired: set[int] = field(default_factory=set)  # dropped duplicates, read until they end


#: Seconds a PeerLink lives on after its link went down, answering for what reaches it late.
LINGER_S = 1.0


class Transport(VestaActor):
    """Dials, accepts, dedupes and routes peer links; starts and stops the PeerLinks."""

    def __init__(
        self, counters: Counters, links: Links, loop: IoLoop, listener: socket.socket | None,
        keys: FederationKeys, identity: Identity, heartbeat_s: float = HEARTBEAT_S,
        dead_after_s: float | None = None, versions: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(counters)
        self.links = links
        self.loop = loop
        self.listener = listener
        self.keys = keys
        self.identity = identity
        self.versions = versions
        self.peers: dict[str, _Peer] = {}
        self.lingering: list[pykka.ActorRef[Any]] = []  # PeerLinks whose link went down
        self.draining = False
        self.heartbeats = Heartbeats(
            loop, heartbeat_s,
            dead_after_s if dead_after_s is not None else heartbeat_s * DEAD_AFTER_S / HEARTBEAT_S)

    def on_start(self) -> None:
        if self.listener is not None:
            self.loop.listen(self.listener, self._accept)

    def stopping(self) -> None:
        for peer in self.peers.values():
            if peer.conn_id:
                self.loop.close(peer.conn_id)
            if peer.link is not None:
                peer.link.stop(block=False)
        self.links.peer_links.clear()
        for link in self.lingering:
            link.stop(block=False)
        if self.listener is not None:
            self.loop.unlisten(self.listener)
            self.loop.call(self.listener.close)

    def handle(self, message: Message) -> Any:
        match message:
            case Dial(fingerprint=fp, host=host, port=port):
                self.dial(fp, host, port)
            case LinkUp():
                self.link_up(message)
            case LinkDown():
                self.link_down(message)
            case LinkRefused():
                tell_quietly(self.links.discovery, message)
            case LinkMessage(fingerprint=fp, conn_id=conn_id):  # from a link never routed
                peer = self.peers.get(fp)
                if peer is not None and peer.link is not None and (
                        conn_id == peer.conn_id or conn_id in peer.retired):
                    peer.link.tell(message)
            case ForPeer(fingerprint=fp, msg=msg):
                self.for_peer(fp, msg)
            case Drain():  # queued on each link now, so it is written before the links close
                self.draining = True
                leaving = encode(PeerLeaving("the node is stopping"))
                for peer in self.peers.values():
                    if peer.link is not None and peer.conn_id:
                        self.loop.send(peer.conn_id, leaving)
            case _:
                return super().handle(message)
        return None

    # -- connections -------------------------------------------------------------------------------

    def channel(self, *, initiator: bool, host: str, expect: str = "") -> LinkChannel:
        return LinkChannel(
            self.loop, self.keys, self.identity, self.counters,
            lambda m: tell_quietly(self.actor_ref, m), initiator=initiator, host=host,
            expect=expect, versions=self.versions,
        )

    def _accept(self, sock: socket.socket, address: Any) -> Channel | None:
        """In the loop thread: a peer connects. Refuse beyond the half-open bound."""
        half_open = sum(
            1 for c in self.loop.connections()
            if isinstance(c.channel, LinkChannel) and not c.channel.up
        )
        if self.draining or half_open >= MAX_HALF_OPEN:
            self.counters.add("failed_handshakes")
            return None
        self.heartbeats.ensure_running()
        return self.channel(initiator=False, host=address[0])

    def dial(self, fp: str, host: str, port: int) -> None:
        if self.draining or fp == self.identity.fingerprint:
            return
        peer = self.peers.setdefault(fp, _Peer(fp))
        now = time.monotonic()
        if peer.link is not None or peer.dialling or now < peer.next_dial:
            return
        peer.next_dial = now + peer.backoff
        peer.backoff = min(peer.backoff * 2, MAX_BACKOFF_S)
        self.heartbeats.ensure_running()
        peer.dialling = self.loop.connect(
            (host, port), self.channel(initiator=True, host=host, expect=fp))

    def link_up(self, up: LinkUp) -> None:
        fp = up.fingerprint
        peer = self.peers.setdefault(fp, _Peer(fp))
        if peer.dialling == up.conn_id:
            peer.dialling = 0
        lower = min(fp, self.identity.fingerprint)
        by_lower = (self.identity.fingerprint if up.initiator else fp) == lower
        if peer.link is not None:
            # both sides dialled: keep the link the lower fingerprint opened, on both sides alike
            if peer.initiated_by_lower or not by_lower:
                self.loop.retire(up.conn_id)
                peer.retired.add(up.conn_id)
                self.route(up.conn_id, peer.link)  # what it still carries goes to the PeerLink
                return
            peer.retired.add(peer.conn_id)  # the PeerLink retires it once it sent its last
            peer.conn_id, peer.initiated_by_lower = up.conn_id, by_lower
            peer.link.tell(up)
            self.route(up.conn_id, peer.link)
            return
        if self.draining:
            self.loop.close(up.conn_id)
            return
        peer.conn_id, peer.initiated_by_lower = up.conn_id, by_lower
        peer.backoff = BACKOFF_S
        peer.next_dial = 0.0
        peer.link = PeerLink.start(self.counters, self.links, self.loop, fp, self.identity)
        peer.link.tell(up)
        self.route(up.conn_id, peer.link)
        self.links.peer_links[fp] = peer.link
        tell_quietly(self.links.discovery, PeerLinked(fp, True, up.version))
        logger.info("linked with %s (%s, protocol %d)", fp, up.host, up.version)

    def link_down(self, down: LinkDown) -> None:
        peer = self.peers.get(down.fingerprint)
        if peer is None:
            return
        if peer.dialling == down.conn_id:
            peer.dialling = 0
        peer.retired.discard(down.conn_id)
        if peer.conn_id != down.conn_id or peer.link is None:
            return
        logger.info("link with %s down: %s", down.fingerprint, down.reason)
        self.links.peer_links.pop(down.fingerprint, None)
        link = peer.link
        tell_quietly(link, down)
        self.lingering = [old for old in self.lingering if old.is_alive()]
        self.lingering.append(link)
        self.loop.call_later(LINGER_S, lambda: link.stop(block=False))
        peer.link, peer.conn_id = None, 0
        tell_quietly(self.links.discovery, PeerLinked(down.fingerprint, False, reason=down.reason))

    def route(self, conn_id: int, link: pykka.ActorRef[Any]) -> None:
        """Have a link's channel hand the peer's messages to its PeerLink from now on."""
        def route() -> None:
            for conn in self.loop.connections():
                if conn.conn_id == conn_id and isinstance(conn.channel, LinkChannel):
                    conn.channel.route(partial(tell_quietly, link))
        self.loop.call(route)

    def for_peer(self, fp: str, msg: Message) -> None:
        peer = self.peers.get(fp)
        if peer is not None and peer.link is not None:
            peer.link.tell(ForPeer(fp, msg))
            return
        if isinstance(msg, RunTask):  # the link went away before the task could leave
            tell_quietly(self.links.autopilot, TaskDone(
                msg.task_id, False, 0.0, exits.NOT_RUN, "the link to that node is down",
                lost=True))
        elif not isinstance(msg, CancelTask | PeerHello | PeerLeaving):
            logger.debug("no link to %s for %s", fp, msg.tag)
