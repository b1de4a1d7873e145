"""The selector core: frames in, replies out, a client that never reads is dropped, large frames
and outbound connections."""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from vesta.transport.framing import frame
from vesta.transport.loop import Channel, Conn, IoLoop


class Echo(Channel):
    """Answers every frame with 1000 bytes; remembers what it saw."""

    max_frame = 1 << 16

    def __init__(self, loop: IoLoop, gone: list[int], lock: threading.Lock) -> None:
        self.loop, self.gone, self.lock = loop, gone, lock

    def frame(self, conn: Conn, body: memoryview) -> None:
        self.loop.send(conn.conn_id, b"r" * 1000)

    def closed(self, conn: Conn, reason: str) -> None:
        with self.lock:
            self.gone.append(conn.conn_id)


@pytest.fixture
def echo() -> Iterator[tuple[IoLoop, str, list[int]]]:
    """A loop that answers every frame with 1000 bytes and allows 20,000 queued per client."""
    path = f"/tmp/vesta-test-loop-{secrets.token_hex(3)}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    closed: list[int] = []
    lock = threading.Lock()

    loop = IoLoop(max_queued=20_000)
    loop.start()
    loop.listen(listener, lambda sock, address: Echo(loop, closed, lock))
    yield loop, path, closed
    loop.stop()
    listener.close()
    Path(path).unlink(missing_ok=True)


def test_replies_come_back(echo: tuple[IoLoop, str, list[int]]) -> None:
    _, path, _ = echo
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(frame(b"ping"))
        got = b""
        while len(got) < 1004:
            got += client.recv(4096)
        assert got == frame(b"r" * 1000)


def test_a_client_that_never_reads_is_dropped(echo: tuple[IoLoop, str, list[int]]) -> None:
    _, path, closed = echo
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(path)
        # far more replies than the kernel buffers and the 20,000-byte cap can hold
        client.sendall(frame(b"ping") * 2000)
        wait_for(lambda: closed, timeout=10, what="the loop to drop the client")
        received = 0
        while chunk := client.recv(65536):
            received += len(chunk)
        assert received < 2000 * 1004  # the rest was never queued


class Recorder(Channel):
    """Keeps every frame, what closed it and whether it opened; sends a greeting on open."""

    def __init__(self, max_frame: int, greeting: bytes = b"") -> None:
        self.max_frame = max_frame
        self.greeting = greeting
        self.frames: list[bytes] = []
        self.reasons: list[str] = []
        self.errors: list[str] = []
        self.loop: IoLoop | None = None

    def opened(self, conn: Conn) -> None:
        if self.greeting and self.loop is not None:
            self.loop.send(conn.conn_id, self.greeting)

    def frame(self, conn: Conn, body: memoryview) -> None:
        self.frames.append(bytes(body))

    def too_large(self, conn: Conn, error: str) -> None:
        self.errors.append(error)

    def closed(self, conn: Conn, reason: str) -> None:
        self.reasons.append(reason)


@pytest.fixture
def loop() -> Iterator[IoLoop]:
    io = IoLoop()
    io.start()
    yield io
    io.stop()


def _tcp_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener


def test_outbound_connect_carries_large_frames_both_ways(loop: IoLoop) -> None:
    big = secrets.token_bytes(3 << 20)
    server = Recorder(4 << 20)
    listener = _tcp_listener()
    accepted: list[int] = []

    def accept(sock: socket.socket, address: object) -> Channel:
        server.loop = loop
        return server

    loop.listen(listener, accept)
    client = Recorder(4 << 20, greeting=big)
    client.loop = loop
    conn_id = loop.connect(listener.getsockname(), client)
    wait_for(lambda: server.frames, timeout=10, what="the large frame to arrive")
    assert server.frames == [big]
    assert loop.send(conn_id, b"small")
    wait_for(lambda: len(server.frames) == 2, timeout=10, what="the small frame")
    assert server.frames[1] == b"small"
    accepted.extend(c.conn_id for c in loop.connections() if c.channel is server)
    assert loop.send(accepted[0], big[:1000] * 5)
    wait_for(lambda: client.frames, timeout=10, what="the answer")
    assert client.frames == [big[:1000] * 5]
    listener.close()


def test_a_frame_over_the_cap_is_reported_and_the_connection_closes(loop: IoLoop) -> None:
    server = Recorder(1000)
    listener = _tcp_listener()
    loop.listen(listener, lambda sock, address: server)
    with socket.create_connection(listener.getsockname(), timeout=10) as client:
        client.sendall(frame(b"x" * 10) + frame(b"y" * 1001))
        assert client.recv(10) == b""  # closed by the loop
    wait_for(lambda: server.reasons, timeout=10, what="the close")
    assert server.frames == [b"x" * 10]
    assert "1001 bytes is over the 1000-byte limit" in server.errors[0]
    listener.close()


