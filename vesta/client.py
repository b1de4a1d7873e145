"""The Python client of a vestad control socket: what ``vesta`` and ``vestatop`` are built on.

Which daemon: an explicit socket path (``--socket`` or ``VESTA_SOCKET``), else a node name
(``--node`` or ``VESTA_NODE``) giving ``/tmp/vestad-NAME.sock``, else the only control socket found
where a daemon of ours answers. Anyone may create a socket in /tmp, so before sending anything the
client checks (``SO_PEERCRED``) that the process behind it runs as the same user.
Imports only the standard library, msgpack and vesta's message types, so the CLI starts fast.
"""

from __future__ import annotations

import _socket  # the C module: `socket` adds enum conversions and selectors, costly at start-up
import errno
import glob
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from vesta.messages import (
    AnyJob,
    CancelRequest,
    DecodeError,
    DoctorReply,
    DoctorRequest,
    ErrorReply,
    JobDone,
    Message,
    PeersReply,
    PeersRequest,
    Scope,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    WhyReply,
    WhyRequest,
    decode,
    encode,
)
from vesta.names import sanitize_name
from vesta.transport.framing import CONTROL_MAX_FRAME, FrameError, frame, recv_frame

SOCKET_GLOB = "/tmp/vestad-*.sock"
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class VestaError(Exception):
    """A failure the CLI reports in one sentence and exits with ``exit_code``."""

    exit_code = 1


class UsageError(VestaError):
    exit_code = 2


class DaemonUnreachable(VestaError):
    exit_code = 3


class ForeignDaemon(DaemonUnreachable):
    """The process behind the socket runs as another user: nothing is sent to it."""


class RequestFailed(VestaError):
    """The daemon answered with an error."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.error)
        self.code = reply.code
        self.exit_code = 2 if reply.code in ("bad_request", "bad_frame") else 1


def socket_path_for(node: str) -> str:
    return f"/tmp/vestad-{node}.sock"


def find_socket(
    node: str | None = None, path: str | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The control socket to talk to, by SPEC's order of precedence.

    Found by looking, a socket counts only if a daemon of this user answers on it: one left
    behind by a daemon that died, or one of another user's, is listed in the error but never
    picked.
    """
    env = os.environ if env is None else env
    if path or env.get("VESTA_SOCKET"):
        return path or env["VESTA_SOCKET"]
    node = node or env.get("VESTA_NODE")
    if node:
        return socket_path_for(sanitize_name(node))
    found = {p: probe(p) for p in sorted(glob.glob(SOCKET_GLOB))}
    ours = [p for p, trouble in found.items() if not trouble]
    others = [_labelled(p, trouble) for p, trouble in found.items() if trouble]
    if len(ours) == 1:
        return ours[0]
    if not ours:
        where = (f"found only {', '.join(others)}" if others
                 else f"no control socket matches {SOCKET_GLOB}")
        raise DaemonUnreachable(f"no vestad is running here: {where}. "
                                "Start one with: vestad -name NAME -key-file FILE")
    names = ", ".join(_node_of(p) for p in ours)
    also = f". Also found: {', '.join(others)}" if others else ""
    raise UsageError(f"several daemons run here ({names}); pick one with --node NAME or "
                     "VESTA_NODE (or --socket PATH / VESTA_SOCKET for a daemon with -socket)"
                     + also)


def probe(path: str) -> str:
    """What keeps ``path`` from being a daemon of ours to talk to, or "" when one answers there."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
        uid = peer_uid(sock)
    except OSError as exc:
        return _why_not(exc)
    finally:
        sock.close()
    return "" if uid == os.geteuid() else f"another user's: uid {uid}"


def answers(path: str, timeout: float = 2.0) -> bool:
    """Whether a daemon of ours answers a status request on ``path`` now."""
    try:
        with Client(path, timeout=timeout) as client:
            client.status()
    except VestaError:
        return False
    return True


def peer_uid(sock: _socket.socket) -> int:
    """The user id of the process on the other end of a connected Unix socket."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(creds)
    return int(uid)


