"""A peer link on the wire: the handshake, then sealed frames, heartbeats and silence detection.

:class:`LinkChannel` is the protocol object of one TCP connection between two daemons, run by the
:class:`~vesta.transport.loop.IoLoop` thread. Until the handshake is done it takes frames of at
most :data:`HANDSHAKE_MAX_FRAME` bytes and must finish within a deadline; the responder seals
nothing before the initiator proved the federation key. Then every frame is sealed with the
connection's key for its direction and a counter nonce: one that does not open (replayed,
reordered, forged) ends the link. Messages are decoded here, in the peer scope, so an actor never
sees bytes from a peer. An empty sealed frame is a heartbeat: :class:`Heartbeats` sends one on a
link that has been quiet for a beat and drops a link that has been silent for too long, so a peer
whose cable is pulled is noticed in seconds, not when TCP gives up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from vesta.counters import Counters
from vesta.identity import Identity
from vesta.messages import (
    DecodeError,
    LinkDown,
    LinkMessage,
    LinkRefused,
    LinkUp,
    Message,
    Scope,
    decode,
)
from vesta.transport.crypto import CryptoError, FederationKeys, NotVesta, WrongKey
from vesta.transport.framing import HEADER
from vesta.transport.handshake import (
    HANDSHAKE_MAX_FRAME,
    Initiator,
    Responder,
    Session,
    VersionMismatch,
)
from vesta.transport.loop import Channel, Conn, IoLoop

logger = logging.getLogger(__name__)

#: Seconds between heartbeats on a quiet link.
HEARTBEAT_S = 0.5
#: Seconds of silence after which a link is declared dead: four missed heartbeats. A node cut
#: off mid-job is noticed within this, and its units re-placed (the issue's 3 s, with a chunk
#: of up to a second still running on the node that takes them).
DEAD_AFTER_S = 2.0
#: Seconds a connection may take to complete its handshake.
HANDSHAKE_TIMEOUT_S = 5.0
#: The largest frame a link carries once it is up.
LINK_MAX_FRAME = 4 << 20
#: Messages a link holds between its handshake and the Transport routing it to its PeerLink.
MAX_HELD = 1000


class LinkChannel(Channel):
    r"""One connection to a peer. ``tell`` (the Transport) receives LinkUp, LinkDown and
    LinkRefused; the peer's messages go to its PeerLink once the Transport :meth:`route`\ s them
    there, and are held until then, in order."""

    def __init__(
        self, loop: IoLoop, keys: FederationKeys, identity: Identity, counters: Counters,
        tell: Callable[[Message], object], *, initiator: bool, host: str,
        expect: str = "", versions: tuple[int, int] | None = None,
    ) -> None:
        self.loop = loop
        self.counters = counters
        self.tell = tell
        self.host = host
        self.expect = expect  # the fingerprint an outbound link must reach ("" = any)
        self.max_frame = HANDSHAKE_MAX_FRAME
        self.session: Session | None = None
        self.started = time.monotonic()
        extra = {"versions": versions} if versions else {}
        self.handshake: Initiator | Responder = (
            Initiator(keys, identity, max_frame=LINK_MAX_FRAME, **extra) if initiator
            else Responder(keys, identity, max_frame=LINK_MAX_FRAME, **extra)
        )
        self.failed = ""
        self.step = 0  # handshake messages handled so far
        self.target: Callable[[Message], object] | None = None  # the PeerLink's tell
        self.held: list[Message] = []  # what arrived before the Transport routed the link

    def route(self, target: Callable[[Message], object]) -> None:
        """From now on, the peer's messages go to ``target`` (loop thread only)."""
        self.target = target
        held, self.held = self.held, []
        for message in held:
            target(message)

    @property
    def up(self) -> bool:
        return self.session is not None

    @property
    def fingerprint(self) -> str:
        return self.session.peer_fingerprint if self.session else ""

    # -- the loop calls these ----------------------------------------------------------------------

    def opened(self, conn: Conn) -> None:
        self.started = time.monotonic()
        if isinstance(self.handshake, Initiator):
            self.loop.send(conn.conn_id, self.handshake.hello(), plain=True)

    def frame(self, conn: Conn, body: memoryview) -> None:
        if self.session is None:
            self._handshake_step(conn, bytes(body))
            return
        try:
            payload = self.session.opener.open(HEADER.pack(len(body)), body)
        except CryptoError as exc:
            self.counters.add("dropped_frames")
            logger.warning("link to %s: a frame did not open (%s); closing the link",
                           self.fingerprint, exc)
            self._end(conn, f"a frame did not open: {exc}")
            return
        if not payload:
            return  # a heartbeat
        try:
            msg = decode(payload, Scope.PEER)
        except DecodeError as exc:
            self.counters.add("dropped_frames")
            logger.warning("link to %s: dropped a message: %s", self.fingerprint, exc)
            return
        message = LinkMessage(conn.conn_id, self.fingerprint, msg)
        if self.target is not None:
            self.target(message)
        elif len(self.held) < MAX_HELD:
            self.held.append(message)
        else:  # a link that floods before it is routed
            self.counters.add("dropped_frames")

    def wrap(self, payload: bytes) -> list[bytes]:
        assert self.session is not None, "sealed frames before the handshake"
        header, body = self.session.sealer.seal(payload)
        return [header, body]

    def too_large(self, conn: Conn, error: str) -> None:
        self.counters.add("dropped_frames" if self.up else "failed_handshakes")
        self.failed = error

    def closed(self, conn: Conn, reason: str) -> None:
        if self.session is not None:
            # what came before the Transport routed the link goes through it, then the end
            held, self.held = self.held, []
            for message in held:
                self.tell(message)
            self.tell(LinkDown(conn.conn_id, self.fingerprint, self.failed or reason))
        elif not self.failed:
            self.counters.add("failed_handshakes")
            self.failed = reason
            logger.debug("handshake with %s failed: %s", self.host, reason)
            if self.expect:
                self.tell(LinkDown(conn.conn_id, self.expect, reason))
        elif self.expect:
            self.tell(LinkDown(conn.conn_id, self.expect, self.failed))

    # -- the handshake -----------------------------------------------------------------------------

    def _handshake_step(self, conn: Conn, data: bytes) -> None:
        hs = self.handshake
        self.step += 1
        try:
            if isinstance(hs, Responder):
                if self.step == 1:
                    self.loop.send(conn.conn_id, hs.on_hello(data), plain=True)
                    return
                confirm, session = hs.on_auth(data)
                self.loop.send(conn.conn_id, confirm, plain=True)
            elif self.step == 1:
                self.loop.send(conn.conn_id, hs.on_reply(data), plain=True)
                return
            else:
                session = hs.on_confirm(data)
        except VersionMismatch as exc:
            self._refused(conn, exc)
            return
        except CryptoError as exc:
            self._fail(conn, exc)
            return
        if self.expect and session.peer_fingerprint != self.expect:
            self._fail(conn, WrongKey(f"expected node {self.expect}, reached "
                                      f"{session.peer_fingerprint}"))
            return
        self.session = session
        self.max_frame = LINK_MAX_FRAME
        self.tell(LinkUp(conn.conn_id, session.peer_fingerprint, session.version,
                         isinstance(hs, Initiator), self.host))

    def _fail(self, conn: Conn, exc: CryptoError) -> None:
        """A handshake that cannot go on: count it and close, telling the other side nothing."""
        self.counters.add("failed_handshakes")
        if isinstance(exc, WrongKey | NotVesta):
            self.counters.add("dropped_frames")
        self.failed = f"handshake failed: {exc}"
        logger.info("handshake with %s failed: %s", self.host, exc)
        self.loop.drop(conn.conn_id, self.failed)

    def _refused(self, conn: Conn, exc: VersionMismatch) -> None:
        self.counters.add("failed_handshakes")
        self.failed = str(exc)
        logger.warning("%s: %s", self.host, exc)
        self.tell(LinkRefused(exc.peer_fingerprint, self.host, str(exc)))
        if exc.reply is not None:  # the responder says why before it closes
            self.loop.send(conn.conn_id, exc.reply, close_after=True, plain=True)
        else:
            self.loop.drop(conn.conn_id, self.failed)

    def _end(self, conn: Conn, reason: str) -> None:
        self.failed = reason
        self.loop.drop(conn.conn_id, reason)


