"""The network lab: hosts in network namespaces on bridged subnets, torn down without a trace.

One lab, every name starting with its prefix ``vlabXXXX`` (four hex digits, unique among live labs):

- ``PREFIX-sw``: the switch namespace, with a bridge ``PREFIXb<S>`` per subnet S. Subnets are
  separate bridges, so separate broadcast domains.
- ``PREFIX-rt``: the router namespace, made when a second subnet appears: a leg ``legS`` in every
  bridge at ``10.77.S.254``, forwarding and proxy ARP on, in this namespace only.
- ``PREFIX-h-NAME``: a host. ``eth0`` is a veth whose peer ``PREFIXh<I>`` is a port of its subnet's
  bridge; ``10.77.S.N/24`` with its broadcast address; lo up; an on-link route to every other
  subnet's /24, which the router answers ARP for. So unicast crosses subnets and broadcast does not.

Nothing is made in the root namespace. ``/tmp/PREFIX`` is the lab's scratch directory (control
sockets; logs and state unless the lab is given a workdir) and holds a lock its owner keeps for the
lab's life: that is how ``cleanup_stale`` tells a crashed run's leftovers from a live lab.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

NET = "10.77"
DEV = "eth0"
ROUTER = 254
NOT_ROOT = "needs root for network namespaces (ip netns): run as root, as CI does"

_PREFIX = re.compile(r"^vlab[0-9a-f]{4}$")
_STAGING = ".vlab-"
_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_LOCK = "lock"
_TIMEOUT = 10.0
# Inside the host: its own UTS namespace named after it, then the program (pinned) in place of sh.
_ENTER = 'hostname "$1" && shift && exec "$@"'


class LabError(RuntimeError):
    """A lab command failed; the message has the command and what it printed."""


def unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return NOT_ROOT
    for tool in ("ip", "unshare", "taskset", "hostname"):
        if shutil.which(tool) is None:
            return f"the network lab needs {tool} on PATH"
    if _ip("netns", "list", check=False).returncode != 0:
        return "the network lab needs `ip netns` (iproute2), which does not work here"
    return None


class Host:
    """One machine of the lab: a network namespace, an address, a name and maybe a CPU."""

    dev = DEV

    def __init__(self, lab: Lab, name: str, netns: str, address: str, subnet: int,
                 cpu: int | None) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns
        self.address = address
        self.subnet = subnet
        self.cpu = cpu

    @property
    def broadcast(self) -> str:
        return f"{NET}.{self.subnet}.255"

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address}, cpu={self.cpu})"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run inside this host: its namespace, its hostname, its CPU. Every step execs
        the next, so the process started is, in the end, the program itself (same pid)."""
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None else []
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts",
                "sh", "-c", _ENTER, "sh", self.name, *pin, *argv]

    def run(self, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host; the lab kills it on close. Its pid is the program's
        once the exec chain is through (a moment after start)."""
        return self.lab._start(self.command(argv), popen_kwargs)

    def exec(self, argv: Sequence[str], timeout: float = 30,
             **run_kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host to completion, output captured as text."""
        kwargs: dict[str, Any] = {"capture_output": True, "text": True,
                                  "stdin": subprocess.DEVNULL, **run_kwargs}
        return subprocess.run(self.command(argv), timeout=timeout, check=False, **kwargs)

    def link_down(self) -> None:
        """Cut the host off silently: packets to it vanish, nothing answers with a reset."""
        _ip("-n", self.netns, "link", "set", DEV, "down")

    def link_up(self) -> None:
        """Plug the host back in, with its routes to the other subnets (a link down drops them)."""
        _ip("-n", self.netns, "link", "set", DEV, "up")
        for subnet in self.lab.subnets:
            if subnet != self.subnet:
                self._route(subnet)

    def _route(self, subnet: int) -> None:
        _ip("-n", self.netns, "route", "replace", f"{NET}.{subnet}.0/24", "dev", DEV)


class Lab:
    """Network namespaces, bridges and processes that all go away on ``close()``."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.prefix, self.rundir, self._lock_fd = _claim_prefix()
        self.workdir = workdir or self.rundir
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._next_number: dict[int, int] = {}  # subnet -> next free host number in it
        self._router: str | None = None
        self._ports = 0
        self._closed = False
        self._owner = os.getpid()
        _OPEN.add(self)
        try:
            _remove_namespaces(self.prefix)  # a crashed run that had this prefix and lost its lock
            self.switch = self._add_netns("sw")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def subnets(self) -> list[int]:
        return sorted(self._next_number)

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def add_host(self, name: str, subnet_index: int = 0, cpu: int | None = None) -> Host:
        """A new host on subnet ``subnet_index`` (``10.77.<subnet>.0/24``), pinned to ``cpu``."""
        if not _HOST_NAME.match(name):
            raise ValueError(f"host name {name!r}: lower-case letters, digits and '-', "
                             "starting with a letter, at most 31 characters")
        if name in self.hosts:
            raise ValueError(f"host name {name!r} is taken in this lab")
        allowed = os.sched_getaffinity(0)
        if cpu is not None and cpu not in allowed:
            raise ValueError(f"cpu {cpu}: this process may use only {sorted(allowed)}")
        self._add_subnet(subnet_index)
        number = self._next_number[subnet_index]
        if number >= ROUTER:
            raise LabError(f"subnet {subnet_index} is full")
        self._next_number[subnet_index] = number + 1
        netns = self._add_netns(f"h-{name}")
        self._ports += 1
        self._plug(f"{self.prefix}h{self._ports}", subnet_index, DEV, netns)
        address = f"{NET}.{subnet_index}.{number}"
        _ip("-n", netns, "addr", "add", f"{address}/24", "brd", "+", "dev", DEV)
        host = Host(self, name, netns, address, subnet_index, cpu)
        host.link_up()
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill every process the lab started, then everything left in its namespaces; delete the
        namespaces (and with them every veth and bridge) and the scratch directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(_TIMEOUT)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for netns in reversed(self._namespaces):
            _delete_netns(netns)
        shutil.rmtree(self.rundir, ignore_errors=True)
        os.close(self._lock_fd)  # last: until here cleanup_stale in another run keeps off

    def _start(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        return proc

    def _add_netns(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def _plug(self, port: str, subnet: int, peer: str, netns: str) -> None:
        """A veth from a port of ``subnet``'s bridge to ``peer`` in ``netns``, both ends up."""
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", peer,
            "netns", netns)
        _ip("-n", self.switch, "link", "set", port, "master", f"{self.prefix}b{subnet}", "up")

    def _add_subnet(self, subnet: int) -> None:
        if subnet in self._next_number:
            return
        if not 0 <= subnet <= 255:
            raise ValueError(f"subnet {subnet}: 0 to 255 (10.77.<subnet>.0/24)")
        bridge = f"{self.prefix}b{subnet}"
        _ip("-n", self.switch, "link", "add", bridge, "type", "bridge")
        _ip("-n", self.switch, "link", "set", bridge, "up")
        self._next_number[subnet] = 1
        if len(self._next_number) < 2:
            return
        if self._router is None:
            self._router = self._add_netns("rt")
            self._sysctl("net.ipv4.ip_forward=1", "net.ipv4.conf.all.proxy_arp=1")
            for each in self.subnets:
                self._add_leg(each)
        else:
            self._add_leg(subnet)
        for host in self.hosts.values():
            host._route(subnet)

    def _add_leg(self, subnet: int) -> None:
        assert self._router is not None
        leg = f"leg{subnet}"
        self._plug(f"{self.prefix}r{subnet}", subnet, leg, self._router)
        _ip("-n", self._router, "addr", "add", f"{NET}.{subnet}.{ROUTER}/24", "brd", "+",
            "dev", leg)
        _ip("-n", self._router, "link", "set", leg, "up")
        self._sysctl(f"net.ipv4.neigh.{leg}.proxy_delay=0")  # answer ARP now, not in up to 0.8 s

    def _sysctl(self, *settings: str) -> None:
        """Set kernel parameters in the router's namespace, and only there."""
        assert self._router is not None
        _run(["ip", "netns", "exec", self._router, "sysctl", "-q", "-w", *settings])


