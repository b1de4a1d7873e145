"""Tests for vesta.policy: SPEC's energy and offer rules as tables, the split as properties."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta.policy import (
    BATTERY_WILLINGNESS,
    SOLAR_DEFAULT_WILLINGNESS,
    Power,
    battery_charge,
    exec_permitted,
    offer_mem_mb,
    offer_workers,
    power_state,
    split_units,
)
from vesta.sysstat import Supply

MIN = 15  # the default battery_min_pct


def bat(charge: float | None, status: str = "Discharging", name: str = "BAT0") -> Supply:
    return Supply(name, "Battery", None, status, charge)


def mains(online: bool) -> Supply:
    return Supply("AC", "Mains", online)


def usb(online: bool) -> Supply:
    return Supply("usb0", "USB", online)


# -- power ----------------------------------------------------------------------------------------

POWER_CASES = [
    # auto: grid, or charging -> everything
    ("no supplies at all", [], "auto", MIN, Power("grid", 1.0, None)),
    ("mains only", [mains(True)], "auto", MIN, Power("grid", 1.0, None)),
    ("mains offline, no battery", [mains(False)], "auto", MIN, Power("grid", 1.0, None)),
    ("charging", [bat(80, "Charging")], "auto", MIN, Power("grid", 1.0, 80)),
    ("charging below min", [bat(5, "Charging")], "auto", MIN, Power("grid", 1.0, 5)),
    ("full", [bat(100, "Full")], "auto", MIN, Power("grid", 1.0, 100)),
    ("not charging", [bat(60, "Not charging")], "auto", MIN, Power("grid", 1.0, 60)),
    ("unknown charge", [bat(None)], "auto", MIN, Power("grid", 1.0, None)),
    # auto: discharging
    ("discharging 80%", [bat(80)], "auto", MIN, Power("solar", 0.8, 80)),
    ("discharging 100%", [bat(100)], "auto", MIN, Power("solar", 1.0, 100)),
    ("discharging 50%", [bat(50)], "auto", MIN, Power("solar", 0.5, 50)),
    ("discharging 49.9%", [bat(49.9)], "auto", MIN, Power("battery", BATTERY_WILLINGNESS, 49.9)),
    ("discharging at min", [bat(15)], "auto", MIN, Power("battery", BATTERY_WILLINGNESS, 15)),
    ("below min", [bat(14.9)], "auto", MIN, Power("empty", 0.0, 14.9)),
    ("below a high min", [bat(39)], "auto", 40, Power("empty", 0.0, 39)),
    ("above a high min", [bat(45)], "auto", 40, Power("battery", BATTERY_WILLINGNESS, 45)),
    ("min 0", [bat(1)], "auto", 0, Power("battery", BATTERY_WILLINGNESS, 1)),
    ("min above half", [bat(55)], "auto", 60, Power("empty", 0.0, 55)),
    ("mains offline", [mains(False), bat(30)], "auto", MIN, Power("battery", 0.35, 30)),
    ("two batteries", [bat(70), bat(30, name="BAT1")], "auto", MIN, Power("solar", 0.5, 50)),
    (
        "one of two discharging",
        [bat(90, "Full"), bat(20, name="BAT1")],
        "auto",
        MIN,
        Power("solar", 0.55, 55),
    ),
    # mains online while the battery reports discharging is external power
    ("mains online", [mains(True), bat(10)], "auto", MIN, Power("grid", 1.0, 10)),
    ("usb online", [usb(True), bat(30)], "auto", MIN, Power("grid", 1.0, 30)),
    # forced modes
    ("forced grid", [bat(10)], "grid", MIN, Power("grid", 1.0, 10)),
    ("forced grid, none", [], "grid", MIN, Power("grid", 1.0, None)),
    ("forced solar", [bat(40)], "solar", MIN, Power("solar", 0.4, 40)),
    ("forced solar charging", [bat(90, "Charging")], "solar", MIN, Power("solar", 0.9, 90)),
    ("forced solar below min", [bat(5)], "solar", MIN, Power("solar", 0.05, 5)),
    ("forced solar, no battery", [], "solar", MIN, Power("solar", 0.75, None)),
    ("forced solar, mains", [mains(True)], "solar", MIN, Power("solar", 0.75, None)),
    ("forced battery", [bat(90, "Charging")], "battery", MIN, Power("battery", 0.35, 90)),
    ("forced battery, none", [mains(True)], "battery", MIN, Power("battery", 0.35, None)),
    ("forced battery below min", [bat(5)], "battery", MIN, Power("battery", 0.35, 5)),
]


@pytest.mark.parametrize(
    ("supplies", "forced", "battery_min", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in POWER_CASES],
)
def test_power_state(
    supplies: Sequence[Supply], forced: str, battery_min: float, expected: Power
) -> None:
    got = power_state(supplies, forced, battery_min)
    assert got.mode == expected.mode
    assert got.willingness == pytest.approx(expected.willingness)
    assert got.battery_pct == pytest.approx(expected.battery_pct)


def test_spec_constants() -> None:
    assert BATTERY_WILLINGNESS == 0.35
    assert SOLAR_DEFAULT_WILLINGNESS == 0.75


def test_battery_charge_reports_external_power() -> None:
    assert battery_charge([mains(True), bat(40)]) == (40.0, False, True)
    assert battery_charge([mains(False), bat(40)]) == (40.0, True, False)
    assert battery_charge([mains(True)]) == (None, False, True)
    assert battery_charge([]) == (None, False, False)


@settings(max_examples=200, deadline=None)
@given(
    charge=st.floats(min_value=0, max_value=100),
    status=st.sampled_from(["Charging", "Discharging", "Full", "Not charging", "Unknown"]),
    online=st.sampled_from([None, True, False]),
    forced=st.sampled_from(["auto", "grid", "solar", "battery"]),
    battery_min=st.integers(min_value=0, max_value=100),
)
def test_willingness_is_a_share(
    charge: float, status: str, online: bool | None, forced: str, battery_min: int
) -> None:
    supplies = [bat(charge, status)] + ([] if online is None else [mains(online)])
    power = power_state(supplies, forced, battery_min)
    assert 0.0 <= power.willingness <= 1.0
    assert power.mode in {"grid", "solar", "battery", "empty"}
    if forced != "auto":
        assert power.mode == forced
    elif power.mode == "empty":
        assert power.willingness == 0.0
    else:
        assert power.willingness >= BATTERY_WILLINGNESS


# -- the offer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "cpu_offer_pct", "reserve_pct", "willingness", "expected"),
    [
        (8, 75, 20, 1.0, 6),  # 8 * 0.75
        (8, 90, 20, 1.0, 6),  # the reserve caps the offer: 8 * 0.80 = 6.4
        (10, 90, 20, 1.0, 8),
        (10, 100, 0, 1.0, 10),
        (100, 29, 0, 1.0, 29),  # 0.29 * 100 is 28.999... in floats
        (16, 75, 20, 0.35, 4),  # 4.2
        (4, 75, 20, 0.35, 1),  # 1.05
        (10, 80, 20, 0.7, 5),  # 5.6
        (10, 50, 0, 0.6, 3),  # exactly 3
        (1, 75, 20, 0.1, 1),  # 0.075, but at least one while willing
        (2, 75, 20, 0.35, 1),  # 0.525
        (4, 75, 20, 0.0, 0),
        (64, 100, 0, 0.0, 0),
        (0, 75, 20, 1.0, 0),  # no core at all
        (8, 0, 20, 1.0, 0),  # offering nothing lends nothing
        (8, 75, 100, 1.0, 0),  # everything reserved
    ],
)
def test_offer_workers(
    cores: int, cpu_offer_pct: int, reserve_pct: int, willingness: float, expected: int
) -> None:
    assert offer_workers(cores, cpu_offer_pct, reserve_pct, willingness) == expected


@settings(max_examples=200, deadline=None)
@given(
    cores=st.integers(min_value=1, max_value=512),
    cpu_offer_pct=st.integers(min_value=0, max_value=100),
    reserve_pct=st.integers(min_value=0, max_value=100),
    will_pct=st.integers(min_value=0, max_value=100),
)
def test_offer_workers_matches_the_exact_formula(
    cores: int, cpu_offer_pct: int, reserve_pct: int, will_pct: int
) -> None:
    """SPEC's formula in integers, where no rounding can creep in."""
    share = min(cpu_offer_pct, 100 - reserve_pct)
    exact = cores * share * will_pct // (100 * 100)
    expected = max(1, exact) if will_pct > 0 and share > 0 else 0
    assert offer_workers(cores, cpu_offer_pct, reserve_pct, will_pct / 100) == expected


