"""Tests for vesta.policy: SPEC's energy and offer rules as tables, chunk sizes as properties."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta.policy import (
    BATTERY_WILLINGNESS,
    CHUNK_SECONDS,
    FIRST_CHUNK_PER_WORKER,
    SOLAR_DEFAULT_WILLINGNESS,
    OwnerFirst,
    Power,
    battery_charge,
    chunk_size,
    exec_permitted,
    offer_mem_mb,
    offer_workers,
    owner_busy,
    power_state,
    thermal_share,
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
    ("an adapter of any name", [Supply("ADP1", "Mains", True), bat(30)], "auto", MIN,
     Power("grid", 1.0, 30)),
    # a peripheral's battery (a mouse, a stylus) is not the machine's
    ("a mouse's battery only", [Supply("hidpp_battery_0", "Battery", None, "Discharging", 20,
                                       "Device")], "auto", MIN, Power("grid", 1.0, None)),
    ("a mouse's battery and the laptop's", [Supply("hid-mouse", "Battery", None, "Discharging",
                                                   5, "Device"), bat(80)],
     "auto", MIN, Power("solar", 0.8, 80)),
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


# -- chunks of a split job ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param((400, 2, None), 2 * FIRST_CHUNK_PER_WORKER, id="first chunk: per worker"),
        pytest.param((1, 4, None), 1, id="first chunk: no more than is missing"),
        pytest.param((400, 1, 20.0, [(20.0, 0)]), 20, id="a second of the node's work"),
        pytest.param((400, 1, 20.0), 20, id="alone: a second of its work"),
        pytest.param((30, 1, 20.0, [(20.0, 0)]), 15, id="the end: its share of what is left"),
        pytest.param((10, 1, 20.0, [(20.0, 10)]), 10, id="units in hand count in the share"),
        pytest.param((2, 1, 5.0, [(100.0, 3)]), 0,
                     id="a slow node: none, a busy fast one finishes sooner"),
        pytest.param((1, 1, 5.0, [(100.0, 30)]), 1,
                     id="a slow node: one, the fast one is busy for long"),
        pytest.param((1, 1, 5.0), 1, id="a slow node alone: the last unit"),
        pytest.param((0, 1, 20.0, [(20.0, 0)]), 0, id="nothing missing"),
        pytest.param((400, 1, 2000.0), 400, id="never more than is missing"),
    ],
)
def test_chunk_size(args: tuple[Any, ...], expected: int) -> None:
    assert chunk_size(*args) == expected


@settings(max_examples=300, deadline=None)
@given(
    missing=st.integers(0, 5000),
    workers=st.integers(1, 16),
    rate=st.one_of(st.none(), st.floats(0.01, 1000.0)),
    others=st.lists(st.tuples(st.floats(0.01, 1000.0), st.integers(0, 500)), max_size=4),
)
def test_a_chunk_is_within_what_is_missing_and_about_a_second(
    missing: int, workers: int, rate: float | None, others: list[tuple[float, int]],
) -> None:
    size = chunk_size(missing, workers, rate, others)
    assert 0 <= size <= missing
    if rate is not None:
        assert size <= max(1, round(rate * CHUNK_SECONDS))
    if missing and not any(held for _, held in others):
        assert size >= 1 or any(1 / r < 1 / rate for r, _ in others if rate)


@settings(max_examples=200, deadline=None)
@given(rates=st.lists(st.floats(0.5, 200.0), min_size=2, max_size=5),
       total=st.integers(40, 3000))
def test_nodes_handed_chunks_as_they_finish_end_at_about_the_same_time(
    rates: list[float], total: int,
) -> None:
    """Play a split to its end as the Autopilot feeds it: whenever nodes are free, each gets
    its next chunk, the fastest first. No node works much past the ideal time (total work over
    the sum of the rates): at most a tenth more, and the last unit of the fastest node."""
    free_at = [0.0] * len(rates)
    held = [0.0] * len(rates)  # units handed to each node, as of its free_at
    missing = total
    now = 0.0
    while missing:
        for node in sorted(range(len(rates)), key=lambda i: -rates[i]):
            if free_at[node] > now or not missing:
                continue
            others = [(rates[i], math.ceil(max(0.0, free_at[i] - now) * rates[i] - 1e-9))
                      for i in range(len(rates)) if i != node]
            size = chunk_size(missing, 1, rates[node], others)
            missing -= size
            free_at[node] = now + size / rates[node]
            held[node] += size
        later = [t for t in free_at if t > now]
        if missing and not later:
            raise AssertionError(f"{missing} units are missing and no node took any")
        now = min(later) if later else now
    ideal = total / sum(rates)
    assert max(free_at) <= ideal * 1.1 + 1 / max(rates)
    assert sum(held) == total


# -- the owner comes first -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temp", "expected"),
    [(None, 1.0), (50.0, 1.0), (75.0, 1.0), (80.0, 0.5), (84.0, 0.1), (85.0, 0.0), (99.0, 0.0)],
)
def test_thermal_share_shrinks_over_the_ten_degrees_below_the_maximum(
    temp: float | None, expected: float,
) -> None:
    assert thermal_share(temp, 85.0) == pytest.approx(expected)


def test_lent_work_pauses_at_the_line_and_resumes_after_reclaim_s_below_it() -> None:
    watch = OwnerFirst(spill_cpu_pct=80, reclaim_s=10, thermal_max_c=85)
    assert watch.update(0.0, 79.9, None) == ""
    assert watch.update(0.75, 80.0, None) == ""  # one reading at the line: a blip, perhaps
    why = watch.update(1.0, 80.0, None)  # two: the owner is back
    assert why == "its owner's load is 80%, at or over the 80% spill line"
    assert watch.update(2.0, 10.0, None) == why  # below the line: the reclaim clock starts
    assert watch.update(11.9, 10.0, None) == why
    assert watch.update(12.0, 10.0, None) == ""  # 10 s below it


def test_a_spike_while_paused_starts_the_reclaim_clock_again() -> None:
    watch = OwnerFirst(spill_cpu_pct=80, reclaim_s=10, thermal_max_c=85)
    watch.update(-0.25, 95.0, None)
    watch.update(0.0, 95.0, None)
    watch.update(1.0, 5.0, None)
    watch.update(9.0, 90.0, None)  # the owner is back
    assert watch.update(15.0, 5.0, None) != ""
    assert watch.update(24.9, 5.0, None) != ""
    assert watch.update(25.0, 5.0, None) == ""


def test_heat_pauses_lent_work_whatever_the_load() -> None:
    watch = OwnerFirst(spill_cpu_pct=80, reclaim_s=0, thermal_max_c=85)
    assert watch.update(0.0, 0.0, 85.0) == "its CPU is at 85 C, at or over thermal_max_c 85"
    assert watch.update(1.0, 0.0, 84.0) == ""  # reclaim_s 0: at once


def test_a_busy_owner_with_nothing_lent_is_no_pause_but_a_pause_outlasts_the_lending() -> None:
    watch = OwnerFirst(spill_cpu_pct=80, reclaim_s=10, thermal_max_c=85)
    assert watch.update(0.0, 100.0, None, lending=False) == ""  # a busy owner, nothing lent
    assert watch.update(0.5, 100.0, None, lending=False) == ""
    assert watch.update(1.0, 100.0, None, lending=True) != ""
    # the paused work was placed elsewhere: nothing is lent, the owner still busy
    assert watch.update(2.0, 100.0, None, lending=False) != ""
    assert watch.update(3.0, 10.0, None, lending=False) != ""
    assert watch.update(13.0, 10.0, None, lending=False) == ""


@pytest.mark.parametrize(("owner", "refusal"), [
    (79.9, ""), (80.0, "its owner's load is 80%, at or over the 80% spill line"),
])
def test_a_lender_whose_owner_is_busy_takes_no_new_work(owner: float, refusal: str) -> None:
    assert owner_busy(owner, 80) == refusal
