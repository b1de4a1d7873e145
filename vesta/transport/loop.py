"""The selector core: one thread that owns every socket of the daemon and the timers around them.

Actors must not block on sockets, so one :class:`IoLoop` thread serves the control socket, the peer
listener, outbound peer connections and the discovery datagrams. Each stream connection carries
length-prefixed frames and has a :class:`Channel`, a small protocol object that holds its framing
limits, its handshake and cipher state and what to do with what arrives: frames are opened and
sealed here, off the actors' threads. What an actor sends is queued with :meth:`IoLoop.send` from
any thread and written (sealed at that moment, so counter nonces stay in order) when the socket
is writable. A connection whose queue passes a cap is dropped, so a client or peer that stops
reading cannot make the daemon hoard memory. Reads go into a buffer reused across frames: it
grows to hold a large frame and stays grown while large frames keep coming (a fresh megabyte
costs more in page faults than sealing it), and shrinks back once they stop.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import mmap
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vesta.transport.framing import HEADER, FrameError

logger = logging.getLogger(__name__)

#: Queued output beyond which a connection that does not read is dropped.
MAX_QUEUED_BYTES = 64 << 20
#: A connection's read buffer: frames up to this size (and several smaller ones) fit in it.
#: Its pages are mapped as they are first written: a connection of small messages uses one.
READ_BUFFER = 1 << 20
#: Reads in a row while each fills the buffer, before the loop serves the others again.
DRAIN_READS = 4
#: Seconds a read buffer grown for a large frame is kept after the last one.
KEEP_GROWN_S = 2.0
#: Queued frames are wrapped and written together up to this many bytes (one ``sendmsg``).
WRITE_BATCH = 1 << 20
#: ... and this many frames (two buffers each; the kernel takes at most 1024 per call).
WRITE_BATCH_FRAMES = 64


class Channel:
    """The protocol of one connection. The loop calls these in its own thread; they must not block.

    The base class is a plain frame channel: ``deliver`` gets every frame's payload.
    """

    max_frame: int = 1 << 20

    def opened(self, conn: Conn) -> None:
        """The connection is established (accepted, or an outbound connect completed)."""

    def frame(self, conn: Conn, body: memoryview) -> None:
        """A complete frame arrived; ``body`` is valid only during the call."""
        raise NotImplementedError

    def wrap(self, payload: bytes) -> list[bytes]:
        """What to write for one queued payload: the header and the body."""
        return _plain_frame(payload)

    def too_large(self, conn: Conn, error: str) -> None:
        """A frame over :attr:`max_frame` was announced; the connection closes after this."""

    def closed(self, conn: Conn, reason: str) -> None:
        """The connection is gone, whoever closed it."""


class Conn:
    """One stream connection as the loop and its channel see it."""

    def __init__(self, conn_id: int, sock: socket.socket, channel: Channel,
                 peer: Any = None) -> None:
        self.conn_id = conn_id
        self.sock = sock
        self.channel = channel
        self.peer = peer  # the remote address
        self.connecting = False
        self.out: deque[tuple[bytes, bool, Callable[[], object] | None]] = deque()  # not wrapped
        self.pending: deque[memoryview] = deque()  # wrapped bytes not yet fully written
        self.pending_bytes = 0
        # the callbacks of wrapped frames: each with the byte count in ``pending`` once it is out
        self.written: deque[tuple[int, Callable[[], object]]] = deque()
        self.write_lock = threading.Lock()  # held by whichever thread writes to the socket
        self.queued = 0
        self.closing = False  # close once the queue is written
        self.stuck = False  # it stopped reading: drop it at once
        self.retiring = False  # once the queue is written, end our side; read until theirs ends
        self.write_shut = False
        self.eof = False  # the other side ended its side
        self.last_received = time.monotonic()
        self.last_sent = time.monotonic()
        self.buffer = _buffer(READ_BUFFER)
        self.filled = 0
        self.grown_at = 0.0  # when the buffer last grew, or was found too small


class IoLoop(threading.Thread):
    """The daemon's one socket thread. Every public method may be called from any thread."""

    def __init__(self, name: str = "vesta-io", max_queued: int = MAX_QUEUED_BYTES) -> None:
        super().__init__(name=name, daemon=True)
        self.max_queued = max_queued
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, Conn] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: deque[Callable[[], object]] = deque()  # run in the loop thread
        self._timers: list[tuple[float, int, Callable[[], object]]] = []
        self._timer_ids = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False  # a wake-up byte is on its way: a burst of sends needs only one
        self._stopping = False

    # -- any thread --------------------------------------------------------------------------------

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the loop thread, soon."""
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` in the loop thread after ``delay`` seconds."""
        self.call(lambda: heapq.heappush(
            self._timers, (time.monotonic() + delay, next(self._timer_ids), fn)))

    def listen(self, sock: socket.socket, accept: Callable[[socket.socket, Any], Channel | None],
               ) -> None:
        """Serve a listening socket: ``accept(sock, address)`` returns the new connection's
        channel, or None to refuse it."""
        sock.setblocking(False)
        self.call(lambda: self._selector.register(sock, selectors.EVENT_READ, ("listen", accept)))

    def unlisten(self, sock: socket.socket) -> None:
        """Stop serving a listening or datagram socket (the caller closes it)."""
        def forget() -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        self.call(forget)

    def datagrams(self, sock: socket.socket, receive: Callable[[socket.socket], None]) -> None:
        """Call ``receive(sock)`` whenever a datagram socket is readable."""
        sock.setblocking(False)
        self.call(lambda: self._selector.register(sock, selectors.EVENT_READ, ("dgram", receive)))

    def connect(self, address: tuple[str, int], channel: Channel) -> int:
        """Open an outbound TCP connection; the channel hears ``opened`` or ``closed``."""
        conn_id = next(self._ids)
        self.call(lambda: self._connect(conn_id, address, channel))
        return conn_id

    def send(self, conn_id: int, payload: bytes, close_after: bool = False,
             plain: bool = False, written: Callable[[], object] | None = None) -> bool:
        """Queue one frame's payload for a connection; False if it is gone or was dropped.

        The channel wraps (seals) it when it is written; ``plain`` frames it as it is (a handshake
        message that is already sealed, say). ``written`` is called once the whole frame is in
        the socket, in the thread that wrote it: the sender's flow control hangs on it.

        When nothing is waiting to be written on the connection, the calling thread writes the
        frame itself, at once: a reply or a small message then costs no wake-up of the loop's
        thread, which on a busy core is a wait of its own. What the socket does not take is left
        to the loop, in order.
        """
        return self._send(conn_id, [(payload, plain, written)], close_after)

    def send_all(self, conn_id: int,
                 frames: list[tuple[bytes, Callable[[], object] | None]]) -> bool:
        """Queue several frames (payload, written-callback) at once, as :meth:`send` would one
        by one, but written together: one system call, one wake-up of whoever reads them."""
        return self._send(conn_id, [(payload, False, written) for payload, written in frames])

    def _send(self, conn_id: int, frames: list[_Frame], close_after: bool = False) -> bool:
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None or conn.closing or conn.retiring:
                return False
        if not close_after and not conn.connecting and conn.write_lock.acquire(blocking=False):
            try:
                with self._lock:
                    idle = (not conn.out and not conn.pending and not conn.closing
                            and not conn.retiring and conn_id in self._conns)
                if idle and self._write_now(conn, frames):
                    return True
            finally:
                conn.write_lock.release()
        size = sum(len(payload) for payload, _plain, _written in frames)
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is None or conn.closing or conn.retiring:
                return False
            if conn.queued + size > self.max_queued:
                logger.warning("connection %d does not read what it is sent; dropping it", conn_id)
                conn.out.clear()
                conn.queued = 0
                conn.closing = conn.stuck = True  # dropped now: what is pending never goes
                ok = False
            else:
                conn.out.extend(frames)
                conn.queued += size
                conn.closing = close_after
                ok = True
        self._wake()
        return ok

    def close(self, conn_id: int) -> None:
        """Close a connection once what is queued for it is written."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.closing = True
        self._wake()

    def retire(self, conn_id: int) -> None:
        """End our side of a connection once what is queued is written, and go on reading (and
        handing over) what the other side still sends until it ends its side too."""
        with self._lock:
            conn = self._conns.get(conn_id)
            if conn is not None:
                conn.retiring = True
        self._wake()

    def connections(self) -> list[Conn]:
        with self._lock:
            return list(self._conns.values())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close every connection."""
        self._stopping = True
        self._wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the thread --------------------------------------------------------------------------------

    def run(self) -> None:
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        try:
            while not self._stopping:
                try:
                    self._round()
                except Exception:  # one bad round must not leave the daemon deaf
                    logger.exception("the socket loop hit an error; it goes on")
                    time.sleep(0.1)  # and does not spin if the error repeats
        finally:
            self._flush_all(deadline=1.0)
            for conn_id in list(self._conns):
                self._drop(conn_id, "the daemon is stopping")
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _round(self) -> None:
        self._run_calls()
        self._run_timers()
        self._update_interest()
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, events in self._selector.select(timeout):
            kind, data = key.data
            if kind == "wake":
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
                self._woken = False  # before this round looks at the queues: none is missed
            elif kind == "listen":
                self._accept(key.fileobj, data)  # type: ignore[arg-type]
            elif kind == "dgram":
                data(key.fileobj)
            else:
                self._serve(data, events)

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                logger.exception("a socket loop call failed")

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _when, _n, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                logger.exception("a socket loop timer failed")

    def _flush_all(self, deadline: float) -> None:
        """On stop: write what is queued for every connection, within ``deadline`` seconds each."""
        for conn in list(self._conns.values()):
            if conn.connecting or not conn.write_lock.acquire(timeout=deadline):
                continue
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(deadline)
                for chunk in self._take_output(conn):
                    conn.sock.sendall(chunk)
            except (OSError, ValueError):
                continue
            finally:
                conn.write_lock.release()

    def _take_output(self, conn: Conn) -> list[bytes | memoryview]:
        with self._lock:
            payloads, conn.out = list(conn.out), deque()
            conn.queued = 0
        chunks: list[bytes | memoryview] = list(conn.pending)
        conn.pending.clear()
        conn.pending_bytes = 0
        for payload, plain, _written in payloads:
            chunks += _plain_frame(payload) if plain else conn.channel.wrap(payload)
        return chunks

    def _update_interest(self) -> None:
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            if conn.connecting:
                continue
            if conn.stuck:
                self._drop(conn.conn_id, "it does not read what it is sent")
                continue
            if conn.closing and not conn.out and not conn.pending:
                self._drop(conn.conn_id,
                           "the other side closed the connection" if conn.eof else "closed")
                continue
            if conn.retiring and not conn.write_shut and not conn.out and not conn.pending:
                conn.write_shut = True
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_WR)
            writing = conn.out or conn.pending
            events = (0 if conn.eof else selectors.EVENT_READ) | (
                selectors.EVENT_WRITE if writing else 0)
            if self._selector.get_key(conn.sock).events != events:
                self._selector.modify(conn.sock, events, ("conn", conn.conn_id))

    def _accept(self, listener: socket.socket,
                accept: Callable[[socket.socket, Any], Channel | None]) -> None:
        for _ in range(64):  # a burst of connections is taken in one round
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, and the like: keep serving the others
                logger.warning("accept failed: %s", exc)
                return
            try:
                channel = accept(sock, address)
            except Exception:
                logger.exception("accepting a connection failed")
                channel = None
            if channel is None:
                sock.close()
                continue
            self._add(next(self._ids), sock, channel, address)

    def _add(self, conn_id: int, sock: socket.socket, channel: Channel, peer: Any,
             connecting: bool = False) -> Conn:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(conn_id, sock, channel, peer)
        conn.connecting = connecting
        with self._lock:
            self._conns[conn_id] = conn
        events = selectors.EVENT_WRITE if connecting else selectors.EVENT_READ
        self._selector.register(sock, events, ("conn", conn_id))
        if not connecting:
            self._opened(conn)
        return conn

    def _opened(self, conn: Conn) -> None:
        try:
            conn.channel.opened(conn)
        except Exception:
            logger.exception("a channel failed to open")
            self._drop(conn.conn_id, "the channel failed")

    def _connect(self, conn_id: int, address: tuple[str, int], channel: Channel) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(address)
        except OSError as exc:  # a name that does not resolve, a bad address
            sock.close()
            channel.closed(Conn(conn_id, sock, channel, address), f"cannot connect: {exc}")
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            channel.closed(Conn(conn_id, sock, channel, address),
                           f"cannot connect: {errno.errorcode.get(err, err)}")
            return
        self._add(conn_id, sock, channel, address, connecting=True)

    def _serve(self, conn_id: int, events: int) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        if conn.connecting:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop(conn_id, f"cannot connect: {errno.errorcode.get(err, err)}")
                return
            conn.connecting = False
            self._selector.modify(conn.sock, selectors.EVENT_READ, ("conn", conn_id))
            self._opened(conn)
            return
        if events & selectors.EVENT_WRITE and not self._write_locked(conn):
            return
        if events & selectors.EVENT_READ:
            self._read(conn)

    def _read(self, conn: Conn) -> None:
        """Read what the socket holds, a buffer at a time, up to a few times while it fills the
        buffer (a fast sender), and hand over the frames."""
        for _ in range(DRAIN_READS):
            space = len(conn.buffer) - conn.filled
            try:
                with memoryview(conn.buffer) as view:
                    n = conn.sock.recv_into(view[conn.filled:])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(conn.conn_id, f"the connection failed: {exc.strerror or exc}")
                return
            if n == 0:
                if conn.out or conn.pending:  # what was queued still goes out (half-closed)
                    conn.eof = True
                    conn.closing = True
                    return
                self._drop(conn.conn_id, "the other side closed the connection")
                return
            conn.last_received = time.monotonic()
            if conn.closing:
                conn.filled = 0  # what a closing connection still sends is not read any more
                return
            conn.filled += n
            self._frames(conn)
            if n < space or conn.conn_id not in self._conns:
                return

    def _frames(self, conn: Conn) -> None:
        """Hand every complete frame in the buffer to the channel; keep the rest."""
        start = 0
        view = memoryview(conn.buffer)
        try:
            while conn.filled - start >= HEADER.size and conn.conn_id in self._conns:
                (size,) = HEADER.unpack_from(conn.buffer, start)
                if size > conn.channel.max_frame:
                    raise FrameError(f"a frame of {size} bytes is over the "
                                     f"{conn.channel.max_frame}-byte limit")
                end = start + HEADER.size + size
                if end > len(conn.buffer):  # a large frame: make room for all of it
                    conn.grown_at = time.monotonic()
                    if HEADER.size + size > len(conn.buffer):
                        head = bytes(view[start:conn.filled])
                        view.release()
                        conn.buffer = _buffer(HEADER.size + size)
                        conn.buffer[:len(head)] = head
                        conn.filled, start = len(head), 0
                        return
                    break  # it fits once what is before it is gone
                if end > conn.filled:
                    break
                conn.channel.frame(conn, view[start + HEADER.size:end])
                start = end
        except FrameError as exc:
            view.release()
            conn.filled = 0
            with contextlib.suppress(Exception):
                conn.channel.too_large(conn, str(exc))
            self.close(conn.conn_id)
            return
        rest = conn.filled - start
        if start and rest:
            conn.buffer[:rest] = conn.buffer[start:conn.filled]  # a copy: the two may overlap
        conn.filled = rest
        view.release()
        if (rest == 0 and len(conn.buffer) > READ_BUFFER
                and time.monotonic() - conn.grown_at > KEEP_GROWN_S):  # large frames stopped
            conn.buffer = _buffer(READ_BUFFER)

    def _write_now(self, conn: Conn, frames: list[_Frame]) -> bool:
        """Wrap and write frames on an idle connection, from the calling thread (holding the
        connection's write lock), in one ``sendmsg``; what the socket does not take waits in
        ``pending`` for the loop. False, with nothing done, if a frame cannot be wrapped here
        (the loop will try, and say why)."""
        chunks: list[memoryview] = []
        ends: list[tuple[int, Callable[[], object]]] = []  # each callback, where its frame ends
        size = 0
        try:
            for payload, plain, written in frames:
                for wrapped in _plain_frame(payload) if plain else conn.channel.wrap(payload):
                    if wrapped:
                        chunks.append(memoryview(wrapped))
                        size += len(wrapped)
                if written is not None:
                    ends.append((size, written))
        except Exception:
            return False
        try:
            n = conn.sock.sendmsg(chunks)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:  # the loop meets the error too, and drops the connection
            n = 0
        if n:
            conn.last_sent = time.monotonic()
        for end, written in ends:
            if end <= n:
                try:
                    written()
                except Exception:
                    logger.exception("a written-callback failed")
            else:  # out once no more is pending than what followed its frame
                conn.written.append((size - end, written))
        if n == size:
            return True
        for chunk in chunks:  # the rest goes out from the loop
            if n >= len(chunk):
                n -= len(chunk)
                continue
            conn.pending.append(chunk[n:])
            conn.pending_bytes += len(chunk) - n
            n = 0
        self._wake()
        return True

    def _write(self, conn: Conn) -> bool:
        """Write what the socket takes; False if the connection was dropped.

        Queued frames are wrapped (sealed) as they are written, a batch at a time, and each
        batch goes out in one ``sendmsg``.
        """
        while True:
            if not conn.pending and not self._wrap_batch(conn):
                return False
            if not conn.pending:
                return True
            try:
                n = conn.sock.sendmsg(conn.pending)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                self._drop(conn.conn_id, f"the connection failed: {exc.strerror or exc}")
                return False
            conn.last_sent = time.monotonic()
            conn.pending_bytes -= n
            while n and conn.pending:
                head = conn.pending[0]
                if n >= len(head):
                    n -= len(head)
                    conn.pending.popleft()
                else:
                    conn.pending[0] = head[n:]
                    n = 0
            while conn.written and conn.written[0][0] >= conn.pending_bytes:
                _, written = conn.written.popleft()
                try:
                    written()
                except Exception:
                    logger.exception("a written-callback failed")
            if conn.pending:
                return True

    def _write_locked(self, conn: Conn) -> bool:
        with conn.write_lock:
            return self._write(conn)

    def _wrap_batch(self, conn: Conn) -> bool:
        """Take queued payloads (up to a batch) and wrap them into ``pending``; False if the
        connection was dropped."""
        with self._lock:
            batch: list[tuple[bytes, bool, Callable[[], object] | None]] = []
            size = 0
            while conn.out and size < WRITE_BATCH and len(batch) < WRITE_BATCH_FRAMES:
                item = conn.out.popleft()
                batch.append(item)
                size += len(item[0])
            conn.queued -= size
        callbacks = []
        try:
            for payload, plain, written in batch:
                chunks = _plain_frame(payload) if plain else conn.channel.wrap(payload)
                for chunk in chunks:
                    if chunk:
                        conn.pending.append(memoryview(chunk))
                        conn.pending_bytes += len(chunk)
                if written is not None:
                    callbacks.append((conn.pending_bytes, written))
        except Exception as exc:  # a cipher that refuses (counter exhausted): end it
            self._drop(conn.conn_id, f"cannot seal a frame: {exc}")
            return False
        # a frame is out once what is left pending is no more than what followed it
        conn.written.extend((conn.pending_bytes - end, written) for end, written in callbacks)
        return True

    def drop(self, conn_id: int, reason: str) -> None:
        """Close a connection at once, dropping what is queued (loop thread only)."""
        self._drop(conn_id, reason)

    def _drop(self, conn_id: int, reason: str) -> None:
        with self._lock:
            conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        try:
            conn.channel.closed(conn, reason)
        except Exception:
            logger.exception("a channel failed to close")


#: One queued frame: its payload, whether it is written as it is (not wrapped), and what to
#: call once it is in the socket.
_Frame = tuple[bytes, bool, "Callable[[], object] | None"]


def _buffer(size: int) -> mmap.mmap:
    """A read buffer whose memory is taken as it is first written, zeroed by the kernel."""
    return mmap.mmap(-1, size)


def _plain_frame(payload: bytes) -> list[bytes]:
    return [HEADER.pack(len(payload)), payload]