@pytest.mark.parametrize(
    ("available", "total", "cap", "reserve_pct", "willingness", "expected"),
    [
        (8000, 16000, 1024, 20, 1.0, 1024),  # spare 4800, capped
        (4000, 16000, 8192, 20, 1.0, 800),  # spare 4000 - 3200
        (4000, 16000, 8192, 20, 0.5, 400),
        (8000, 16000, 1024, 20, 0.35, 358),  # 358.4
        (3000, 16000, 1024, 20, 1.0, 0),  # less available than the reserve
        (8000, 16000, 1024, 20, 0.0, 0),
        (8000, 16000, 0, 20, 1.0, 0),
        (8000, 16000, 8192, 0, 1.0, 8000),
        (0, 0, 1024, 20, 1.0, 0),  # no readings
    ],
)
def test_offer_mem_mb(
    available: int, total: int, cap: int, reserve_pct: int, willingness: float, expected: int
) -> None:
    assert offer_mem_mb(available, total, cap, reserve_pct, willingness) == expected


# -- exec permission ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv0", "allow_exec", "allowlist", "permitted"),
    [
        ("make", False, [], False),
        ("make", False, ["make"], False),
        ("make", True, [], True),
        ("/bin/rm", True, [], True),
        ("make", True, ["make"], True),
        ("/usr/bin/make", True, ["make"], True),
        ("./make", True, ["make"], True),
        ("cmake", True, ["make"], False),
        ("make.sh", True, ["make"], False),
        ("/usr/bin/make", True, ["/usr/bin/make"], True),
        ("/opt/evil/make", True, ["/usr/bin/make"], False),
        ("make", True, ["/usr/bin/make"], False),
        ("python3", True, ["make", "python3"], True),
        ("gcc", True, ["make", "python3"], False),
    ],
)
def test_exec_permitted(
    argv0: str, allow_exec: bool, allowlist: list[str], permitted: bool
) -> None:
    ok, why = exec_permitted(argv0, allow_exec, allowlist)
    assert ok is permitted
    if ok:
        assert why == ""
    elif not allow_exec:
        assert "allow_exec" in why
    else:
        assert repr(argv0) in why
        assert "exec_allowlist" in why
        assert all(entry in why for entry in allowlist)