class Heartbeats:
    """Runs in the loop thread every half beat while links exist: beats, deadlines, silence."""

    def __init__(self, loop: IoLoop, heartbeat_s: float = HEARTBEAT_S,
                 dead_after_s: float = DEAD_AFTER_S,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.loop = loop
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.handshake_timeout_s = handshake_timeout_s
        self.running = False

    def ensure_running(self) -> None:
        """Start the beat (from any thread); it stops by itself once no link is left."""
        def start() -> None:
            if not self.running:
                self.running = True
                self.loop.call_later(self.heartbeat_s / 2, self.beat)
        self.loop.call(start)

    def beat(self) -> None:
        now = time.monotonic()
        links = [c for c in self.loop.connections() if isinstance(c.channel, LinkChannel)]
        for conn in links:
            channel = conn.channel
            assert isinstance(channel, LinkChannel)
            if conn.connecting or not channel.up:
                if now - channel.started > self.handshake_timeout_s:
                    channel.counters.add("failed_handshakes")
                    channel.failed = "the handshake took too long"
                    self.loop.drop(conn.conn_id, channel.failed)
                continue
            if now - conn.last_received > self.dead_after_s:
                channel.failed = f"silent for {self.dead_after_s:g} s"
                self.loop.drop(conn.conn_id, channel.failed)
            elif now - conn.last_sent >= self.heartbeat_s and not conn.out:
                self.loop.send(conn.conn_id, b"")
        if links:
            self.loop.call_later(self.heartbeat_s / 2, self.beat)
        else:
            self.running = False
