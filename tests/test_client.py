"""The client: which control socket it picks, and that it talks only to a daemon of its own user."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vesta import client
from vesta.client import Client, DaemonUnreachable, ForeignDaemon, UsageError, find_socket, probe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sock_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory of its own for control sockets (short: a socket path has at most 107 bytes),
    searched instead of /tmp."""
    path = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))
    monkeypatch.setattr(client, "SOCKET_GLOB", str(path / "vestad-*.sock"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listening(path: Path) -> socket.socket:
    """A socket that answers a connect on ``path``, as a live daemon's does."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    return server


def stale(path: Path) -> Path:
    """A socket file nothing listens on, as a daemon killed with ``kill -9`` leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    return path


def test_probe_tells_a_live_socket_from_a_stale_one(sock_dir: Path) -> None:
    with listening(sock_dir / "vestad-live.sock"):
        assert probe(str(sock_dir / "vestad-live.sock")) == ""
    assert probe(str(stale(sock_dir / "vestad-dead.sock"))) == "stale: nothing answers"
    assert probe(str(sock_dir / "vestad-none.sock")) == "gone"


def test_the_only_live_socket_is_picked_among_stale_ones(sock_dir: Path) -> None:
    stale(sock_dir / "vestad-a.sock")
    stale(sock_dir / "vestad-c.sock")
    with listening(sock_dir / "vestad-b.sock"):
        assert find_socket(env={}) == str(sock_dir / "vestad-b.sock")


def test_a_stale_socket_alone_is_no_daemon(sock_dir: Path) -> None:
    dead = stale(sock_dir / "vestad-x.sock")
    with pytest.raises(DaemonUnreachable) as caught:
        find_socket(env={})
    assert f"{dead} (stale: nothing answers)" in str(caught.value)
    assert caught.value.exit_code == 3


def test_several_live_sockets_are_named_and_stale_ones_marked(sock_dir: Path) -> None:
    dead = stale(sock_dir / "vestad-old.sock")
    with (listening(sock_dir / "vestad-desk.sock"), listening(sock_dir / "vestad-lab.sock"),
          pytest.raises(UsageError) as caught):
        find_socket(env={})
    text = str(caught.value)
    assert "(desk, lab)" in text
    assert f"{dead} (stale: nothing answers)" in text
    assert caught.value.exit_code == 2


def test_an_explicit_socket_or_node_is_not_probed(sock_dir: Path) -> None:
    dead = str(stale(sock_dir / "vestad-x.sock"))
    assert find_socket(path=dead, env={}) == dead
    assert find_socket(env={"VESTA_SOCKET": dead}) == dead
    assert find_socket(env={"VESTA_NODE": "my box"}) == "/tmp/vestad-my-box.sock"


def test_connecting_to_a_stale_socket_says_so(sock_dir: Path) -> None:
    dead = stale(sock_dir / "vestad-x.sock")
    with pytest.raises(DaemonUnreachable, match="nothing answers there"):
        Client(str(dead), timeout=2)


def test_a_socket_of_another_user_is_refused_before_anything_is_sent(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sock_dir / "vestad-planted.sock"
    with listening(path) as server:
        server.settimeout(5)
        me = os.geteuid()
        monkeypatch.setattr(client.os, "geteuid", lambda: me + 1)  # as if we were someone else
        with pytest.raises(ForeignDaemon) as caught:
            Client(str(path), timeout=2)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(1) == b""  # closed without a byte sent
        assert caught.value.exit_code == 3
        assert f"runs as uid {me}" in str(caught.value)
        assert probe(str(path)) == f"another user's: uid {me}"
        with pytest.raises(DaemonUnreachable, match="another user's"):
            find_socket(env={})
