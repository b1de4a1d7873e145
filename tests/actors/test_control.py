"""The Control actor on a real Unix socket: routing, bad input, client life cycle and permissions.

Probes stand for the autopilot and the executor; the test is the client, speaking length-prefixed
msgpack frames on the socket as ``vesta`` does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka
import pytest

from tests.actors.conftest import Wiring
from vesta.actors.control import Control, ControlSocketError, open_control_socket
from vesta.messages import (
    CancelTask,
    ClientGone,
    ClientRequest,
    CpuJob,
    ErrorReply,
    Message,
    Scope,
    Serve,
    StartStress,
    StatusReply,
    StatusRequest,
    StopStress,
    StopStressRequest,
    StressRequest,
    SubmitRequest,
    Tick,
    ToClient,
    decode,
    encode,
)
from vesta.transport.framing import CONTROL_MAX_FRAME, HEADER, frame, recv_frame
from vesta.transport.loop import IoLoop

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sock_path() -> Iterator[str]:
    path = f"/tmp/vestad-test-{secrets.token_hex(4)}.sock"
    yield path
    Path(path).unlink(missing_ok=True)


@dataclass
class Rig:
    """A serving Control actor and its probes."""

    ref: pykka.ActorRef[Any]
    path: str
    wiring: Wiring

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(self.path)
        return client

    def request(self, client: socket.socket, msg: Message) -> int:
        """Send a request and return the connection id the autopilot sees it under."""
        client.sendall(frame(encode(msg)))
        routed = self.wiring.autopilot.expect(ClientRequest, lambda m: m.request == msg)
        return routed.client


def read(client: socket.socket) -> Message:
    return decode(recv_frame(client, CONTROL_MAX_FRAME), Scope.CLIENT)


def closed_by_peer(client: socket.socket) -> bool:
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def rig(wiring: Wiring, sock_path: str) -> Iterator[Rig]:
    listener = open_control_socket(sock_path)
    loop = IoLoop()
    loop.start()
    ref = Control.start(wiring.counters, wiring.links, loop, listener, sock_path)
    ref.tell(Serve())
    yield Rig(ref, sock_path, wiring)
    with contextlib.suppress(pykka.ActorDeadError):
        ref.stop(timeout=10)
    loop.stop()


# -- the socket file -------------------------------------------------------------------------------


def test_the_socket_is_private_to_its_owner(rig: Rig) -> None:
    mode = os.stat(rig.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_a_live_socket_is_not_taken_over(sock_path: str) -> None:
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(sock_path)
    live.listen(1)
    try:
        with pytest.raises(ControlSocketError, match="already serving"):
            open_control_socket(sock_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(sock_path)  # the live listener still owns its path
    finally:
        live.close()


def test_a_dead_leftover_socket_is_replaced(sock_path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays behind, as after a crash
    os.chmod(sock_path, 0o644)

    listener = open_control_socket(sock_path)
    try:
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(sock_path)  # a dead socket would refuse this
    finally:
        listener.close()


def test_a_regular_file_is_never_removed(sock_path: str) -> None:
    Path(sock_path).write_text("precious")

    with pytest.raises(ControlSocketError, match="not a socket"):
        open_control_socket(sock_path)

    assert Path(sock_path).read_text() == "precious"


def test_stopping_the_actor_removes_the_socket(rig: Rig) -> None:
    client = rig.connect()
    rig.request(client, StatusRequest())

    rig.ref.stop(timeout=10)

    assert not os.path.exists(rig.path)
    assert closed_by_peer(client)
    client.close()


# -- routing ---------------------------------------------------------------------------------------


def test_requests_are_routed_and_replies_reach_the_client(rig: Rig) -> None:
    client = rig.connect()
    conn = rig.request(client, StatusRequest())

    rig.ref.tell(ToClient(conn, StatusReply({"answer": 42})))

    assert read(client) == StatusReply({"answer": 42})
    assert rig.request(client, SubmitRequest(CpuJob(1))) == conn
    client.sendall(frame(encode(StressRequest(1, 5.0))))
    assert rig.wiring.executor.expect(StartStress) == StartStress(conn, 1, 5.0)
    client.sendall(frame(encode(StopStressRequest())))
    assert rig.wiring.executor.expect(StopStress) == StopStress(conn)
    client.close()


def test_two_clients_get_their_own_replies(rig: Rig) -> None:
    first, second = rig.connect(), rig.connect()
    first_id = rig.request(first, StatusRequest())
    second_id = rig.request(second, SubmitRequest(CpuJob(2)))
    assert first_id != second_id

    rig.ref.tell(ToClient(second_id, StatusReply({"for": "second"})))
    rig.ref.tell(ToClient(first_id, StatusReply({"for": "first"})))

    assert read(first) == StatusReply({"for": "first"})
    assert read(second) == StatusReply({"for": "second"})


def test_closing_a_client_tells_the_autopilot(rig: Rig) -> None:
    client = rig.connect()
    conn = rig.request(client, StatusRequest())

    client.close()

    # only this client's: another program on the machine may probe the socket meanwhile
    assert rig.wiring.autopilot.expect(ClientGone, lambda m: m.client == conn) == ClientGone(conn)


# -- bad input -------------------------------------------------------------------------------------


def test_garbage_in_a_frame_is_answered_and_the_connection_stays(rig: Rig) -> None:
    client = rig.connect()
    client.sendall(frame(b"\xc1 this is not msgpack"))

    reply = read(client)

    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    assert rig.wiring.counters.get("bad_control_requests") == 1
    rig.request(client, StatusRequest())
    client.sendall(frame(encode(StressRequest(-1, 5.0))))  # decodes, but is out of range
    assert read(client).code == "bad_request"  # type: ignore[attr-defined]
    rig.wiring.autopilot.expect_none(
        ClientRequest, lambda m: not isinstance(m.request, StatusRequest), after=[rig.ref]
    )


@pytest.mark.parametrize("msg", [Tick(), CancelTask("t1"), StatusReply({})])
def test_a_message_that_is_not_a_request_is_answered_with_an_error(
    rig: Rig, msg: Message
) -> None:
    client = rig.connect()
    client.sendall(frame(encode(msg)))

    reply = read(client)

    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    assert msg.tag in reply.error
    assert rig.wiring.counters.get("bad_control_requests") == 1
    rig.request(client, StatusRequest())
    rig.wiring.autopilot.expect_none(
        ClientRequest, lambda m: not isinstance(m.request, StatusRequest), after=[rig.ref]
    )
    rig.wiring.executor.expect_none(object, after=[rig.ref])


def test_an_oversized_frame_is_answered_then_the_connection_closes(rig: Rig) -> None:
    client = rig.connect()
    client.sendall(HEADER.pack(CONTROL_MAX_FRAME + 1))

    reply = read(client)

    assert isinstance(reply, ErrorReply) and reply.code == "bad_frame"
    assert closed_by_peer(client)
    assert rig.wiring.counters.get("bad_control_requests") == 1
    rig.wiring.autopilot.expect(ClientGone)
    client.close()


def test_a_truncated_frame_then_close_harms_nobody(rig: Rig) -> None:
    broken = rig.connect()
    broken.sendall(HEADER.pack(100) + b"only a few bytes")
    broken.close()
    rig.wiring.autopilot.expect(ClientGone)

    client = rig.connect()
    conn = rig.request(client, StatusRequest())
    rig.ref.tell(ToClient(conn, StatusReply({"still": "serving"})))

    assert read(client) == StatusReply({"still": "serving"})
    assert rig.wiring.counters.get("actor_errors") == 0
    assert rig.ref.is_alive()


# -- permissions -----------------------------------------------------------------------------------

_OTHER_USER_CLIENT = textwrap.dedent("""
    import os, socket, sys
    os.setgid(65534)
    os.setuid(65534)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(sys.argv[1])
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    sys.stdout.buffer.write(data)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_a_client_of_another_user_is_refused(rig: Rig) -> None:
    os.chmod(rig.path, 0o666)  # let the other user reach the socket; the daemon must still refuse

    result = subprocess.run(
        [sys.executable, "-I", "-c", _OTHER_USER_CLIENT, rig.path], capture_output=True,
        timeout=20, check=False,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    (size,) = HEADER.unpack_from(result.stdout)
    assert len(result.stdout) == HEADER.size + size, "one frame, then the connection closed"
    reply = decode(result.stdout[HEADER.size:], Scope.CLIENT)
    assert isinstance(reply, ErrorReply) and reply.code == "forbidden"
    assert rig.wiring.counters.get("refused_control_clients") == 1
    own = rig.connect()  # the owner is still served
    assert rig.request(own, StatusRequest())
    rig.wiring.autopilot.expect_none(ClientRequest, lambda m: m.request != StatusRequest(),
                                     after=[rig.ref])
    own.close()
