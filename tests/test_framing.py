"""Tests for vesta.transport.framing: the decoder over any chunking; recv_frame on real sockets."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta.transport.framing import HEADER, FrameDecoder, FrameError, frame, recv_frame

PAYLOADS = [b"hello", b"", b"\x00" * 3, bytes(range(256)), b"x"]
STREAM = b"".join(frame(p) for p in PAYLOADS)


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames += decoder.feed(chunk)
    return frames


def test_frame_is_a_big_endian_length_and_the_payload() -> None:
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert HEADER.size == 4


def test_whole_stream_at_once() -> None:
    decoder = FrameDecoder(max_size=1024)
    assert decoder.feed(STREAM) == PAYLOADS
    assert decoder.pending == 0


def test_stream_cut_anywhere_decodes_the_same() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder(max_size=1024)
        assert feed_all(decoder, [STREAM[:cut], STREAM[cut:]]) == PAYLOADS, f"cut at {cut}"
        assert decoder.pending == 0


def test_stream_cut_at_any_two_places_decodes_the_same() -> None:
    payloads = [b"hello", b"", b"ab"]
    stream = b"".join(frame(p) for p in payloads)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            decoder = FrameDecoder(max_size=16)
            chunks = [stream[:i], stream[i:j], stream[j:]]
            assert feed_all(decoder, chunks) == payloads, f"cut at {i} and {j}"
            assert decoder.pending == 0


def test_stream_split_at_every_byte_boundary_at_once() -> None:
    decoder = FrameDecoder(max_size=1024)
    assert feed_all(decoder, [STREAM[i : i + 1] for i in range(len(STREAM))]) == PAYLOADS
    assert decoder.pending == 0


def test_incomplete_frame_is_held_back() -> None:
    decoder = FrameDecoder(max_size=1024)
    assert decoder.feed(frame(b"first") + frame(b"second")[:7]) == [b"first"]
    assert decoder.pending == 7
    assert decoder.feed(b"ond") == [b"second"]
    assert decoder.pending == 0


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_size=8)
    assert decoder.feed(frame(b"12345678")) == [b"12345678"]


def test_oversized_length_is_refused_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_size=8)
    assert decoder.feed(HEADER.pack(9)[:3]) == []
    with pytest.raises(FrameError, match="9 bytes is over the 8-byte limit"):
        decoder.feed(HEADER.pack(9)[3:])


def test_garbage_length_is_refused_after_good_frames() -> None:
    decoder = FrameDecoder(max_size=1 << 20)
    with pytest.raises(FrameError, match="4294967295 bytes"):
        decoder.feed(frame(b"ok") + b"\xff\xff\xff\xff")


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points."""
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_frames_survive_any_chunking(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(frame(p) for p in payloads)
    decoder = FrameDecoder(max_size=40)
    assert feed_all(decoder, data.draw(chunked(stream), label="chunks")) == payloads
    assert decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=64), st.data())
def test_arbitrary_bytes_raise_only_frame_error(
    garbage: bytes, max_size: int, data: st.DataObject
) -> None:
    decoder = FrameDecoder(max_size=max_size)
    fed = 0
    frames: list[bytes] = []
    try:
        for chunk in data.draw(chunked(garbage), label="chunks"):
            frames += decoder.feed(chunk)
            fed += len(chunk)
    except FrameError as exc:
        assert "limit" in str(exc)
        return
    assert all(len(f) <= max_size for f in frames)
    assert fed == len(garbage)
    assert sum(HEADER.size + len(f) for f in frames) + decoder.pending == len(garbage)


# -- recv_frame on a real socket pair -----------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.settimeout(5)  # a wrong read blocks; fail the test instead of hanging it
    yield a, b
    a.close()
    b.close()


def test_recv_one_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(frame(b"payload") + frame(b"") + frame(b"next"))
    assert recv_frame(b, 1024) == b"payload"
    assert recv_frame(b, 1024) == b""
    assert recv_frame(b, 1024) == b"next"


def test_recv_a_frame_larger_than_one_read(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    body = bytes(range(256)) * 2048  # 512 KiB: more than the socket buffer holds at once
    sender = _send_in_thread(a, frame(body))
    assert recv_frame(b, 1 << 20) == body
    sender.join(5)
    assert not sender.is_alive()


def _send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


def test_eof_mid_frame(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(HEADER.pack(10) + b"abc")
    a.close()
    with pytest.raises(EOFError):
        recv_frame(b, 1024)


def test_eof_mid_header(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"\x00\x00")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        recv_frame(b, 1024)


def test_eof_between_frames(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(frame(b"last"))
    a.shutdown(socket.SHUT_WR)
    assert recv_frame(b, 1024) == b"last"
    with pytest.raises(EOFError):
        recv_frame(b, 1024)


def test_oversized_frame_is_refused_without_waiting_for_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(HEADER.pack(1025))  # the header only: reading the body would time out
    with pytest.raises(FrameError, match="1025 bytes is over the 1024-byte limit"):
        recv_frame(b, 1024)
