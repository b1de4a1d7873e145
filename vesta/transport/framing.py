"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

Used as is on the control socket and, sealed, between peers. The decoder refuses a frame larger than
its cap before reading it, so a garbage length cannot make the daemon allocate gigabytes.
Imported by the CLI: standard library only.
"""

from __future__ import annotations

import struct
from typing import Protocol


class Socket(Protocol):
    """What :func:`recv_frame` needs of a socket (``socket.socket`` and ``_socket.socket``)."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0, /) -> int: ...

HEADER = struct.Struct("!I")
#: The largest frame the control socket accepts or sends.
CONTROL_MAX_FRAME = 1 << 20


class FrameError(ValueError):
    """A frame that is too large, or a stream that ended inside one."""


def frame(payload: bytes) -> bytes:
    """One frame carrying ``payload``."""
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Cuts a byte stream into frames. Feed it what arrives; it returns the complete frames."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self.max_size:
                raise FrameError(f"a frame of {size} bytes is over the {self.max_size}-byte limit")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[HEADER.size:end]))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def recv_frame(sock: Socket, max_size: int) -> bytes:
    """Read one frame from a blocking socket; raises FrameError or EOFError."""
    (size,) = HEADER.unpack(_recv_exactly(sock, HEADER.size))
    if size > max_size:
        raise FrameError(f"a frame of {size} bytes is over the {max_size}-byte limit")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: Socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the connection closed")
        got += n
    return bytes(buf)
