"""Every message vesta's actors exchange, and their msgpack codec.

One vocabulary serves three places: the actors tell each other these records, the control socket
carries them between the CLI and the daemon, and the peer protocol carries them between daemons. So
every field is a msgpack type (None, bool, int, float, str, bytes, list, dict) or another message.

Every type says where it may come from (:class:`Scope`): the control socket (requests from a
client), the daemon's answers to a client, a peer, or nowhere but inside the daemon. A decoder is
told the scope it serves and refuses every other type, nested ones included, as a decode error: a
peer can never send ``CancelAll`` or ``Drain``, a client never a ``TaskDone``.

On the wire a message is a msgpack array ``[tag, field, field, ...]`` in field order; a message
inside another travels as msgpack extension type 1 holding its own encoding. :func:`decode` checks
the tag, the number of fields and each field's type, so a peer or a client cannot smuggle a wrong
type into an actor: a bad message raises :class:`DecodeError` and never reaches one.

This module is imported by the CLI, so it uses only the standard library and msgpack.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Union

import msgpack

_EXT_MESSAGE = 1
_MAX_DEPTH = 8


class DecodeError(ValueError):
    """Bytes that are not a valid vesta message, or a message that may not come from there."""


class Scope(enum.Flag):
    """Where a message may come from. An ``INTERNAL`` type never leaves the daemon: no socket's
    decoder serves that scope (only tests, to show such a type survives the codec)."""

    INTERNAL = enum.auto()
    CONTROL = enum.auto()  # a client's request on the control socket
    CLIENT = enum.auto()  # the daemon's answer, read by a client
    PEER = enum.auto()  # another daemon, over a sealed link


@typing.dataclass_transform(frozen_default=True)
class Message:
    """Base of every message: an immutable record whose fields are its annotations.

    Not a dataclass on purpose: the CLI imports this module, and building ~30 dataclasses costs
    more start-up time than the whole CLI may take. ``dataclass_transform`` tells type checkers
    that subclasses behave like frozen dataclasses all the same. The tag on the wire is the class
    name; :meth:`__init_subclass__` registers it.
    """

    registry: ClassVar[dict[str, type[Message]]] = {}
    scope: ClassVar[Scope] = Scope.INTERNAL
    tag: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, scope: Scope | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if scope is not None:
            cls.scope = scope
        own = [
            name
            for name, hint in cls.__dict__.get("__annotations__", {}).items()
            if not str(hint).startswith("ClassVar")
        ]
        cls.fields = (*cls.fields, *own)
        cls.defaults = {**cls.defaults, **{n: cls.__dict__[n] for n in own if n in cls.__dict__}}
        for name in own:
            if name in cls.__dict__:
                delattr(cls, name)
        cls.tag = cls.__name__
        if not cls.__dict__.get("abstract", False):
            if cls.tag in Message.registry:
                raise TypeError(f"message tag {cls.tag!r} is defined twice")
            Message.registry[cls.tag] = cls

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(self.fields):
            raise TypeError(f"{self.tag} takes {len(self.fields)} fields, got {len(args)}")
        values = dict(zip(self.fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in self.fields or name in values:
                raise TypeError(f"{self.tag}: unexpected or repeated field {name!r}")
            values[name] = value
        for name in self.fields:
            if name not in values:
                if name not in self.defaults:
                    raise TypeError(f"{self.tag}: missing field {name!r}")
                default = self.defaults[name]
                mutable = isinstance(default, list | dict)
                values[name] = type(default)(default) if mutable else default
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.tag} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self.tag} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.values() == other.values()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.fields)
        return f"{self.tag}({inner})"

    def values(self) -> list[Any]:
        """The field values in order."""
        return [getattr(self, n) for n in self.fields]

    def replace(self, **changes: Any) -> Message:
        """A copy with some fields changed."""
        return type(self)(**{**dict(zip(self.fields, self.values(), strict=True)), **changes})


# -- codec ---------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Encode a message to bytes."""
    return msgpack.packb(_to_list(msg), default=_default, use_bin_type=True)