def test_connecting_to_a_closed_port_says_why(loop: IoLoop) -> None:
    listener = _tcp_listener()
    address = listener.getsockname()
    listener.close()
    client = Recorder(1000)
    loop.connect(address, client)
    wait_for(lambda: client.reasons, timeout=10, what="the failed connect")
    assert "ECONNREFUSED" in client.reasons[0]


def test_timers_and_calls_run_in_the_loop_thread(loop: IoLoop) -> None:
    seen: list[str] = []
    loop.call_later(0.05, lambda: seen.append(threading.current_thread().name))
    loop.call(lambda: seen.append("now"))
    wait_for(lambda: len(seen) == 2, timeout=10, what="the timer")
    assert seen == ["now", loop.name]


def _linked(loop: IoLoop, max_frame: int = 4 << 20) -> tuple[Recorder, Recorder, int]:
    """A server and a client channel on one loop, connected; the client's connection id."""
    server = Recorder(max_frame)
    listener = _tcp_listener()
    loop.listen(listener, lambda sock, address: server)
    client = Recorder(max_frame)
    opened = threading.Event()
    client.opened = lambda conn: opened.set()  # type: ignore[method-assign]
    conn_id = loop.connect(listener.getsockname(), client)
    assert opened.wait(10), "the connection did not open"
    loop.unlisten(listener)
    listener.close()
    return server, client, conn_id


def test_frames_queued_together_arrive_in_order_each_reported_written(loop: IoLoop) -> None:
    """Frames of every size, queued faster than they are written, go out in batches: each
    frame's written-callback comes in order, and only once all of it is in the socket."""
    server, _client, conn_id = _linked(loop)
    sizes = [0, 1, 100, 65_536, 1 << 20, 3, 300_000, 7] * 8
    payloads = [secrets.token_bytes(size) for size in sizes]
    written: list[int] = []
    for i, payload in enumerate(payloads):
        assert loop.send(conn_id, payload, plain=i % 2 == 0,
                         written=lambda i=i: written.append(i))  # type: ignore[misc]
    wait_for(lambda: len(server.frames) == len(payloads), timeout=20, what="every frame")
    assert server.frames == payloads
    assert written == list(range(len(payloads)))


def test_an_empty_frame_is_written_and_the_loop_goes_on(loop: IoLoop) -> None:
    server, _client, conn_id = _linked(loop)
    for payload in (b"", b"after"):
        assert loop.send(conn_id, payload, plain=True)
    wait_for(lambda: len(server.frames) == 2, timeout=10, what="both frames")
    assert server.frames == [b"", b"after"]
    conn = next(c for c in loop.connections() if c.conn_id == conn_id)
    wait_for(lambda: not conn.pending, timeout=10, what="nothing left to write")


def test_a_buffer_grown_for_large_frames_shrinks_once_they_stop(
        loop: IoLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    from vesta.transport import loop as loop_module
    monkeypatch.setattr(loop_module, "KEEP_GROWN_S", 0.0)
    server, _client, conn_id = _linked(loop)
    big = secrets.token_bytes(3 << 20)
    assert loop.send(conn_id, big)
    wait_for(lambda: server.frames, timeout=10, what="the large frame")
    (accepted,) = [c for c in loop.connections() if c.channel is server]
    assert server.frames == [big]
    assert loop.send(conn_id, b"small")
    wait_for(lambda: len(server.frames) == 2, timeout=10, what="the small frame")
    wait_for(lambda: len(accepted.buffer) == loop_module.READ_BUFFER, timeout=10,
             what="the buffer to shrink back")
    assert server.frames[1] == b"small"


def test_frames_sent_together_arrive_in_order_each_reported_written(loop: IoLoop) -> None:
    """send_all writes several frames in one go where the socket takes them; what it does not
    take (a megabyte does not fit) goes out from the loop, and each callback comes in order."""
    server, _client, conn_id = _linked(loop)
    payloads = [b"accepted", b"started", secrets.token_bytes(1 << 20), b"", b"done"]
    written: list[int] = []
    assert loop.send_all(conn_id, [(payload, lambda i=i: written.append(i))  # type: ignore[misc]
                                   for i, payload in enumerate(payloads)])
    assert loop.send(conn_id, b"after")
    wait_for(lambda: len(server.frames) == len(payloads) + 1, timeout=10, what="every frame")
    assert server.frames == [*payloads, b"after"]
    wait_for(lambda: len(written) == len(payloads), timeout=10, what="every callback")
    assert written == list(range(len(payloads)))
