"""The sampler: reads this machine on a timer, off the actors' threads, and tells them the result.

Reading /proc and /sys can take tens of milliseconds on a slow machine, so the actors never do it
themselves: a :class:`Sampler` thread reads, turns the reading into this node's
:class:`~vesta.messages.NodeInfo` (load, memory, power mode, offer, what it accepts) with the pure
rules of :mod:`vesta.policy`, and tells every actor that keeps it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vesta import PROTOCOL_VERSION
from vesta.messages import NodeInfo
from vesta.policy import offer_mem_mb, offer_workers, power_state
from vesta.sysstat import Reading, Sysstat

logger = logging.getLogger(__name__)


def node_info(reading: Reading, config: Any, fingerprint: str, address: str) -> NodeInfo:
    """What this node tells about itself, from one reading."""
    power = power_state(reading.supplies, config.power, config.battery_min_pct)
    return NodeInfo(
        name=config.name, fingerprint=fingerprint, address=address, version=PROTOCOL_VERSION,
        cores=reading.cores, cpu_pct=reading.cpu_pct, mem_available_mb=reading.mem_available_mb,
        mem_total_mb=reading.mem_total_mb, power=power.mode,
        willingness=round(power.willingness, 3), battery_pct=power.battery_pct,
        offer_workers=offer_workers(reading.cores, config.cpu_offer_pct, config.reserve_pct,
                                    power.willingness),
        offer_mem_mb=offer_mem_mb(reading.mem_available_mb, reading.mem_total_mb,
                                  config.mem_offer_mb, config.reserve_pct, power.willingness),
        gpu=reading.gpu, allow_exec=config.allow_exec, exec_allowlist=list(config.exec_allowlist),
        temps_c=reading.temps_c,
    )


def describe(node: NodeInfo) -> dict[str, Any]:
    """A node as ``status`` and ``peers`` show it: its fields, plus the owner's share of the load,
    the share lent to peers, and the hottest temperature (null where unknown)."""
    doc = dict(zip(node.fields, node.values(), strict=True))
    doc.update(
        owner_cpu_pct=round(max(0.0, node.cpu_pct - node.lent_cpu_pct), 1),
        temp_c=max(node.temps_c.values()) if node.temps_c else None,
    )
    return doc


class Sampler(threading.Thread):
    """Every ``interval`` seconds: read the machine and tell ``targets`` the NodeInfo."""

    def __init__(self, sysstat: Sysstat, config: Any, fingerprint: str, address: str,
                 interval: float) -> None:
        super().__init__(name="vesta-sampler", daemon=True)
        self.sysstat = sysstat
        self.config = config
        self.fingerprint = fingerprint
        self.address = address
        self.interval = interval
        self.targets: Sequence[Callable[[NodeInfo], object]] = ()
        self._stopped = threading.Event()

    def sample(self) -> NodeInfo:
        return node_info(self.sysstat.read(), self.config, self.fingerprint, self.address)

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                info = self.sample()
            except Exception:  # a reading that fails once must not end the sampling
                logger.exception("reading the machine failed")
                continue
            for tell in self.targets:
                tell(info)

    def stop(self) -> None:
        self._stopped.set()
