"""Readings of this machine: CPU load, memory, power supply, temperatures and GPU presence.

Everything is read from ``/proc`` and ``/sys`` below a root path, so that tests can hand in a fake
tree. The CPU figures are those of the CPUs this process may run on (its affinity mask): a daemon
started with ``taskset -c 1`` has one core, and its load is that core's load.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

#: The shortest span, in jiffies (usually 10 ms) per CPU, over which a load figure is computed.
MIN_JIFFIES = 5


@dataclass(frozen=True)
class Supply:
    """One entry of /sys/class/power_supply."""

    name: str
    type: str  # "Battery", "Mains", "USB", ...
    online: bool | None = None
    status: str = ""  # for batteries: "Charging", "Discharging", "Full", "Not charging"
    capacity: float | None = None  # battery charge, percent
    scope: str = ""  # "Device" for a peripheral's own battery (a mouse, a stylus); "" or "System"


@dataclass(frozen=True)
class Reading:
    """One sample of the machine."""

    cores: int
    cpu_pct: float
    mem_available_mb: int
    mem_total_mb: int
    supplies: tuple[Supply, ...] = ()
    temps_c: dict[str, float] = field(default_factory=dict)
    gpu: bool = False
    nice_pct: float = 0.0  # the share of cpu_pct spent at a lowered priority (lent work's)


class Sysstat:
    """Reads the machine. :meth:`read` gives the CPU load since the previous call."""

    def __init__(self, root: str | os.PathLike[str] = "/", cpus: set[int] | None = None) -> None:
        self.root = Path(root)
        self.cpus = frozenset(cpus if cpus is not None else os.sched_getaffinity(0))
        self._last = self._cpu_times()
        self._pct = self._nice_pct = 0.0
        self._gpu: bool | None = None

    def read(self) -> Reading:
        available, total = self.memory_mb()
        return Reading(
            cores=len(self.cpus),
            cpu_pct=self.cpu_pct(),
            nice_pct=self._nice_pct,
            mem_available_mb=available,
            mem_total_mb=total,
            supplies=self.power_supplies(),
            temps_c=self.temperatures(),
            gpu=self.has_gpu(),
        )

    # -- CPU ---------------------------------------------------------------------------------------

    def cpu_pct(self) -> float:
        """Busy share of the allowed CPUs since the previous call, 0-100.

        Over too short a span (under :data:`MIN_JIFFIES` per CPU) the counters say nothing
        useful: the previous figure is kept and the span goes on.
        """
        now = self._cpu_times()
        busy = total = nice = 0
        for cpu in self.cpus:
            if cpu in now and cpu in self._last:
                (b1, t1, n1), (b0, t0, n0) = now[cpu], self._last[cpu]
                busy, total, nice = busy + b1 - b0, total + t1 - t0, nice + n1 - n0
        if total >= MIN_JIFFIES * max(1, len(self.cpus)):
            self._last = now
            self._pct = round(100.0 * busy / total, 1)
            self._nice_pct = round(100.0 * nice / total, 1)
        return self._pct

    def _cpu_times(self) -> dict[int, tuple[int, int, int]]:
        """(busy, total, nice) jiffies per CPU from /proc/stat: nice is the time in user mode
        at a lowered priority, the work run for peers (this node's, or another's on a CPU it
        shares)."""
        times: dict[int, tuple[int, int, int]] = {}
        try:
            text = (self.root / "proc/stat").read_text()
        except OSError:
            return times
        for line in text.splitlines():
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            try:
                cpu = int(name[3:])
                values = [int(v) for v in fields[:8]]
            except ValueError:
                continue
            if len(values) < 4:
                continue
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            total = sum(values)
            times[cpu] = (total - idle, total, values[1])
        return times

    # -- memory ------------------------------------------------------------------------------------

    def memory_mb(self) -> tuple[int, int]:
        """(available, total) memory in MiB from /proc/meminfo."""
        info: dict[str, int] = {}
        try:
            text = (self.root / "proc/meminfo").read_text()
        except OSError:
            return 0, 0
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0])  # kB
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable")
        if available is None:  # kernels before 3.14
            available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
        return available // 1024, total // 1024

    # -- power -------------------------------------------------------------------------------------

    def power_supplies(self) -> tuple[Supply, ...]:
        base = self.root / "sys/class/power_supply"
        supplies = []
        for entry in sorted(_listdir(base)):
            d = base / entry
            kind = _read(d / "type")
            if not kind:
                continue
            online = _read(d / "online")
            capacity = _read(d / "capacity")
            supplies.append(Supply(
                name=entry,
                type=kind,
                online=None if online == "" else online == "1",
                status=_read(d / "status"),
                capacity=float(capacity) if _is_number(capacity) else None,
                scope=_read(d / "scope"),
            ))
        return tuple(supplies)

    # -- temperatures and GPU ----------------------------------------------------------------------

    def temperatures(self) -> dict[str, float]:
        """Thermal zones in degrees Celsius, keyed by their type."""
        base = self.root / "sys/class/thermal"
        temps: dict[str, float] = {}
        for entry in sorted(_listdir(base)):
            if not entry.startswith("thermal_zone"):
                continue
            raw = _read(base / entry / "temp")
            if _is_number(raw):
                kind = _read(base / entry / "type") or entry
                temps[kind if kind not in temps else f"{kind}-{entry[12:]}"] = float(raw) / 1000
        return temps

    def has_gpu(self) -> bool:
        """Whether the machine has a GPU a job could compute on: an NVIDIA device, or a DRM
        render node of a driver other than those of a virtual machine's display or a small
        board's video core (a Raspberry Pi's v3d has a render node too)."""
        if self._gpu is None:
            drm = self.root / "sys/class/drm"
            self._gpu = (self.root / "dev/nvidia0").exists() or any(
                name.startswith("renderD") and _driver(drm / name) not in NOT_COMPUTE_GPUS
                for name in _listdir(drm)
            )
        return self._gpu


#: DRM drivers whose render node is no GPU to compute on: virtual machines' displays, and the
#: video cores of small boards (a Raspberry Pi's vc4 and v3d).
NOT_COMPUTE_GPUS = frozenset({"v3d", "vc4", "virtio_gpu", "virtio-gpu", "vmwgfx", "qxl", "bochs",
                              "bochs-drm", "cirrus", "vkms", "simpledrm"})


def _driver(node: Path) -> str:
    """The kernel driver of a DRM node ("" where /sys does not say)."""
    try:
        return os.path.basename(os.readlink(node / "device" / "driver"))
    except OSError:
        return ""


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def ipv4_interfaces() -> list[tuple[str, str, str | None]]:
    """(interface, address, broadcast) for each IPv4 address, loopback excluded."""
    import psutil  # only the daemon needs it

    found = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                found.append((name, a.address, a.broadcast))
    return found


def ipv4_networks() -> list[tuple[str, str, str, str | None]]:
    """(interface, address, netmask, broadcast) for each IPv4 address, loopback excluded."""
    import psutil  # only the daemon needs it

    found = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127.") and a.netmask:
                found.append((name, a.address, a.netmask, a.broadcast))
    return found


def primary_ipv4() -> str | None:
    """The first non-loopback IPv4 address, the one to tell peers when nothing else is set."""
    interfaces = ipv4_interfaces()
    return interfaces[0][1] if interfaces else None
