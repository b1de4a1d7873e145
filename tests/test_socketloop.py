"""The socket loop: frames in, replies out, and a client that never reads is dropped."""

from __future__ import annotations

import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from vesta.transport.framing import frame
from vesta.transport.socketloop import SocketLoop


@pytest.fixture
def echo() -> Iterator[tuple[SocketLoop, str, list[int]]]:
    """A loop that answers every frame with 1000 bytes and allows 20,000 queued per client."""
    path = f"/tmp/vesta-test-loop-{secrets.token_hex(3)}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    closed: list[int] = []
    lock = threading.Lock()

    def on_close(conn_id: int) -> None:
        with lock:
            closed.append(conn_id)

    loop = SocketLoop(listener, 1 << 16, on_open=lambda c, s: True,
                      on_frame=lambda c, p: loop.send(c, b"r" * 1000),
                      on_bad_frame=lambda c, e: None, on_close=on_close, max_queued=20_000)
    loop.start()
    yield loop, path, closed
    loop.stop()
    listener.close()
    Path(path).unlink(missing_ok=True)


def test_replies_come_back(echo: tuple[SocketLoop, str, list[int]]) -> None:
    _, path, _ = echo
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(frame(b"ping"))
        got = b""
        while len(got) < 1004:
            got += client.recv(4096)
        assert got == frame(b"r" * 1000)


def test_a_client_that_never_reads_is_dropped(echo: tuple[SocketLoop, str, list[int]]) -> None:
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
