"""Helpers for the actor tests: probe actors that record what they are told, and their wiring.

A :class:`Probe` stands in for an actor a test does not exercise: it records every message it
receives, and the test waits (with a deadline) for the message it expects. Job processes are found
with psutil, as children of the multiprocessing fork server or by the ``VESTA_JOB_ID`` that every
exec command carries in its environment.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil
import pykka
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vesta import PROTOCOL_VERSION
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.identity import Identity
from vesta.messages import NodeInfo, Ping
from vesta.workers.jobs import unit_result

M = TypeVar("M")

#: How long a test waits for a message it expects.
DEADLINE = 10.0


class Probe(pykka.ThreadingActor):
    """An actor that puts every message it receives into a thread-safe queue."""

    def __init__(self, inbox: queue.Queue[Any]) -> None:
        super().__init__()
        self.inbox = inbox

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Ping):
            return True
        self.inbox.put(message)
        return None


@dataclass
class ProbeHandle:
    """A running :class:`Probe` and what it received, as the test thread sees it."""

    ref: pykka.ActorRef[Any]
    inbox: queue.Queue[Any]
    received: list[Any] = field(default_factory=list)  # every message taken from the inbox
    _unread: list[Any] = field(default_factory=list)  # taken but not yet returned by expect

    @classmethod
    def start(cls) -> ProbeHandle:
        inbox: queue.Queue[Any] = queue.Queue()
        return cls(Probe.start(inbox), inbox)

    def _take(self, timeout: float) -> Any:
        message = self.inbox.get(timeout=timeout)
        self.received.append(message)
        self._unread.append(message)
        return message

    def expect(
        self, kind: type[M], where: Callable[[M], bool] | None = None,
        timeout: float = DEADLINE,
    ) -> M:
        """The first message not returned before that is a ``kind`` and satisfies ``where``.

        Messages that do not match stay for later calls; the test fails at the deadline.
        """
        def matches(message: Any) -> bool:
            return isinstance(message, kind) and (where is None or where(message))

        for message in self._unread:
            if matches(message):
                self._unread.remove(message)
                return message
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {kind.__name__} arrived within {timeout} s; "
                            f"received: {self.received!r}"[:2000])
            try:
                message = self._take(left)
            except queue.Empty:
                continue
            if matches(message):
                self._unread.remove(message)
                return message

    def expect_none(
        self, kind: type[Any], where: Callable[[Any], bool] | None = None, *,
        after: Sequence[pykka.ActorRef[Any]],
    ) -> None:
        """Fail if a matching message was sent here by the actors ``after``.

        No waiting on a clock: each actor in ``after`` is asked a :class:`Ping`, whose answer
        proves it handled every message told to it before (and so told this probe whatever it
        was going to); then this probe is asked one, which proves those messages are queued here.
        """
        for ref in (*after, self.ref):
            assert ref.ask(Ping(), timeout=DEADLINE) is True
        with contextlib.suppress(queue.Empty):
            while True:
                self._take(0)
        unexpected = [m for m in self._unread
                      if isinstance(m, kind) and (where is None or where(m))]
        assert not unexpected, f"unexpected {kind.__name__}: {unexpected!r}"

    def all(self, kind: type[M]) -> list[M]:
        """Every ``kind`` received so far, in order (including those ``expect`` returned)."""
        while True:
            try:
                self._take(0)
            except queue.Empty:
                break
        return [m for m in self.received if isinstance(m, kind)]


@dataclass
class Wiring:
    """A :class:`Links` whose every role is a probe; a test puts its real actor in one role."""

    links: Links
    counters: Counters
    autopilot: ProbeHandle
    executor: ProbeHandle
    control: ProbeHandle
    discovery: ProbeHandle
    transport: ProbeHandle
    ledger: ProbeHandle


class ProbeOutbox:
    """Stands in for the control outbox: what actors send to clients reaches a probe, at once."""

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref

    def tell(self, message: Any) -> None:
        self.ref.tell(message)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield


@pytest.fixture
def wiring() -> Wiring:
    """Probes in every role (the autouse fixture of tests/conftest.py stops them afterwards)."""
    links = Links()
    roles = ("autopilot", "executor", "control", "discovery", "transport", "ledger")
    probes = {role: ProbeHandle.start() for role in roles}
    for role, probe in probes.items():
        setattr(links, role, probe.ref)
    links.clients = ProbeOutbox(probes["control"].ref)  # what actors send clients goes here
    return Wiring(links, Counters(), **probes)


@functools.cache
def unit(seed: int, index: int) -> bytes:
    """``vesta.workers.jobs.unit_result``, computed once per test session (each takes ~0.2 s)."""
    return unit_result(seed, index)


# -- job processes ---------------------------------------------------------------------------------


def forkservers() -> list[psutil.Process]:
    """The multiprocessing fork servers this test process started."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if any("forkserver" in part for part in child.cmdline()):
                found.append(child)
    return found


def worker_processes() -> list[psutil.Process]:
    """Live job processes: the children of this process's fork servers."""
    workers = []
    for server in forkservers():
        with contextlib.suppress(psutil.Error):
            workers += [p for p in server.children() if _alive(p)]
    return workers


def marked_processes(job_id: str) -> list[psutil.Process]:
    """Live processes anywhere on the machine whose environment has ``VESTA_JOB_ID=job_id``.

    An exec command's descendants keep that variable even when they leave its process group and
    are re-parented away from this process tree.
    """
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("VESTA_JOB_ID") == job_id and _alive(proc):
                found.append(proc)
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def job_id() -> Iterator[str]:
    """A job id unique to this test; whatever still carries it afterwards is killed."""
    marker = f"test-{secrets.token_hex(6)}"
    yield marker
    leftovers = marked_processes(marker)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftovers, timeout=5)


# -- the federation --------------------------------------------------------------------------------


def new_identity() -> Identity:
    """A fresh node identity (no state directory involved)."""
    return Identity(Ed25519PrivateKey.generate())


def by_fingerprint(count: int) -> list[Identity]:
    """``count`` fresh identities, lowest fingerprint first: which node dials depends on it."""
    return sorted((new_identity() for _ in range(count)), key=lambda i: i.fingerprint)


def node_info(name: str = "peer", fingerprint: str = "", **changes: Any) -> NodeInfo:
    """What a node says of itself: two idle cores, one worker and 1 GiB offered, no exec."""
    fields: dict[str, Any] = dict(
        name=name, fingerprint=fingerprint, address="127.0.0.1", version=PROTOCOL_VERSION,
        cores=2, cpu_pct=0.0, mem_available_mb=2048, mem_total_mb=4096, power="ac",
        willingness=1.0, battery_pct=None, offer_workers=1, offer_mem_mb=1024, gpu=False,
        allow_exec=False, exec_allowlist=[], temps_c={},
    )
    fields.update(changes)
    return NodeInfo(**fields)
