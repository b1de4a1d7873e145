"""The Python client of a vestad control socket: what ``vesta`` and ``vestatop`` are built on.

Which daemon: an explicit socket path (``--socket`` or ``VESTA_SOCKET``), else a node name
(``--node`` or ``VESTA_NODE``) giving ``/tmp/vestad-NAME.sock``, else the only control socket found.
Imports only the standard library, msgpack and vesta's message types, so the CLI starts fast.
"""

from __future__ import annotations

import _socket  # the C module: `socket` adds enum conversions and selectors, costly at start-up
import glob
import os
from collections.abc import Iterator, Mapping
from typing import Any

from vesta.messages import (
    AnyJob,
    CancelRequest,
    DecodeError,
    ErrorReply,
    JobDone,
    Message,
    PeersReply,
    PeersRequest,
    Scope,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    decode,
    encode,
)
from vesta.names import sanitize_name
from vesta.transport.framing import CONTROL_MAX_FRAME, FrameError, frame, recv_frame

SOCKET_GLOB = "/tmp/vestad-*.sock"


class VestaError(Exception):
    """A failure the CLI reports in one sentence and exits with ``exit_code``."""

    exit_code = 1


class UsageError(VestaError):
    exit_code = 2


class DaemonUnreachable(VestaError):
    exit_code = 3


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
    """The control socket to talk to, by SPEC's order of precedence."""
    env = os.environ if env is None else env
    if path or env.get("VESTA_SOCKET"):
        return path or env["VESTA_SOCKET"]
    node = node or env.get("VESTA_NODE")
    if node:
        return socket_path_for(sanitize_name(node))
    found = sorted(glob.glob(SOCKET_GLOB))
    if len(found) == 1:
        return found[0]
    if not found:
        raise DaemonUnreachable(
            "no vestad is running here: no control socket matches /tmp/vestad-*.sock. "
            "Start one with: vestad -name NAME -key-file FILE"
        )
    names = ", ".join(p[len("/tmp/vestad-"):-len(".sock")] for p in found)
    raise UsageError(f"several daemons run here ({names}); pick one with --node NAME or "
                     "VESTA_NODE (or --socket PATH / VESTA_SOCKET for a daemon with -socket)")


class Client:
    """One connection to a daemon. Use as a context manager."""

    def __init__(self, path: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise DaemonUnreachable(_unreachable(path, "there is no socket there")) from None
        except OSError as exc:
            self.sock.close()
            raise DaemonUnreachable(_unreachable(path, exc.strerror or str(exc))) from None

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

    def submit(self, job: AnyJob) -> Iterator[Message]:
        """Submit a job and yield its events; the last one is its :class:`JobDone`."""
        self.send(SubmitRequest(job))
        self.sock.settimeout(None)  # a job may run for hours; the daemon's liveness is the socket
        while True:
            event = self.receive()
            if isinstance(event, ErrorReply):
                raise RequestFailed(event)
            yield event
            if isinstance(event, JobDone):
                return

    def cancel(self, job_id: str = "") -> None:
        self.send(CancelRequest(job_id))


def _unreachable(path: str, why: str) -> str:
    others = sorted(glob.glob(SOCKET_GLOB))
    hint = f" Sockets found: {', '.join(others)}." if others else " No control socket was found."
    return f"cannot reach vestad at {path}: {why}. Is vestad running?{hint}"
