"""The sampler: reads this machine on a timer, off the actors' threads, and tells them the result.

Reading /proc and /sys can take tens of milliseconds on a slow machine, so the actors never do it
themselves: a :class:`Sampler` thread reads, turns the reading into this node's
:class:`~vesta.messages.NodeInfo` (load, memory, power mode, offer, what it accepts) with the pure
rules of :mod:`vesta.policy`, and tells every actor that keeps it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vesta import PROTOCOL_VERSION
from vesta.messages import Message, NodeInfo, Woke
from vesta.policy import OwnerFirst, offer_mem_mb, offer_workers, power_state, thermal_share
from vesta.sysstat import Reading, Sysstat

logger = logging.getLogger(__name__)


def node_info(reading: Reading, config: Any, fingerprint: str, address: str,
              lent_cpu_pct: float = 0.0, paused: str = "",
              owner_cpu_pct: float | None = None) -> NodeInfo:
    """What this node tells about itself, from one reading: while ``paused``, or while its
    owner's load is at or over the spill line, it offers nothing (it would refuse anyway), and
    within 10 degrees of ``thermal_max_c`` its offer shrinks."""
    power = power_state(reading.supplies, config.power, config.battery_min_pct)
    busy = owner_cpu_pct is not None and owner_cpu_pct >= config.spill_cpu_pct
    share = 0.0 if paused or busy else power.willingness * thermal_share(
        hottest(reading.temps_c), config.thermal_max_c)
    return NodeInfo(
        name=config.name, fingerprint=fingerprint, address=address, version=PROTOCOL_VERSION,
        cores=reading.cores, cpu_pct=reading.cpu_pct, mem_available_mb=reading.mem_available_mb,
        mem_total_mb=reading.mem_total_mb, power=power.mode,
        willingness=round(power.willingness, 3), battery_pct=power.battery_pct,
        offer_workers=offer_workers(reading.cores, config.cpu_offer_pct, config.reserve_pct,
                                    share),
        offer_mem_mb=offer_mem_mb(reading.mem_available_mb, reading.mem_total_mb,
                                  config.mem_offer_mb, config.reserve_pct, share),
        gpu=reading.gpu, allow_exec=config.allow_exec, exec_allowlist=list(config.exec_allowlist),
        temps_c=reading.temps_c, lent_cpu_pct=round(lent_cpu_pct, 1), paused=paused,
        owner_cpu_pct=round(max(0.0, reading.cpu_pct - lent_cpu_pct)
                            if owner_cpu_pct is None else owner_cpu_pct, 1),
    )


def hottest(temps_c: dict[str, float]) -> float | None:
    return max(temps_c.values()) if temps_c else None


def describe(node: NodeInfo) -> dict[str, Any]:
    """A node as ``status`` and ``peers`` show it: its fields (the owner's share of the load and
    the share lent to peers among them), and the hottest temperature (null where unknown)."""
    doc = dict(zip(node.fields, node.values(), strict=True))
    doc.update(temp_c=hottest(node.temps_c))
    return doc


class LentMeter(Protocol):
    """What the sampler asks the job supervisor: the CPU work lent to peers has used so far
    (seconds, never decreasing), and whether any runs now."""

    def lent_cpu_seconds(self) -> float: ...

    def lending(self) -> bool: ...


#: Seconds between readings while this node runs work for peers: an owner who wants the CPU back
#: gets it within a second (SPEC).
LENDING_INTERVAL = 0.25
#: Seconds the boot clock must run ahead of the monotonic clock between two readings for the
#: machine to count as having been suspended.
SUSPEND_GAP_S = 2.0


def boot_clock() -> float:
    """CLOCK_BOOTTIME: like the monotonic clock, but it goes on while the machine is suspended
    (not the wall clock, which NTP steps on a Pi without a clock chip)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Sampler(threading.Thread):
    """Every ``interval`` seconds (four times a second while lending): read the machine, tell the
    owner's load from the lent load, decide whether lent work must pause for the owner, and tell
    ``targets`` the NodeInfo."""

    def __init__(self, sysstat: Sysstat, config: Any, fingerprint: str, address: str,
                 interval: float, lent: LentMeter | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 boot: Callable[[], float] = boot_clock,
                 own_cpu: Callable[[], float] = time.process_time) -> None:
        super().__init__(name="vesta-sampler", daemon=True)
        self.sysstat = sysstat
        self.config = config
        self.fingerprint = fingerprint
        self.address = address
        self.interval = interval
        self.lent = lent
        self.clock = clock
        self.owner_first = OwnerFirst(config.spill_cpu_pct, config.reclaim_s,
                                      config.thermal_max_c)
        self.boot = boot
        self.own_cpu = own_cpu
        self.targets: Sequence[Callable[[Message], object]] = ()
        self._stopped = threading.Event()
        self._hurry = threading.Event()  # lending began: the next reading comes sooner
        self._waiting_long = False  # the thread waits longer than LENDING_INTERVAL now
        self._lent_mark = (clock(), self._lent_seconds(), own_cpu())
        self._clocks = (clock(), boot())

    def _lent_seconds(self) -> float:
        return self.lent.lent_cpu_seconds() if self.lent is not None else 0.0

    def sample(self) -> NodeInfo:
        """A reading, the lent load and the owner's: all the load less the lent work's and the
        daemon's own (its start, its links), which is neither the owner's nor a peer's."""
        reading = self.sysstat.read()
        now, lent, own = self.clock(), self._lent_seconds(), self.own_cpu()
        then, before, own_before = self._lent_mark
        self._lent_mark = (now, lent, own)
        wall = (now - then) * max(1, reading.cores)
        lent_pct = min(reading.cpu_pct, 100 * (lent - before) / wall) if wall > 0 else 0.0
        # (a fork server started again counts from nothing: never less than none)
        own_pct = max(0.0, 100 * (own - own_before) / wall) if wall > 0 else 0.0
        lending = self.lent is not None and self.lent.lending()
        # work at a lowered priority is not the owner's: ours (measured), or that of another
        # node sharing these CPUs (nice time, as the kernel counts it)
        owner = max(0.0, reading.cpu_pct - max(lent_pct, reading.nice_pct) - own_pct)
        paused = self.owner_first.update(now, owner, hottest(reading.temps_c), lending)
        return node_info(reading, self.config, self.fingerprint, self.address, lent_pct, paused,
                         owner)

    def slept(self) -> float:
        """Seconds the machine was suspended since the last call; 0.0 if it was not."""
        now = (self.clock(), self.boot())
        (mono, boot), self._clocks = self._clocks, now
        gap = (now[1] - boot) - (now[0] - mono)
        return gap if gap >= SUSPEND_GAP_S else 0.0

    def lending_began(self) -> None:
        """Work for a peer starts: read again within :data:`LENDING_INTERVAL`, not at the end of
        a wait begun while nothing was lent (the owner gets the CPU back within a second of
        wanting it, whenever the lent work began)."""
        if self._waiting_long:
            self._hurry.set()

    def run(self) -> None:
        last = time.monotonic()
        while not self._stopped.is_set():
            interval = self._next_interval()
            self._waiting_long = interval > LENDING_INTERVAL
            if self._hurry.wait(interval):
                self._hurry.clear()
                self._stopped.wait(max(0.0, last + LENDING_INTERVAL - time.monotonic()))
            self._waiting_long = False
            if self._stopped.is_set():
                return
            last = time.monotonic()
            try:
                slept = self.slept()
                info = self.sample()
            except Exception:  # a reading that fails once must not end the sampling
                logger.exception("reading the machine failed")
                continue
            messages: list[Message] = [info]
            if slept:
                logger.info("the machine was suspended for %.0f s", slept)
                messages.insert(0, Woke(round(slept, 1)))
            for msg in messages:
                for tell in self.targets:
                    tell(msg)

    def _next_interval(self) -> float:
        if self.lent is not None and self.lent.lending():
            return min(self.interval, LENDING_INTERVAL)
        return self.interval

    def stop(self) -> None:
        self._stopped.set()
        self._hurry.set()