# -- splitting ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "parts", "expected"),
    [
        (0, 10, 3, [(0, 4), (4, 7), (7, 10)]),
        (0, 10, 1, [(0, 10)]),
        (0, 2, 5, [(0, 1), (1, 2)]),
        (40, 80, 4, [(40, 50), (50, 60), (60, 70), (70, 80)]),
        (5, 5, 3, []),
        (7, 3, 2, []),
        (0, 3, 0, [(0, 3)]),
    ],
)
def test_split_units_examples(
    start: int, end: int, parts: int, expected: list[tuple[int, int]]
) -> None:
    assert split_units(start, end, parts) == expected


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(min_value=-1000, max_value=10_000),
    count=st.integers(min_value=0, max_value=2000),
    parts=st.integers(min_value=1, max_value=64),
)
def test_split_covers_every_unit_once(start: int, count: int, parts: int) -> None:
    end = start + count
    ranges = split_units(start, end, parts)
    assert len(ranges) <= parts
    if count == 0:
        assert ranges == []
        return
    assert ranges[0][0] == start
    assert ranges[-1][1] == end
    for (_, a_end), (b_start, _) in itertools.pairwise(ranges):
        assert a_end == b_start
    sizes = [e - s for s, e in ranges]
    assert min(sizes) >= 1
    assert max(sizes) - min(sizes) <= 1
    covered = [u for s, e in ranges for u in range(s, e)]
    assert covered == list(range(start, end))


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(min_value=-100, max_value=100),
    end=st.integers(min_value=-100, max_value=100),
    parts=st.integers(min_value=-3, max_value=10),
)
def test_split_never_invents_units(start: int, end: int, parts: int) -> None:
    ranges = split_units(start, end, parts)
    assert sum(e - s for s, e in ranges) == max(0, end - start)
    assert all(start <= s < e <= end for s, e in ranges)
    assert len(ranges) <= max(1, parts)
