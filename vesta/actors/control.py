"""The Control actor: the daemon's Unix control socket, where ``vesta`` and ``vestatop`` connect.

The socket is mode 0600 and refuses a peer of another user (SO_PEERCRED). Requests are
length-prefixed msgpack messages of at most :data:`CONTROL_MAX_FRAME` bytes. The daemon's
:class:`IoLoop` thread serves the socket, and each connection's :class:`ControlChannel` decodes
them there; bad input (garbage, a wrong type, an oversized frame) is answered with an
:class:`ErrorReply`, counted, and never reaches an actor. The channel routes each request to
the actor that serves it, and the actors answer through a :class:`ClientOutbox`, which queues
the reply on the right connection from the answering actor's own thread: a job's request and
its events cross no actor but the ones that do the work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from vesta.actors.base import VestaActor, tell_quietly
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.messages import (
    CancelRequest,
    ClientGone,
    ClientRequest,
    DecodeError,
    DoctorRequest,
    ErrorReply,
    JobOutput,
    Message,
    OutputAck,
    PeersRequest,
    Scope,
    Serve,
    StartStress,
    StatusRequest,
    StopStress,
    StopStressRequest,
    StressRequest,
    SubmitRequest,
    ToClient,
    WhyRequest,
    decode,
    encode,
)
from vesta.transport.framing import CONTROL_MAX_FRAME, frame
from vesta.transport.loop import Channel, Conn, IoLoop

logger = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class ControlSocketError(RuntimeError):
    """The control socket cannot be created."""


def open_control_socket(path: str) -> socket.socket:
    """Bind and listen on the control socket, mode 0600.

    A socket file left by a daemon that died is removed, but only after a ``connect`` to it fails:
    if a daemon answers there, this raises instead of stealing its socket.
    """
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ControlSocketError(f"{path} exists and is not a socket; remove it or use -socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: a leftover
        else:
            raise ControlSocketError(f"another vestad is already serving {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as exc:
        listener.close()
        raise ControlSocketError(
            f"cannot create the control socket {path}: {exc.strerror}"
        ) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


class ClientOutbox:
    """Where actors send :class:`ToClient` messages: each is encoded and queued on its client's
    connection at once, in the sender's thread (:meth:`IoLoop.send` may be called from any).
    Within :meth:`batch`, what a thread sends is held and written per client in one go when
    the batch ends: a job's acceptance and start then wake its client once. It has an actor's
    ``tell``, so a test may put a probe (and a batch that holds nothing) in its place."""

    def __init__(self, loop: IoLoop, links: Links) -> None:
        self.loop = loop
        self.links = links
        self._held = threading.local()

    def tell(self, message: ToClient) -> None:
        client, msg = message.client, message.msg
        written = None
        if isinstance(msg, JobOutput):  # once the client's socket took it, more may come
            ack = ClientRequest(client, OutputAck(msg.job_id, len(msg.data)))
            written = partial(tell_quietly, self.links.autopilot, ack)
        held: dict[int, list[tuple[bytes, Any]]] | None = getattr(self._held, "frames", None)
        if held is not None:
            held.setdefault(client, []).append((encode(msg), written))
        else:
            self.loop.send(client, encode(msg), written=written)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold what this thread sends until the end of the block, then write it per client."""
        if getattr(self._held, "frames", None) is not None:  # already in one
            yield
            return
        self._held.frames = {}
        try:
            yield
        finally:
            held, self._held.frames = self._held.frames, None
            for client, frames in held.items():
                if len(frames) == 1:
                    self.loop.send(client, frames[0][0], written=frames[0][1])
                else:
                    self.loop.send_all(client, frames)


class ControlChannel(Channel):
    """One client connection: frames are decoded as control requests and routed to the actor
    that serves each, in the socket loop's thread."""

    max_frame = CONTROL_MAX_FRAME

    def __init__(self, links: Links, counters: Counters, loop: IoLoop) -> None:
        self.links = links
        self.counters = counters
        self.loop = loop

    def frame(self, conn: Conn, body: memoryview) -> None:
        try:
            request = decode(body, Scope.CONTROL)
        except DecodeError as exc:
            self.counters.add("bad_control_requests")
            self.reply(conn.conn_id, ErrorReply("bad_request", f"not a vesta request: {exc}"))
            return
        self.route(conn.conn_id, request)

    def route(self, client: int, request: Message) -> None:
        match request:
            case (StatusRequest() | PeersRequest() | SubmitRequest() | CancelRequest()
                  | WhyRequest()):
                tell_quietly(self.links.autopilot, ClientRequest(client, request))
            case DoctorRequest():
                tell_quietly(self.links.discovery, ClientRequest(client, request))
            case StressRequest(cores=cores, seconds=seconds):
                if cores < 0 or not 0 < seconds <= 86400:
                    self.reply(client, ErrorReply("bad_request", "stress takes CORES >= 0 and "
                                                  "SECS from 0 to 86400"))
                else:
                    tell_quietly(self.links.executor, StartStress(client, cores, seconds))
            case StopStressRequest():
                tell_quietly(self.links.executor, StopStress(client))
            case _:
                self.counters.add("bad_control_requests")
                self.reply(client, ErrorReply("bad_request", f"{request.tag} is not a request"))

    def reply(self, client: int, msg: Message) -> None:
        self.loop.send(client, encode(msg))

    def too_large(self, conn: Conn, error: str) -> None:
        self.counters.add("bad_control_requests")
        self.loop.send(conn.conn_id, encode(ErrorReply("bad_frame", error)), close_after=True)

    def closed(self, conn: Conn, reason: str) -> None:
        tell_quietly(self.links.autopilot, ClientGone(conn.conn_id))


class Control(VestaActor):
    """Owns the control socket: serves it on the socket loop from ``Serve`` until it stops.

    Each connection's :class:`ControlChannel` routes its requests; a ``ToClient`` told here is
    sent as the :class:`ClientOutbox` sends it."""

    def __init__(
        self, counters: Counters, links: Links, loop: IoLoop, listener: socket.socket, path: str
    ) -> None:
        super().__init__(counters)
        self.links = links
        self.path = path
        self.inode = os.stat(path).st_ino
        self.loop = loop
        self.listener = listener
        self.outbox = ClientOutbox(loop, links)

    def handle(self, message: Message) -> Any:
        match message:
            case Serve():
                self.loop.listen(self.listener, self._accept)
                logger.info("control socket at %s", self.path)
            case ToClient():
                self.outbox.tell(message)
            case _:
                return super().handle(message)
        return None

    def stopping(self) -> None:
        self.loop.unlisten(self.listener)
        for conn in self.loop.connections():
            if isinstance(conn.channel, ControlChannel):
                self.loop.close(conn.conn_id)
        self.loop.call(self.listener.close)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:  # still ours
                Path(self.path).unlink()

    # -- called in the socket loop's thread --------------------------------------------------------

    def _accept(self, sock: socket.socket, _address: Any) -> ControlChannel | None:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        _pid, uid, _gid = _PEERCRED.unpack(creds)
        if uid != os.getuid():
            self.counters.add("refused_control_clients")
            logger.warning("refused a control connection from uid %d", uid)
            with contextlib.suppress(OSError):
                sock.sendall(_error_frame("forbidden", "this daemon belongs to another user"))
            return None
        return ControlChannel(self.links, self.counters, self.loop)


def _error_frame(code: str, error: str) -> bytes:
    return frame(encode(ErrorReply(code, error)))
