"""Sealed transport against raw loopback TCP with the same framing (a 4-byte length, then the body).

Two processes per way of sending, forked once and kept for the whole measurement: a sender pinned
to core 0 and a receiver pinned to core 1, one TCP connection on 127.0.0.1 between them. In a
trial the sender sends ``count`` frames of one size, then a one-byte frame; the receiver answers
that with a one-byte frame of its own, and the trial's time is from the first frame queued to
that answer, on the sender. Three ways, interleaved trial by trial:

- ``raw``: the sender does ``sendall(header + body)`` per frame; the receiver reads the header,
  then the body into a reused buffer with ``recv_into``. Nothing else: the ceiling of the socket.
- ``sealed``: the daemon's own path, both ends. vestad's :class:`IoLoop` thread on each side and a
  channel that does what :class:`LinkChannel` does with an established link's frames: the sender
  queues payloads with ``IoLoop.send`` (the loop seals each with ``FrameSealer.seal`` as it writes
  it and sends header and body with one ``sendmsg``); the receiver's loop reads into its reused
  buffer and the channel opens each frame with ``FrameOpener.open`` on a memoryview of it. What
  is not measured: the handshake (keys are given), and decoding the payload into a message (the
  payload here is random bytes, not msgpack).
- ``loop``: the same IoLoops and channels with plain frames, nothing sealed: what the loop costs
  without the cipher, to tell the two costs apart.

The sender keeps at most :data:`WINDOW_BYTES` queued in its loop (a frame is released when the
loop has written it), as a link's flow control would. Beside them, in this process: AES-256-GCM
sealing and opening of the same frames with no socket at all.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import secrets
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from harness import LOOPBACK, MIB, BenchError, Load, Row, ratios, say

from vesta.transport.crypto import FrameOpener, FrameSealer
from vesta.transport.framing import HEADER
from vesta.transport.link import LINK_MAX_FRAME
from vesta.transport.loop import Channel, Conn, IoLoop

TARGET_SEALED_RATIO = 0.60

FRAME_SIZES = (64 * 1024, MIB)
MODES = ("raw", "sealed", "loop")
SENDER_CPUS = {0}
RECEIVER_CPUS = {1}
#: Payload bytes per trial (``--quick``: less).
TRIAL_BYTES = 512 * MIB
QUICK_TRIAL_BYTES = 128 * MIB
#: Payload bytes the sealed and loop senders keep queued in their IoLoop at most.
WINDOW_BYTES = 8 * MIB
#: Frames sealed once and opened again and again by fresh openers, for the open rate alone.
OPEN_BATCH = 8
#: The frame that ends a trial, and its answer (the data frames are far larger).
MARK = b"."
#: Seconds a trial may take before the bench gives up on it.
TRIAL_TIMEOUT = 120.0


def _label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // 1024} KiB"


# -- raw ------------------------------------------------------------------------------------------


def _fill(sock: socket.socket, view: memoryview) -> bool:
    """Read exactly ``len(view)`` bytes into ``view``; False if the stream ended first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _raw_receiver(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytearray(HEADER.size)
    body = memoryview(bytearray(max(FRAME_SIZES)))
    while _fill(conn, memoryview(head)):
        (size,) = HEADER.unpack(head)
        if size == len(MARK):
            _fill(conn, body[:size])
            conn.sendall(HEADER.pack(len(MARK)) + MARK)
        elif not _fill(conn, body[:size]):
            return


class _RawSender:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def trial(self, payload: bytes, count: int) -> float:
        sock = self.sock
        t0 = time.perf_counter()
        for _ in range(count):
            sock.sendall(HEADER.pack(len(payload)) + payload)
        sock.sendall(HEADER.pack(len(MARK)) + MARK)
        if not _fill(sock, memoryview(bytearray(HEADER.size + len(MARK)))):
            raise EOFError("the receiver closed the connection")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()


# -- through vestad's IoLoop ----------------------------------------------------------------------


class _BenchChannel(Channel):
    """One end of a link once it is up, as :class:`LinkChannel` handles it: frames sealed on
    the way out and opened on the way in (or plain, without keys). A one-byte frame asks the
    receiving end to answer with one; a one-byte frame that arrives at the sending end is that
    answer."""

    max_frame = LINK_MAX_FRAME

    def __init__(self, loop: IoLoop, keys: tuple[bytes, bytes] | None, answer: bool) -> None:
        self.loop = loop
        self.sealer = FrameSealer(keys[0]) if keys else None
        self.opener = FrameOpener(keys[1], LINK_MAX_FRAME) if keys else None
        self.answer = answer
        self.up = threading.Event()
        self.answered = threading.Event()
        self.gone = threading.Event()
        self.received = 0

    def opened(self, conn: Conn) -> None:
        self.up.set()

    def frame(self, conn: Conn, body: memoryview) -> None:
        if self.opener is not None:
            payload = self.opener.open(HEADER.pack(len(body)), body)  # as LinkChannel.frame
            size = len(payload)
        else:
            size = len(body)
        self.received += size
        if size != len(MARK):
            return
        if self.answer:
            self.loop.send(conn.conn_id, MARK)
        else:
            self.answered.set()

    def wrap(self, payload: bytes) -> list[bytes]:
        if self.sealer is None:
            return super().wrap(payload)
        header, body = self.sealer.seal(payload)
        return [header, body]

    def closed(self, conn: Conn, reason: str) -> None:
        self.gone.set()
        self.up.set()
        self.answered.set()


def _loop_receiver(listener: socket.socket, keys: tuple[bytes, bytes] | None) -> None:
    loop = IoLoop(name="bench-receiver")
    channels: list[_BenchChannel] = []

    def accept(_sock: socket.socket, _address: Any) -> Channel | None:
        if channels:
            return None
        channels.append(_BenchChannel(loop, keys, answer=True))
        return channels[0]

    loop.start()
    loop.listen(listener, accept)
    while not (channels and channels[0].gone.wait(1.0)):
        pass
    loop.unlisten(listener)
    loop.stop()
    listener.close()


class _LoopSender:
    def __init__(self, port: int, keys: tuple[bytes, bytes] | None) -> None:
        self.loop = IoLoop(name="bench-sender")
        self.loop.start()
        self.channel = _BenchChannel(self.loop, keys, answer=False)
        self.conn_id = self.loop.connect((LOOPBACK, port), self.channel)
        if not self.channel.up.wait(10) or self.channel.gone.is_set():
            raise BenchError("the transport sender could not connect to its receiver")

    def trial(self, payload: bytes, count: int) -> float:
        window = threading.Semaphore(max(2, WINDOW_BYTES // len(payload)))
        self.channel.answered.clear()
        t0 = time.perf_counter()
        for _ in range(count):
            window.acquire()
            if not self.loop.send(self.conn_id, payload, written=window.release):
                raise EOFError("the connection to the receiver is gone")
        self.loop.send(self.conn_id, MARK)
        if not self.channel.answered.wait(TRIAL_TIMEOUT) or self.channel.gone.is_set():
            raise EOFError("the receiver did not answer")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.loop.close(self.conn_id)
        self.loop.stop()


# -- the processes ---------------------------------------------------------------------------------


def _receiver_main(mode: str, listener: socket.socket, keys: tuple[bytes, bytes] | None) -> None:
    os.sched_setaffinity(0, RECEIVER_CPUS)
    if mode == "raw":
        _raw_receiver(listener)
    else:
        _loop_receiver(listener, keys)


def _sender_main(mode: str, port: int, keys: tuple[bytes, bytes] | None,
                 commands: Connection) -> None:
    os.sched_setaffinity(0, SENDER_CPUS)
    sender = _RawSender(port) if mode == "raw" else _LoopSender(port, keys)
    payloads: dict[int, bytes] = {}
    commands.send("ready")
    while True:
        command = commands.recv()
        if command is None:
            break
        size, count = command
        payload = payloads.setdefault(size, os.urandom(size))
        try:
            commands.send(sender.trial(payload, count))
        except (OSError, EOFError) as exc:
            commands.send(f"{mode} sender: {exc}")
            break
    sender.close()


class _Pair:
    """A sender and a receiver process for one way of sending, connected, waiting for trials."""

    def __init__(self, mode: str) -> None:
        ctx = multiprocessing.get_context("fork")  # the bench process has one thread
        self.mode = mode
        keys = None
        if mode == "sealed":
            there, back = secrets.token_bytes(32), secrets.token_bytes(32)
            keys = {"sender": (there, back), "receiver": (back, there)}
        listener = socket.create_server((LOOPBACK, 0))
        port = listener.getsockname()[1]
        self.receiver: BaseProcess = ctx.Process(
            target=_receiver_main, args=(mode, listener, keys and keys["receiver"]),
            name=f"bench-{mode}-receiver", daemon=True)
        self.receiver.start()
        listener.close()
        self.commands, theirs = ctx.Pipe()
        self.sender: BaseProcess = ctx.Process(
            target=_sender_main, args=(mode, port, keys and keys["sender"], theirs),
            name=f"bench-{mode}-sender", daemon=True)
        self.sender.start()
        theirs.close()
        if not self.commands.poll(15) or self.commands.recv() != "ready":
            raise BenchError(f"the {mode} transport sender did not start")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (self.sender, self.receiver) if p.pid is not None]

    def trial(self, size: int, count: int) -> float:
        self.commands.send((size, count))
        if not self.commands.poll(TRIAL_TIMEOUT):
            raise BenchError(f"a {mode_label(self.mode)} trial took over {TRIAL_TIMEOUT:g} s")
        got = self.commands.recv()
        if isinstance(got, str):
            raise BenchError(got)
        return float(got)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.commands.send(None)
        for p in (self.sender, self.receiver):
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        self.commands.close()


def minor_faults(pid: int | None) -> int:
    """Minor page faults of a process so far (a fresh page of memory touched is one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def mode_label(mode: str) -> str:
    return {"raw": "raw TCP", "sealed": "sealed, vestad's IoLoop",
            "loop": "plain frames, vestad's IoLoop"}[mode]


def crypto_rates(size: int, total: int) -> tuple[float, float]:
    """MiB/s of FrameSealer.seal and of FrameOpener.open over ``total`` bytes of ``size`` frames,
    in this process, no socket. Each result is dropped before the next (as the loop does), and
    the frames opened are a few sealed beforehand, opened again and again by fresh openers."""
    key = secrets.token_bytes(32)
    sealer = FrameSealer(key)
    payload = os.urandom(size)
    count = max(OPEN_BATCH, total // size // OPEN_BATCH * OPEN_BATCH)
    t0 = time.perf_counter()
    for _ in range(count):
        sealer.seal(payload)
    t1 = time.perf_counter()
    resealer = FrameSealer(key)
    batch: list[tuple[bytes, memoryview]] = []
    for _ in range(OPEN_BATCH):
        header, body = resealer.seal(payload)
        batch.append((header, memoryview(body)))
    t2 = time.perf_counter()
    for _ in range(count // OPEN_BATCH):
        opener = FrameOpener(key, LINK_MAX_FRAME)
        for header, body in batch:
            opener.open(header, body)
    t3 = time.perf_counter()
    mib = count * size / MIB
    return mib / (t1 - t0), mib / (t3 - t2)


# -- the measurement -------------------------------------------------------------------------------


def bench_transport(load: Load, rounds: int, quick: bool, details: dict[str, Any]) -> list[Row]:
    """Raw, sealed and plain-loop trials of both frame sizes, interleaved round by round (the
    order reversed every other round), each trial's throughput in MiB/s of payload."""
    total = QUICK_TRIAL_BYTES if quick else TRIAL_BYTES
    pairs: dict[str, _Pair] = {}
    mark = len(load.foreign_cores)
    try:
        for mode in MODES:
            pairs[mode] = _Pair(mode)
            load.extra += pairs[mode].pids
        rates: dict[tuple[str, int], list[float]] = {
            (m, s): [] for m in (*MODES, "seal", "open") for s in FRAME_SIZES}
        faults: dict[tuple[str, str, int], list[float]] = {
            (m, side, s): [] for m in MODES for side in ("sender", "receiver")
            for s in FRAME_SIZES}
        for size in FRAME_SIZES:  # a first trial of each, not counted: pages, caches, windows
            for pair in pairs.values():
                pair.trial(size, max(1, (16 * MIB) // size))
        for r in range(rounds):
            order = [(m, s) for s in FRAME_SIZES for m in MODES]
            if r % 2:
                order.reverse()
            for mode, size in order:
                count = max(1, total // size)
                pair = pairs[mode]
                before = [minor_faults(p.pid) for p in (pair.sender, pair.receiver)]
                with load.watch():
                    seconds = pair.trial(size, count)
                rates[mode, size].append(count * size / MIB / seconds)
                for side, p, was in zip(("sender", "receiver"), (pair.sender, pair.receiver),
                                        before, strict=True):
                    faults[mode, side, size].append((minor_faults(p.pid) - was) / (total / MIB))
            for size in FRAME_SIZES:
                seal, opened = crypto_rates(size, total // 4)
                rates["seal", size].append(seal)
                rates["open", size].append(opened)
            say(f"  transport round {r + 1}/{rounds}: " + ", ".join(
                f"{m} {_label(s)} {rates[m, s][-1]:.0f}" for s in FRAME_SIZES for m in MODES)
                + " MiB/s")
    finally:
        for pair in pairs.values():
            for pid in pair.pids:
                with contextlib.suppress(ValueError):
                    load.extra.remove(pid)
            pair.close()
    details["transport"] = {
        "trial_payload_mib": total / MIB, "window_mib": WINDOW_BYTES / MIB,
        "sender_cpus": sorted(SENDER_CPUS), "receiver_cpus": sorted(RECEIVER_CPUS),
        "mib_per_s": {f"{m} {_label(s)}": [round(x, 1) for x in v] for (m, s), v in rates.items()},
        "minor_faults_per_mib": {f"{m} {side} {_label(s)}": [round(x, 1) for x in v]
                                 for (m, side, s), v in faults.items()},
        "foreign_cores": round(load.since(mark), 3),
    }
    rows = []
    for size in FRAME_SIZES:
        label = _label(size)
        rows += [
            Row(f"transport {label} frames: raw TCP", "MiB/s", rates["raw", size], digits=0),
            Row(f"transport {label} frames: sealed, vestad's IoLoop", "MiB/s",
                rates["sealed", size], digits=0),
            Row(f"  sealed / raw, {label}", "", ratios(rates["sealed", size],
                rates["raw", size]), TARGET_SEALED_RATIO, digits=3),
            Row(f"  sealed, receiver's minor page faults per MiB, {label}", "",
                faults["sealed", "receiver", size], digits=0),
            Row(f"  plain frames, vestad's IoLoop, {label}", "MiB/s", rates["loop", size],
                digits=0),
            Row(f"  plain-loop / raw, {label}", "", ratios(rates["loop", size],
                rates["raw", size]), digits=3),
            Row(f"  AES-GCM seal alone, {label} (one thread, no socket)", "MiB/s",
                rates["seal", size], digits=0),
            Row(f"  AES-GCM open alone, {label} (one thread, no socket)", "MiB/s",
                rates["open", size], digits=0),
        ]
    return rows