def decode(data: bytes | memoryview, scope: Scope) -> Message:
    """Decode and type-check a message that may come from ``scope``; raises
    :class:`DecodeError` on anything else."""
    try:
        obj = msgpack.unpackb(
            data, ext_hook=_ext_hook, raw=False, strict_map_key=False
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise DecodeError(f"not msgpack: {exc}") from None
    return _from_list(obj, scope, depth=0)


def _to_list(msg: Message) -> list[Any]:
    return [msg.tag, *msg.values()]


def _default(obj: Any) -> Any:
    if isinstance(obj, Message):
        return msgpack.ExtType(_EXT_MESSAGE, encode(obj))
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a vesta message")


class _Nested:
    """A nested message's bytes, decoded only once the outer message passed its checks."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _EXT_MESSAGE:
        raise DecodeError(f"unknown extension type {code}")
    return _Nested(data)


def _from_list(obj: Any, scope: Scope, depth: int) -> Message:
    if depth > _MAX_DEPTH:
        raise DecodeError("messages nested too deeply")
    if isinstance(obj, _Nested):
        try:
            obj = msgpack.unpackb(obj.data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"nested message is not msgpack: {exc}") from None
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], str):
        raise DecodeError("a message is a list that starts with its tag")
    cls = Message.registry.get(obj[0])
    if cls is None:
        raise DecodeError(f"unknown message type {obj[0][:40]!r}")
    if not cls.scope & scope:
        raise DecodeError(f"{cls.tag} may not come from {_where(scope)}")
    checkers = _checkers(cls)
    values = obj[1:]
    if len(values) != len(checkers):
        raise DecodeError(f"{cls.tag} takes {len(checkers)} fields, got {len(values)}")
    msg = object.__new__(cls)
    for (name, where, check), value in zip(checkers, values, strict=True):
        object.__setattr__(msg, name, check(value, where, scope, depth))
    return msg


def _where(scope: Scope) -> str:
    return {Scope.CONTROL: "a client", Scope.CLIENT: "the daemon", Scope.PEER: "a peer"}.get(
        scope, str(scope))


_HINTS: dict[type, dict[str, Any]] = {}


def _field_types(cls: type[Message]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls)
        hints = {name: resolved[name] for name in cls.fields}
        _HINTS[cls] = hints
    return hints


#: A field's check: (value, where, scope, depth) -> the value, nested messages decoded.
_Checker = Callable[[Any, str, Scope, int], Any]
_CHECKERS: dict[type, list[tuple[str, str, _Checker]]] = {}


def _checkers(cls: type[Message]) -> list[tuple[str, str, _Checker]]:
    """Each field's name, its place for error messages, and its check, made once per type."""
    checkers = _CHECKERS.get(cls)
    if checkers is None:
        checkers = [(name, f"{cls.tag}.{name}", _compile(hint))
                    for name, hint in _field_types(cls).items()]
        _CHECKERS[cls] = checkers
    return checkers


def _compile(hint: Any) -> _Checker:
    """The check of one field type, with the type's introspection done once, here."""
    if hint is Any:
        return lambda value, where, scope, depth: _plain(value, where)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [_compile(option) for option in typing.get_args(hint)]

        def union(value: Any, where: str, scope: Scope, depth: int) -> Any:
            for check in options:
                try:
                    return check(value, where, scope, depth)
                except DecodeError:
                    continue
            raise _misfit(value, hint, where)
        return union
    if hint is type(None):
        def none(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if value is None:
                return None
            raise _misfit(value, hint, where)
        return none
    if isinstance(hint, type) and issubclass(hint, Message):
        def message(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if isinstance(value, _Nested):
                inner = _from_list(value, scope, depth + 1)
                if isinstance(inner, hint):
                    return inner
            raise _misfit(value, hint, where)
        return message
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        check_item = _compile(item)

        def items(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if isinstance(value, list):
                return [check_item(v, where, scope, depth) for v in value]
            raise _misfit(value, hint, where)
        return items
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        check_key, check_value = _compile(key), _compile(item)

        def mapping(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if isinstance(value, dict):
                return {check_key(k, where, scope, depth): check_value(v, where, scope, depth)
                        for k, v in value.items()}
            raise _misfit(value, hint, where)
        return mapping
    if hint is float:
        def number(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise _misfit(value, hint, where)
        return number
    if hint is int:
        def integer(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise _misfit(value, hint, where)
        return integer
    if hint in (str, bytes, bool):
        def exact(value: Any, where: str, scope: Scope, depth: int) -> Any:
            if type(value) is hint:
                return value
            raise _misfit(value, hint, where)
        return exact
    raise TypeError(f"field type {hint} is not supported in a vesta message")


def _misfit(value: Any, hint: Any, where: str) -> DecodeError:
    return DecodeError(f"{where}: {type(value).__name__} does not fit {hint}")


def _plain(value: Any, where: str) -> Any:
    """A field typed ``Any`` holds plain msgpack data: a message inside it is refused."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Nested):
            raise DecodeError(f"{where}: a message where plain data belongs")
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return value


# -- jobs ------------------------------------------------------------------------------------------


class Job(Message, scope=Scope.CONTROL | Scope.PEER):
    """Base of the job kinds a user can submit."""

    abstract = True
    kind: ClassVar[str]


class CpuJob(Job):
    """``vesta cpu N``: N million SHA-256 iterations as 10*N units of 100,000 (see SPEC)."""

    kind: ClassVar[str] = "cpu"
    n: int
    seed: int = 0


class MemJob(Job):
    """``vesta mem MB MS``: allocate MB MiB, touch every page, hold it MS milliseconds."""

    kind: ClassVar[str] = "mem"
    mb: int
    ms: int


class ExecJob(Job):
    """``vesta exec -- CMD``: run a command, streaming its output back."""

    kind: ClassVar[str] = "exec"
    argv: list[str]
    timeout: float | None = None
    gpu: bool = False
    retry: bool = False  # run it again elsewhere if its node goes away mid-run


AnyJob = CpuJob | MemJob | ExecJob


# -- control socket: requests from a client ------------------------------------------------------


class StatusRequest(Message, scope=Scope.CONTROL):
    """Ask for the node, its peers, ledger, jobs and counters."""


class PeersRequest(Message, scope=Scope.CONTROL):
    """Ask for the other nodes this daemon knows."""


class SubmitRequest(Message, scope=Scope.CONTROL):
    """Run a job; the connection then receives its events until :class:`JobDone`."""

    job: AnyJob


class CancelRequest(Message, scope=Scope.CONTROL):
    """Cancel a job everywhere it runs. Empty ``job_id``: the job of this connection."""

    job_id: str = ""


class WhyRequest(Message, scope=Scope.CONTROL):
    """Ask why a job of this node went where it went. Empty ``job_id``: the last one."""

    job_id: str = ""


class DoctorRequest(Message, scope=Scope.CONTROL):
    """Ask what ``vesta doctor`` checks: the daemon's sockets, addresses, key and files, and
    the beacons, seeds and clock jumps it has seen."""


class LentFlows(Message):
    """Executor -> Autopilot: the parts this node runs for peers now (``status``'s flows, seen
    from the lender), on each start and end and at most twice a second as units finish."""

    flows: list[dict[str, Any]]


class OutputAck(Message):
    """Control -> Autopilot: ``size`` more bytes of a job's output went into its client's socket,
    so that much more may come (the credit window that keeps a job's output from piling up
    anywhere on its way, however slowly the client reads)."""

    job_id: str
    size: int


class StressRequest(Message, scope=Scope.CONTROL):
    """Pin ``cores`` of this daemon's cores (0 = all) for ``seconds``."""

    cores: int
    seconds: float


class StopStressRequest(Message, scope=Scope.CONTROL):
    """End a running stress early."""


# -- control socket: replies and job events ------------------------------------------------------


class ErrorReply(Message, scope=Scope.CLIENT):
    """A request that could not be served. ``code`` is a stable word, ``error`` a sentence."""

    code: str
    error: str


class StatusReply(Message, scope=Scope.CLIENT):
    """The document ``vesta --json status`` prints."""

    doc: dict[str, Any]


class WhyReply(Message, scope=Scope.CLIENT):
    """The document ``vesta --json why`` prints."""

    doc: dict[str, Any]


class DoctorReply(Message, scope=Scope.CLIENT):
    """The facts ``vesta doctor`` checks (see :mod:`vesta.doctor`)."""

    facts: dict[str, Any]


class PeersReply(Message, scope=Scope.CLIENT):
    """The peers ``vesta --json peers`` prints."""

    peers: list[dict[str, Any]]


class StressReply(Message, scope=Scope.CLIENT):
    """What a stress request or stop-stress did."""

    cores: int
    seconds: float
    stopped: int = 0


class JobAccepted(Message, scope=Scope.CLIENT):
    """The job has an id; ``queued`` says it waits for a free worker at ``position``."""

    job_id: str
    queued: bool = False
    position: int = 0


class JobStarted(Message, scope=Scope.CLIENT):
    """The job (or part of it) started on ``node``."""

    job_id: str
    node: str
    units: int


class JobProgress(Message, scope=Scope.CLIENT):
    """``done`` of ``total`` units are finished; ``nodes`` maps node name to units it finished."""

    job_id: str
    done: int
    total: int
    nodes: dict[str, int]


class JobOutput(Message, scope=Scope.CLIENT):
    """A chunk of an exec job's output; ``stream`` is "stdout" or "stderr"."""

    job_id: str
    stream: str
    data: bytes


class JobDone(Message, scope=Scope.CLIENT):
    """The job ended: ``ok`` with ``result`` (the JSON document) or not, with ``error``.

    ``exit_code`` is what the CLI exits with (SPEC: 0, 1, 124-127, 128+N).
    """

    job_id: str
    ok: bool
    result: dict[str, Any]
    error: str = ""
    exit_code: int = 0


# -- inside the daemon ---------------------------------------------------------------------------


class Tick(Message):
    """A timer fired; ``name`` says which."""

    name: str = ""


class ClientRequest(Message):
    """Control -> Autopilot: a client's request, to be answered through :class:`ToClient`."""

    client: int
    request: Message


class ToClient(Message):
    """Any actor -> Control: send ``msg`` to the client connection ``client``."""

    client: int
    msg: Message


class ClientGone(Message):
    """Control -> Autopilot: the client connection closed; its jobs are cancelled."""

    client: int


class NodeInfo(Message, scope=Scope.PEER):
    """What a node knows and tells about itself: readings, offer and what it accepts."""

    name: str
    fingerprint: str
    address: str
    version: int
    cores: int
    cpu_pct: float
    mem_available_mb: int
    mem_total_mb: int
    power: str
    willingness: float
    battery_pct: float | None
    offer_workers: int
    offer_mem_mb: int
    gpu: bool
    allow_exec: bool
    exec_allowlist: list[str]
    temps_c: dict[str, float]
    lent_cpu_pct: float = 0.0  # the load of the work run for peers, on its cores
    owner_cpu_pct: float = 0.0  # the load of everything else but the daemon itself
    paused: str = ""  # why work lent here is paused for the owner (it offers nothing); "" if not


class RunTask(Message, scope=Scope.PEER):
    """Autopilot -> Executor: run units [``start``, ``end``) of a job (one unit for mem and exec).

    ``workers`` is how many worker slots the autopilot booked for it; ``lend`` marks work run for
    a peer, which runs at the lowest priority.
    """

    task_id: str
    job_id: str
    job: AnyJob
    start: int
    end: int
    lend: bool = False
    workers: int = 1


class CancelTask(Message, scope=Scope.PEER):
    """Autopilot -> Executor: stop a task and kill its processes."""

    task_id: str


class TaskUnits(Message, scope=Scope.PEER):
    """Executor -> Autopilot: units that finished since the last report, by index."""

    task_id: str
    units: dict[int, bytes]


class TaskCredit(Message, scope=Scope.PEER):
    """Autopilot -> Executor (or a lender): ``size`` more bytes of the task's output may come."""

    task_id: str
    size: int


class TaskOutput(Message, scope=Scope.PEER):
    """Executor -> Autopilot: output of an exec task."""

    task_id: str
    stream: str
    data: bytes


class TaskDone(Message, scope=Scope.PEER):
    """Executor -> Autopilot: a task ended.

    ``exit_code`` is the command's status for exec (SPEC's mapping), 0 or 1 otherwise;
    ``error`` is empty when it ran to completion; ``cancelled`` when it was told to stop.
    """

    task_id: str
    ok: bool
    seconds: float
    exit_code: int = 0
    error: str = ""
    cancelled: bool = False
    detail: dict[str, Any] = {}
    refused: bool = False  # a lender refused the task before running it
    lost: bool = False  # the node running it went away: not the task's own failure
    cpu_s: float = 0.0  # CPU its processes used, measured where it ran: what the ledger charges
    mib_s: float = 0.0  # memory held (mem jobs), MiB times seconds


class Woke(Message):
    """Sampler -> Executor, Discovery, Autopilot: the machine was suspended for ``slept_s``
    seconds (the boot clock ran ahead of the monotonic one, which stops while suspended)."""

    slept_s: float


class Leases(Message, scope=Scope.PEER):
    """Submitter -> lender, first on every link that comes up: the tasks it still waits for
    there. After a partition the lender ends whatever it runs for this submitter that is not in
    the list: the submitter has placed that work elsewhere, and would drop its results."""

    task_ids: list[str]


class TaskPaused(Message, scope=Scope.PEER):
    """Lender -> submitter: a lent task was paused for the lender's owner (``why``), or runs
    again (``why`` empty). A submitter places elsewhere what stays paused too long."""

    task_id: str
    why: str = ""


# -- between daemons -----------------------------------------------------------------------------


class Beacon(Message, scope=Scope.PEER):
    """What a node announces by UDP: its state, and where its peer protocol listens.

    ``boot`` and ``seq`` order a node's beacons: one that is not newer than the last accepted from
    that fingerprint is dropped, so a captured beacon cannot be played back.
    """

    boot: int
    seq: int
    port: int
    dport: int
    advertise: str  # the address to connect to; "" = where the beacon came from
    node: NodeInfo


class PeerHello(Message, scope=Scope.PEER):
    """The first message on a link, both ways: who the node is and what it accepts now."""

    node: NodeInfo
    port: int
    dport: int


class PeerLeaving(Message, scope=Scope.PEER):
    """The node stops: its peers re-place what it ran for them at once."""

    reason: str


# -- inside the daemon: the federation -----------------------------------------------------------


class BeaconHeard(Message):
    """IoLoop -> Discovery: a beacon that opened under our key, from ``host``.

    ``beacon`` is None when the sender speaks no version we do (then only its fingerprint and
    ``versions`` are known).
    """

    fingerprint: str
    versions: list[int]
    beacon: Beacon | None
    host: str


class Dial(Message):
    """Discovery -> Transport: open a link to a node heard of, if there is none yet."""

    fingerprint: str
    host: str
    port: int


class LinkUp(Message):
    """IoLoop -> Transport: a handshake completed; the peer proved ``fingerprint``."""

    conn_id: int
    fingerprint: str
    version: int
    initiator: bool
    host: str


class LinkDown(Message):
    """IoLoop -> Transport -> PeerLink: the link ended (closed, failed, or silent too long)."""

    conn_id: int
    fingerprint: str
    reason: str


class LinkRefused(Message):
    """IoLoop -> Transport -> Discovery: a node with our key speaks no version we do."""

    fingerprint: str
    host: str
    reason: str


class LinkMessage(Message):
    """IoLoop -> Transport -> PeerLink: a message that arrived on a link."""

    conn_id: int
    fingerprint: str
    msg: Message


class ForPeer(Message):
    """Any actor -> Transport: send ``msg`` to the peer ``fingerprint`` over its link."""

    fingerprint: str
    msg: Message


class PeerLinked(Message):
    """Transport -> Discovery: a link to ``fingerprint`` is up (or down, with ``up`` False)."""

    fingerprint: str
    up: bool
    version: int = 0
    reason: str = ""


class PeerSeen(Message):
    """PeerLink -> Discovery: what a linked peer said of itself over the link."""

    fingerprint: str
    host: str
    hello: PeerHello | None = None
    leaving: str = ""


class SeedsResolved(Message):
    """Resolver thread -> Discovery: the seeds' addresses, as (host, port) pairs."""

    addresses: list[list[Any]]


class PeerTable(Message):
    """Discovery -> Autopilot: every peer known, as plain documents, after each change."""

    peers: list[dict[str, Any]]


class Charge(Message):
    """Executor or Autopilot -> Ledger: work one node ran for the other, as the lender measured
    it. ``lent`` when this node ran it for the peer, else the peer ran it for this node."""

    fingerprint: str
    name: str
    lent: bool
    core_s: float
    mib_s: float = 0.0


class LedgerSnapshot(Message):
    """Ledger -> Executor and Autopilot, after each change: every peer's totals, as plain data
    (fingerprint -> {"name", "lent", "borrowed", "lent_mib_s", "borrowed_mib_s"})."""

    book: dict[str, dict[str, Any]]


class LendTask(Message):
    """PeerLink -> Executor: a peer asks this node to run a task for it."""

    fingerprint: str
    name: str
    run: RunTask


class StartStress(Message):
    """Control -> Executor: pin cores; the reply goes to ``client``."""

    client: int
    cores: int
    seconds: float


class StressState(Message):
    """Executor -> Autopilot: ``cores`` are pinned by stress until ``until`` (epoch seconds);
    0 cores: no stress runs."""

    cores: int
    until: float = 0.0


class StopStress(Message):
    """Control -> Executor: end the stress; the reply goes to ``client``."""

    client: int


class Ping(Message):
    """Asked of an actor: it answers True once every message told to it before is handled."""


class Drain(Message):
    """Launcher -> actors: the daemon is stopping; take no new work."""


class Serve(Message):
    """Launcher -> Control: every actor is wired; start serving the socket."""


class CountRunning(Message):
    """Launcher -> Autopilot (asked): how many local tasks are still running."""


class CancelAll(Message):
    """Launcher -> Autopilot: cancel every job, telling the clients ``reason``."""

    reason: str = "cancelled"


# -- executor internals: its process supervisor thread reports these -----------------------------


class WorkerUnits(Message):
    """Supervisor -> Executor: cpu units a worker process finished."""

    worker: str
    units: dict[int, bytes]


class WorkerOutput(Message):
    """Supervisor -> Executor: output of a worker's exec command."""

    worker: str
    stream: str
    data: bytes


class WorkerExited(Message):
    """Supervisor -> Executor: a worker process ended; ``error`` is empty if it completed."""

    worker: str
    exit_code: int
    error: str = ""
    detail: dict[str, Any] = {}
    cpu_s: float = 0.0  # the CPU of the process and its waited-for children for the piece
