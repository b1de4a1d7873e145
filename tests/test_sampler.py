"""The sampler over a fake machine: the owner's load told from the lent load, the pause for the
owner (and its end after ``reclaim_s``), the offer while paused and near ``thermal_max_c``."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from vesta.config import build_config
from vesta.sampler import LENDING_INTERVAL, SUSPEND_GAP_S, Sampler
from vesta.sysstat import Sysstat

JIFFIES_PER_S = 100


@dataclass
class Machine:
    """Two CPUs whose /proc/stat the test moves on, a clock, and lent work's CPU meter (work is
    lent unless a test says otherwise)."""

    root: Path
    now: float = 0.0
    lent_s: float = 0.0
    lending_now: bool = True
    daemon_s: float = 0.0  # the CPU the daemon itself used
    busy: int = 0  # jiffies each CPU has been busy, at normal priority
    nice: int = 0  # and at a lowered one
    idle: int = 0

    def lent_cpu_seconds(self) -> float:
        return self.lent_s

    def lending(self) -> bool:
        return self.lending_now

    def clock(self) -> float:
        return self.now

    def own_cpu(self) -> float:
        return self.daemon_s

    def write(self) -> None:
        line = f"{self.busy} {self.nice} 0 {self.idle} 0 0 0 0 0 0"
        (self.root / "proc/stat").write_text(f"cpu  0 0 0 0\ncpu0 {line}\ncpu1 {line}\n")

    def second(self, busy_share: float, lent_cores: float, nice_share: float = 0.0) -> None:
        """One second passes: both CPUs busy ``busy_share`` of it at normal priority and
        ``nice_share`` at a lowered one, ``lent_cores`` cores of which ran lent work."""
        self.now += 1.0
        self.busy += round(JIFFIES_PER_S * busy_share)
        self.nice += round(JIFFIES_PER_S * nice_share)
        self.idle += round(JIFFIES_PER_S * (1 - busy_share - nice_share))
        self.lent_s += lent_cores
        self.write()

    def temperature(self, celsius: float) -> None:
        zone = self.root / "sys/class/thermal/thermal_zone0"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "type").write_text("cpu-thermal")
        (zone / "temp").write_text(str(int(celsius * 1000)))


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal: 4194304 kB\nMemAvailable: 2097152 kB\n")
    made = Machine(tmp_path)
    made.write()
    return made


def sampler(machine: Machine, **settings: Any) -> Sampler:
    config = build_config({"key": "sampler-test-key-0123", "name": "pi4", "cpu_offer_pct": 100,
                           "reserve_pct": 0, "reclaim_s": 3, **settings})
    return Sampler(Sysstat(machine.root, cpus={0, 1}), config, "fp", "10.0.0.2", 1.0,
                   lent=machine, clock=machine.clock, own_cpu=machine.own_cpu)


def test_lent_work_is_told_apart_from_the_owners(machine: Machine) -> None:
    watch = sampler(machine)
    machine.second(busy_share=1.0, lent_cores=1.5)

    info = watch.sample()

    assert (info.cpu_pct, info.lent_cpu_pct, info.paused) == (100.0, 75.0, "")
    assert info.offer_workers == 2


def test_work_another_node_lends_on_these_cpus_is_not_the_owners(machine: Machine) -> None:
    """Two nodes on one machine share a CPU: what the other runs for its peers, at nice 19, is
    no reason to pause what this one lends."""
    watch = sampler(machine)
    for _ in range(3):
        machine.second(busy_share=0.1, nice_share=0.9, lent_cores=0.4)
        info = watch.sample()
        assert (info.cpu_pct, info.lent_cpu_pct, info.owner_cpu_pct) == (100.0, 20.0, 10.0)
        assert info.paused == "" and info.offer_workers == 2


def test_the_owner_at_the_line_pauses_lent_work_and_the_node_offers_nothing(
    machine: Machine,
) -> None:
    watch = sampler(machine)
    machine.second(busy_share=1.0, lent_cores=0.2)  # the owner: 90% of both cores
    first = watch.sample()
    assert first.paused == ""  # once might be a blip: lent work goes on,
    assert first.offer_workers == 0  # but nothing new is offered while the owner is busy
    machine.second(busy_share=1.0, lent_cores=0.2)

    info = watch.sample()

    assert info.paused == "its owner's load is 90%, at or over the 80% spill line"
    assert (info.offer_workers, info.offer_mem_mb) == (0, 0)


def test_lent_work_runs_again_after_reclaim_s_below_the_line(machine: Machine) -> None:
    watch = sampler(machine)
    for _ in range(2):
        machine.second(busy_share=1.0, lent_cores=0.0)
        watch.sample()
    assert watch.owner_first.paused
    for _ in range(3):  # below the line since the first of these readings: not yet 3 s
        machine.second(busy_share=0.1, lent_cores=0.0)
        assert watch.sample().paused
    machine.second(busy_share=0.1, lent_cores=0.0)
    info = watch.sample()
    assert info.paused == "" and info.offer_workers == 2


def test_the_offer_shrinks_near_thermal_max_and_lent_work_pauses_at_it(machine: Machine) -> None:
    watch = sampler(machine, thermal_max_c=85)
    machine.temperature(80.0)  # halfway through the 10 degrees below the maximum
    machine.second(busy_share=0.0, lent_cores=0.0)
    assert watch.sample().offer_workers == 1

    machine.temperature(85.0)
    machine.second(busy_share=0.0, lent_cores=0.0)
    info = watch.sample()
    assert info.paused == "its CPU is at 85 C, at or over thermal_max_c 85"
    assert info.offer_workers == 0


def test_it_samples_four_times_a_second_while_it_lends(machine: Machine) -> None:
    watch = sampler(machine)
    machine.lending_now = False
    assert watch._next_interval() == 1.0
    machine.lending_now = True
    assert watch._next_interval() == LENDING_INTERVAL <= 0.25


def test_lending_that_begins_mid_wait_is_read_within_a_lending_interval(
        machine: Machine) -> None:
    """Work lent while the sampler waits out its long idle interval: the next reading comes a
    lending interval later, not at the end of that wait."""
    watch = sampler(machine)
    watch.interval = 30.0  # far longer than the test may take
    machine.lending_now = False
    readings: queue.SimpleQueue[float] = queue.SimpleQueue()
    watch.targets = [lambda _msg: readings.put(time.monotonic())]
    watch.start()
    try:
        wait_for(lambda: watch._waiting_long, timeout=5, what="the sampler's long wait")
        machine.lending_now = True
        began = time.monotonic()
        watch.lending_began()
        read = readings.get(timeout=5.0)
        assert read - began <= LENDING_INTERVAL + 0.2
        assert readings.get(timeout=5.0) - read <= LENDING_INTERVAL + 0.2  # and on, as often
        watch.lending_began()  # once it lends, a start does not put the next reading off
        assert readings.get(timeout=5.0) - read <= 2 * LENDING_INTERVAL + 0.2
    finally:
        watch.stop()
        watch.join(5)
    assert not watch.is_alive()


def test_a_suspend_is_told_from_the_boot_clock_running_ahead(machine: Machine) -> None:
    boot = [100.0]
    watch = Sampler(Sysstat(machine.root, cpus={0, 1}), sampler(machine).config, "fp", "", 1.0,
                    clock=machine.clock, boot=lambda: boot[0])
    machine.now += 1.0
    boot[0] += 1.0
    assert watch.slept() == 0.0  # both clocks ran alike
    machine.now += 1.0
    boot[0] += 1.0 + SUSPEND_GAP_S - 0.1  # jitter, not a suspend
    assert watch.slept() == 0.0
    machine.now += 0.25
    boot[0] += 0.25 + 3600.0  # the lid was closed for an hour
    assert watch.slept() == pytest.approx(3600.0)


def test_the_daemons_own_load_is_not_the_owners(machine: Machine) -> None:
    watch = sampler(machine)
    machine.second(busy_share=1.0, lent_cores=0.2)
    machine.daemon_s += 1.6  # the daemon's own start: 80% of the two cores

    info = watch.sample()

    assert (info.cpu_pct, info.lent_cpu_pct, info.owner_cpu_pct) == (100.0, 10.0, 10.0)
    assert info.paused == ""
