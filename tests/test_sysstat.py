"""Tests for vesta.sysstat over a fake /proc and /sys tree, and one reading of the real machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vesta.sysstat import MIN_JIFFIES, Reading, Supply, Sysstat

# user nice system idle iowait irq softirq steal guest guest_nice
STAT_BEFORE = """\
cpu  4000 0 2000 40000 400 0 0 0 0 0
cpu0 1000 0 500 10000 100 0 0 0 0 0
cpu1 1000 0 500 10000 100 0 0 0 0 0
cpu2 1000 0 500 10000 100 0 0 0 0 0
cpu3 1000 0 500 10000 100 0 0 0 0 0
intr 12345 0 0
ctxt 99999
btime 1700000000
processes 4242
"""
# One second later: cpu1 spent 100 jiffies busy (user, system, irq, steal), cpu2 100 idle
# (idle and iowait), cpu0 and cpu3 were fully busy and the total line says something else.
STAT_AFTER = """\
cpu  9999 0 9999 99999 999 0 0 0 0 0
cpu0 1100 0 500 10000 100 0 0 0 0 0
cpu1 1040 0 530 10000 100 10 10 10 0 0
cpu2 1000 0 500 10070 130 0 0 0 0 0
cpu3 1000 0 600 10000 100 0 0 0 0 0
intr 12399 0 0
ctxt 100001
"""

MEMINFO = """\
MemTotal:       16384000 kB
MemFree:         1024000 kB
MemAvailable:    8192000 kB
Buffers:          204800 kB
Cached:          2048000 kB
SwapTotal:             0 kB
HugePages_Total:       0
"""
MEMINFO_OLD_KERNEL = """\
MemTotal:       16384000 kB
MemFree:         1024000 kB
Buffers:          204800 kB
Cached:          2048000 kB
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A machine with four CPUs, 16 GB, a discharging battery, mains, two sensors and a GPU."""
    write(tmp_path / "proc/stat", STAT_BEFORE)
    write(tmp_path / "proc/meminfo", MEMINFO)
    ps = tmp_path / "sys/class/power_supply"
    for name, value in {"type": "Battery", "status": "Discharging", "capacity": "42"}.items():
        write(ps / "BAT0" / name, value + "\n")
    for name, value in {"type": "Mains", "online": "1"}.items():
        write(ps / "AC" / name, value + "\n")
    write(ps / "hidpp_battery_0/status", "Unknown\n")  # no type: not a supply worth reading
    thermal = tmp_path / "sys/class/thermal"
    write(thermal / "thermal_zone0/type", "x86_pkg_temp\n")
    write(thermal / "thermal_zone0/temp", "45500\n")
    write(thermal / "cooling_device0/type", "Processor\n")
    write(thermal / "cooling_device0/temp", "99000\n")
    (tmp_path / "sys/class/drm/card0").mkdir(parents=True)
    (tmp_path / "sys/class/drm/renderD128").mkdir()
    return tmp_path


# -- CPU ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "expected"),
    [
        ({1}, 100.0),
        ({2}, 0.0),
        ({1, 2}, 50.0),
        ({0, 1, 2}, 66.7),
        ({0, 1, 2, 3}, 75.0),
    ],
)
def test_cpu_pct_counts_only_the_allowed_cpus(root: Path, cpus: set[int], expected: float) -> None:
    stat = Sysstat(root, cpus=cpus)
    write(root / "proc/stat", STAT_AFTER)
    assert stat.cpu_pct() == expected


def _bump(cpu1_busy: int, cpu2_idle: int) -> str:
    """STAT_AFTER with cpu1 ``cpu1_busy`` jiffies busier and cpu2 ``cpu2_idle`` jiffies idler."""
    return STAT_AFTER.replace(
        "cpu1 1040 ", f"cpu1 {1040 + cpu1_busy} "
    ).replace("cpu2 1000 0 500 10070 ", f"cpu2 1000 0 500 {10070 + cpu2_idle} ")


def test_cpu_pct_is_since_the_previous_figure(root: Path) -> None:
    stat = Sysstat(root, cpus={1, 2})
    write(root / "proc/stat", STAT_AFTER)
    assert stat.cpu_pct() == 50.0
    write(root / "proc/stat", _bump(30, 10))
    assert stat.cpu_pct() == 75.0  # 30 of 40 new jiffies, not counting the earlier 100 of 200


def test_too_short_a_span_keeps_the_previous_figure(root: Path) -> None:
    stat = Sysstat(root, cpus={1, 2})
    write(root / "proc/stat", STAT_AFTER)
    assert stat.cpu_pct() == 50.0
    assert stat.cpu_pct() == 50.0  # nothing passed
    short = MIN_JIFFIES * 2 - 1
    write(root / "proc/stat", _bump(short, 0))  # all busy, but under MIN_JIFFIES per CPU
    assert stat.cpu_pct() == 50.0
    write(root / "proc/stat", _bump(short, 1))  # the span goes on from the 50% reading
    assert stat.cpu_pct() == round(100 * short / (short + 1), 1)


def test_cpu_outside_the_machine_reads_zero(root: Path) -> None:
    stat = Sysstat(root, cpus={7})
    write(root / "proc/stat", STAT_AFTER)
    assert stat.cpu_pct() == 0.0
    assert stat.read().cores == 1


def test_garbled_stat_lines_are_skipped(root: Path) -> None:
    stat = Sysstat(root, cpus={1, 2})
    write(root / "proc/stat", STAT_AFTER + "cpuX 1 2 3\ncpu9 a b c d\ncpu2 1 2\n")
    assert stat.cpu_pct() == 50.0


def test_cores_are_the_cpus_given(root: Path) -> None:
    assert Sysstat(root, cpus={0, 2, 3}).read().cores == 3


# -- memory ---------------------------------------------------------------------------------------


def test_memory_from_mem_available(root: Path) -> None:
    assert Sysstat(root, cpus={0}).memory_mb() == (8000, 16000)


def test_memory_without_mem_available(root: Path) -> None:
    write(root / "proc/meminfo", MEMINFO_OLD_KERNEL)
    # MemFree + Buffers + Cached = 3276800 kB
    assert Sysstat(root, cpus={0}).memory_mb() == (3200, 16000)


# -- power, temperatures, GPU ---------------------------------------------------------------------


def test_power_supplies(root: Path) -> None:
    assert Sysstat(root, cpus={0}).power_supplies() == (
        Supply("AC", "Mains", online=True, status="", capacity=None),
        Supply("BAT0", "Battery", online=None, status="Discharging", capacity=42.0),
    )


def test_a_peripherals_battery_says_its_scope(root: Path) -> None:
    ps = root / "sys/class/power_supply"
    for name, value in {"type": "Battery", "scope": "Device", "status": "Discharging",
                        "capacity": "20"}.items():
        write(ps / "hid-mouse" / name, value + "\n")
    supplies = {s.name: s for s in Sysstat(root, cpus={0}).power_supplies()}
    assert supplies["hid-mouse"].scope == "Device" and supplies["BAT0"].scope == ""


def test_power_supply_offline_and_odd_capacity(root: Path) -> None:
    ps = root / "sys/class/power_supply"
    write(ps / "AC/online", "0\n")
    write(ps / "BAT0/capacity", "unknown\n")
    supplies = {s.name: s for s in Sysstat(root, cpus={0}).power_supplies()}
    assert supplies["AC"].online is False
    assert supplies["BAT0"].capacity is None


def test_temperatures_in_celsius(root: Path) -> None:
    thermal = root / "sys/class/thermal"
    write(thermal / "thermal_zone1/type", "x86_pkg_temp\n")
    write(thermal / "thermal_zone1/temp", "51000\n")
    write(thermal / "thermal_zone2/temp", "-5000\n")  # no type: named after the zone
    write(thermal / "thermal_zone3/type", "acpitz\n")
    write(thermal / "thermal_zone3/temp", "n/a\n")
    write(thermal / "thermal_zone4/type", "soc\n")
    write(thermal / "thermal_zone4/temp", "42500.5\n")  # a driver with a fraction
    assert Sysstat(root, cpus={0}).temperatures() == {
        "x86_pkg_temp": 45.5,
        "x86_pkg_temp-1": 51.0,
        "thermal_zone2": -5.0,
        "soc": 42.5005,
    }


def test_gpu_with_a_render_node(root: Path) -> None:
    assert Sysstat(root, cpus={0}).has_gpu() is True


@pytest.mark.parametrize(("driver", "gpu"), [("amdgpu", True), ("i915", True), ("v3d", False),
                                             ("virtio_gpu", False)])
def test_a_render_node_is_a_gpu_unless_a_vm_display_or_a_boards_video_core(
        root: Path, driver: str, gpu: bool) -> None:
    """A Raspberry Pi 4's v3d, or a virtual machine's display, has a render node and no GPU
    that an ``exec --gpu`` job could use."""
    node = root / "sys/class/drm/renderD128"
    (node / "device").mkdir(parents=True)
    (root / "drivers" / driver).mkdir(parents=True)
    (node / "device" / "driver").symlink_to(root / "drivers" / driver)
    assert Sysstat(root, cpus={0}).has_gpu() is gpu


def test_no_gpu_without_a_render_node(root: Path) -> None:
    (root / "sys/class/drm/renderD128").rmdir()
    assert Sysstat(root, cpus={0}).has_gpu() is False


def test_gpu_with_an_nvidia_device(root: Path) -> None:
    (root / "sys/class/drm/renderD128").rmdir()
    write(root / "dev/nvidia0", "")
    assert Sysstat(root, cpus={0}).has_gpu() is True


def test_full_reading(root: Path) -> None:
    stat = Sysstat(root, cpus={1, 2})
    write(root / "proc/stat", STAT_AFTER)
    reading = stat.read()
    assert reading == Reading(
        cores=2,
        cpu_pct=50.0,
        mem_available_mb=8000,
        mem_total_mb=16000,
        supplies=(
            Supply("AC", "Mains", True, "", None),
            Supply("BAT0", "Battery", None, "Discharging", 42.0),
        ),
        temps_c={"x86_pkg_temp": 45.5},
        gpu=True,
    )


# -- nothing there --------------------------------------------------------------------------------


def test_empty_root_reads_zeros(tmp_path: Path) -> None:
    stat = Sysstat(tmp_path, cpus={0, 1})
    assert stat.read() == Reading(
        cores=2, cpu_pct=0.0, mem_available_mb=0, mem_total_mb=0, supplies=(), temps_c={},
        gpu=False,
    )


def test_unreadable_entries_read_as_empty(tmp_path: Path) -> None:
    """Directories where files should be: every read fails, none of them raises."""
    for path in ["proc/stat", "proc/meminfo", "sys/class/power_supply/BAT0/type",
                 "sys/class/thermal/thermal_zone0/temp"]:
        (tmp_path / path).mkdir(parents=True)
    write(tmp_path / "sys/class/drm", "not a directory")
    stat = Sysstat(tmp_path, cpus={0})
    assert stat.read() == Reading(cores=1, cpu_pct=0.0, mem_available_mb=0, mem_total_mb=0)


def test_empty_files_read_as_empty(tmp_path: Path) -> None:
    for path in ["proc/stat", "proc/meminfo", "sys/class/power_supply/BAT0/type",
                 "sys/class/thermal/thermal_zone0/temp"]:
        write(tmp_path / path, "")
    stat = Sysstat(tmp_path, cpus={0})
    assert stat.read() == Reading(cores=1, cpu_pct=0.0, mem_available_mb=0, mem_total_mb=0)


# -- the real machine -----------------------------------------------------------------------------


def test_real_machine_cores_follow_the_affinity_mask() -> None:
    stat = Sysstat()
    assert stat.cpus == frozenset(os.sched_getaffinity(0))
    reading = stat.read()
    assert reading.cores == len(os.sched_getaffinity(0))
    assert 0.0 <= reading.cpu_pct <= 100.0
    assert 0 < reading.mem_available_mb <= reading.mem_total_mb