def cleanup_stale() -> list[str]:
    """Remove what crashed labs left behind: the processes in their namespaces, the namespaces
    (with their veths and bridges) and their scratch directories. Labs whose owner is alive (it
    holds the lock) are left alone. Returns the prefixes cleaned."""
    tmp = Path(tempfile.gettempdir())
    prefixes = {ns.split("-", 1)[0] for ns in _netns_names()}
    prefixes |= {entry.name for entry in tmp.iterdir() if _PREFIX.match(entry.name)}
    cleaned = []
    for prefix in sorted(p for p in prefixes if _PREFIX.match(p)):
        fd = _try_lock(tmp / prefix / _LOCK)
        if fd is None:
            continue
        try:
            _remove_namespaces(prefix)
            shutil.rmtree(tmp / prefix, ignore_errors=True)
        finally:
            if fd >= 0:
                os.close(fd)
        cleaned.append(prefix)
    for staging in tmp.glob(f"{_STAGING}*"):
        fd = _try_lock(staging / _LOCK)
        if fd is not None:
            shutil.rmtree(staging, ignore_errors=True)
            if fd >= 0:
                os.close(fd)
    return cleaned


def _claim_prefix() -> tuple[str, Path, int]:
    """A prefix no live lab has: its directory appears, already locked, by an atomic rename."""
    tmp = Path(tempfile.gettempdir())
    while True:
        staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=tmp))
        try:
            fd = os.open(staging / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        except FileNotFoundError:  # a cleanup_stale elsewhere swept it before it was locked
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        prefix = "vlab" + secrets.token_hex(2)
        try:
            staging.rename(tmp / prefix)  # refused when that directory exists and is not empty
        except OSError:
            os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            continue
        return prefix, tmp / prefix, fd


def _try_lock(path: Path) -> int | None:
    """None when a live lab holds ``path``; else a descriptor holding it, or -1 if there is none."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _remove_namespaces(prefix: str) -> None:
    for netns in _netns_names():
        if netns.startswith(f"{prefix}-"):
            _delete_netns(netns)


def _netns_names() -> list[str]:
    lines = _ip("netns", "list", check=False).stdout.splitlines()
    return [line.split()[0] for line in lines if line.strip()]


def _delete_netns(netns: str) -> None:
    """SIGKILL everything inside ``netns`` until nothing is left (bounded), then delete it."""
    deadline = time.monotonic() + _TIMEOUT
    while True:
        pids = [int(word) for word in _ip("netns", "pids", netns, check=False).stdout.split()]
        if not pids or time.monotonic() > deadline:
            break
        exits = []  # a pidfd turns readable once its process has ended
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                exits.append(os.pidfd_open(pid))
        try:
            if exits:
                select.select(exits, [], [], max(0.0, deadline - time.monotonic()))
        finally:
            for fd in exits:
                os.close(fd)
    _ip("netns", "delete", netns, check=False)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=30, check=False)
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed with {result.returncode}: "
                       f"{result.stderr.strip()}")
    return result


_OPEN: set[Lab] = set()


@atexit.register
def _close_all() -> None:
    """The safety net: labs nobody closed are closed when the interpreter exits."""
    for lab in list(_OPEN):
        if lab._owner == os.getpid():  # not in a forked child that happens to exit normally
            lab.close()
