"""A selector thread that serves a listening socket: accepts, reads frames, writes without blocking.

Actors must not block on sockets, so one :class:`SocketLoop` thread owns the listener and every
connection. What arrives is handed to callbacks (which ``tell`` an actor); what an actor sends is
queued with :meth:`SocketLoop.send` from any thread and written when the socket is writable. A
client that stops reading is dropped once its queue passes a cap, so it cannot make the daemon
hoard memory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from vesta.transport.framing import FrameDecoder, FrameError, frame

logger = logging.getLogger(__name__)

#: Queued output beyond which a connection that does not read is dropped.
MAX_QUEUED_BYTES = 64 << 20


@dataclass
class _Conn:
    conn_id: int
    sock: socket.socket
    decoder: FrameDecoder
    out: deque[memoryview] = field(default_factory=deque)
    queued: int = 0
    closing: bool = False  # close once the queue is written


class SocketLoop(threading.Thread):
    """Serves ``listener``. Callbacks run in this thread and must return quickly.

    - ``on_open(conn_id, sock)`` returns False to refuse the connection;
    - ``on_frame(conn_id, payload)`` for every complete frame;
    - ``on_bad_frame(conn_id, error)`` for an oversized frame (the connection is then closed);
    - ``on_close(conn_id)`` once a connection is gone, whoever closed it.
    """

    def __init__(
        self,
        listener: socket.socket,
        max_frame: int,
        on_open: Callable[[int, socket.socket], bool],
        on_frame: Callable[[int, bytes], None],
        on_bad_frame: Callable[[int, str], None],
        on_close: Callable[[int], None],
        name: str = "vesta-socketloop",
        max_queued: int = MAX_QUEUED_BYTES,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.listener = listener
        self.max_frame = max_frame
        self.max_queued = max_queued
        self.on_open, self.on_frame = on_open, on_frame
        self.on_bad_frame, self.on_close = on_bad_frame, on_close
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False

    # -- any thread --------------------------------------------------------------------------------

    def send(self, conn_id: int, payload: bytes, close_after: bool = False) -> None:
        """Queue one frame for a connection (ignored if it is gone)."""
        data = frame(payload)
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None or conn.closing:
                return
            if conn.queued + len(data) > self.max_queued:
                logger.warning("connection %d does not read its replies; dropping it", conn_id)
                conn.out.clear()
                conn.queued = 0
                conn.closing = True
            else:
                conn.out.append(memoryview(data))
                conn.queued += len(data)
                conn.closing = close_after
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close every connection."""
        self._stopping = True
        self._wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the thread --------------------------------------------------------------------------------

    def run(self) -> None:
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                try:
                    self._round()
                except Exception:  # one bad round must not leave the daemon deaf
                    logger.exception("the socket loop hit an error; it goes on")
                    self._wake_r.settimeout(0.1)  # and does not spin if the error repeats
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    self._wake_r.setblocking(False)
        finally:
            self._flush_all(deadline=1.0)
            for conn_id in list(self._conns):
                self._drop(conn_id)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _round(self) -> None:
        self._update_interest()
        for key, events in self._selector.select():
            if key.data == "listen":
                self._accept()
            elif key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            else:
                self._serve(key.data, events)

    def _flush_all(self, deadline: float) -> None:
        """On stop: give every client what is queued for it, within ``deadline`` seconds each."""
        for conn in list(self._conns.values()):
            with self._lock:
                chunks, conn.out = list(conn.out), deque()
            try:
                conn.sock.settimeout(deadline)
                for chunk in chunks:
                    conn.sock.sendall(chunk)
            except OSError:
                continue

    def _update_interest(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            if conn.closing and not conn.out:
                self._drop(conn.conn_id)
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            if self._selector.get_key(conn.sock).events != events:
                self._selector.modify(conn.sock, events, conn.conn_id)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors, and the like: keep serving the others
            logger.warning("accept failed: %s", exc)
            return
        conn_id = next(self._ids)
        try:
            accepted = self.on_open(conn_id, sock)
        except Exception:
            logger.exception("on_open failed")
            accepted = False
        if not accepted:
            sock.close()
            return
        sock.setblocking(False)
        with self._lock:
            self._conns[conn_id] = _Conn(conn_id, sock, FrameDecoder(self.max_frame))
        self._selector.register(sock, selectors.EVENT_READ, conn_id)

    def _serve(self, conn_id: int, events: int) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        if events & selectors.EVENT_WRITE and not self._write(conn):
            return
        if events & selectors.EVENT_READ:
            self._read(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn.conn_id)
            return
        if conn.closing:
            return  # what a closing client still sends is not read any more
        try:
            frames = conn.decoder.feed(data)
        except FrameError as exc:
            self.on_bad_frame(conn.conn_id, str(exc))
            conn.closing = True
            return
        for payload in frames:
            self.on_frame(conn.conn_id, payload)

    def _write(self, conn: _Conn) -> bool:
        """Write what the socket takes; False if the connection was dropped."""
        while True:
            with self._lock:
                if not conn.out:
                    return True
                chunk = conn.out[0]
            try:
                n = conn.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._drop(conn.conn_id)
                return False
            with self._lock:
                conn.queued -= n
                if n == len(chunk):
                    conn.out.popleft()
                else:
                    conn.out[0] = chunk[n:]

    def _drop(self, conn_id: int) -> None:
        with self._lock:
            conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        try:
            self.on_close(conn_id)
        except Exception:
            logger.exception("on_close failed")