def _why_not(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "stale: nothing answers"
    if exc.errno == errno.ENOENT:
        return "gone"
    return (exc.strerror or str(exc)).lower()


def _node_of(path: str) -> str:
    name = os.path.basename(path)
    return name[len("vestad-"):-len(".sock")] if name.startswith("vestad-") else path


class Client:
    """One connection to a daemon. Use as a context manager."""

    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            uid = peer_uid(self.sock)
        except FileNotFoundError:
            self.sock.close()
            raise DaemonUnreachable(_unreachable(path, "there is no socket there")) from None
        except ConnectionRefusedError:
            self.sock.close()
            raise DaemonUnreachable(_unreachable(
                path, "nothing answers there (a socket left by a daemon that died?)")) from None
        except OSError as exc:
            self.sock.close()
            raise DaemonUnreachable(_unreachable(path, exc.strerror or str(exc))) from None
        if uid != os.geteuid():
            self.sock.close()
            raise ForeignDaemon(
                f"refusing {path}: the process behind it runs as uid {uid}, not as you (uid "
                f"{os.geteuid()}), so it is not your vestad (anyone may create a socket in "
                "/tmp). Talk to your own with --node NAME or --socket PATH"
            )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: Message) -> None:
        try:
            self.sock.sendall(frame(encode(msg)))
        except OSError as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.path}: {exc}") from None

    def receive(self, timeout: float | None = None) -> Message:
        """The next message from the daemon; ``timeout`` None keeps the connection's own."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            return decode(recv_frame(self.sock, CONTROL_MAX_FRAME), Scope.CLIENT)
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon at {self.path} did not answer in time") from None
        except (EOFError, OSError) as exc:
            raise DaemonUnreachable(f"lost the daemon at {self.path}: {exc}") from None
        except (FrameError, DecodeError) as exc:
            raise VestaError(f"the daemon sent something unreadable: {exc}") from None

    def readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for something to read (an event, or the end)."""
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(1, _socket.MSG_PEEK)
        except TimeoutError:
            return False
        except OSError:
            return True  # the next receive reports it
        finally:
            self.sock.settimeout(None)
        return True

    def request(self, msg: Message) -> Message:
        self.send(msg)
        reply = self.receive()
        if isinstance(reply, ErrorReply):
            raise RequestFailed(reply)
        return reply

    def status(self) -> dict[str, Any]:
        reply = self.request(StatusRequest())
        assert isinstance(reply, StatusReply)
        return reply.doc

    def peers(self) -> list[dict[str, Any]]:
        reply = self.request(PeersRequest())
        assert isinstance(reply, PeersReply)
        return reply.peers

    def doctor(self) -> dict[str, Any]:
        """The facts ``vesta doctor`` checks, as the daemon sees them."""
        reply = self.request(DoctorRequest())
        assert isinstance(reply, DoctorReply)
        return reply.facts

    def why(self, job_id: str = "") -> dict[str, Any]:
        """Why a job of this node went where it went; the last one without ``job_id``."""
        reply = self.request(WhyRequest(job_id))
        assert isinstance(reply, WhyReply)
        return reply.doc

    def submit(self, job: AnyJob, tick: float | None = None) -> Iterator[Message | None]:
        """Submit a job and yield its events; the last one is its :class:`JobDone`.

        With ``tick``, None is yielded whenever ``tick`` seconds pass without an event, so that
        the caller can redraw a clock.
        """
        self.send(SubmitRequest(job))
        self.sock.settimeout(None)  # a job may run for hours; the daemon's liveness is the socket
        while True:
            if tick is not None and not self.readable(tick):
                yield None
                continue
            event = self.receive()
            if isinstance(event, ErrorReply):
                raise RequestFailed(event)
            yield event
            if isinstance(event, JobDone):
                return

    def cancel(self, job_id: str = "") -> None:
        self.send(CancelRequest(job_id))


def _unreachable(path: str, why: str) -> str:
    others = [_labelled(p, probe(p)) for p in sorted(glob.glob(SOCKET_GLOB)) if p != path]
    hint = (f" Other sockets here: {', '.join(others)}." if others
            else " No other control socket was found.")
    return f"cannot reach vestad at {path}: {why}. Is vestad running?{hint}"


def _labelled(path: str, trouble: str) -> str:
    return f"{path} ({trouble})" if trouble else path
