"""vesta's rules as pure functions: power and willingness, the offer, splitting, exec permission.

No threads, no I/O: the actors call these with plain data, and the tests feed them tables of cases.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vesta.sysstat import Supply

#: Lending share when discharging below half charge, and when ``battery`` mode is forced.
BATTERY_WILLINGNESS = 0.35
#: Lending share of forced ``solar`` mode on a machine without a battery.
SOLAR_DEFAULT_WILLINGNESS = 0.75


@dataclass(frozen=True)
class Power:
    """The power mode (grid, solar, battery or empty) and the share of the offer it lends."""

    mode: str
    willingness: float
    battery_pct: float | None = None


def battery_charge(supplies: Iterable[Supply]) -> tuple[float | None, bool, bool]:
    """(charge percent or None, discharging, on external power) from the power supplies."""
    supplies = list(supplies)
    batteries = [s for s in supplies if s.type == "Battery" and s.capacity is not None]
    external = any(s.online for s in supplies if s.type != "Battery")
    if not batteries:
        return None, False, external
    charge = sum(b.capacity or 0.0 for b in batteries) / len(batteries)
    discharging = any(b.status == "Discharging" for b in batteries) and not external
    return charge, discharging, external


def power_state(supplies: Sequence[Supply], forced: str, battery_min_pct: float) -> Power:
    """The power mode and willingness, as SPEC's "Energy" section defines them.

    ``forced`` is the ``power`` setting: ``auto`` reads the supplies, the others force a mode.
    Below ``battery_min_pct`` (when a battery is present and discharging) nothing is lent.
    """
    charge, discharging, _external = battery_charge(supplies)
    if forced == "grid":
        return Power("grid", 1.0, charge)
    if forced == "solar":
        share = charge / 100 if charge is not None else SOLAR_DEFAULT_WILLINGNESS
        return Power("solar", _clamp(share), charge)
    if forced == "battery":
        return Power("battery", BATTERY_WILLINGNESS, charge)
    if charge is None or not discharging:
        return Power("grid", 1.0, charge)
    if charge < battery_min_pct:
        return Power("empty", 0.0, charge)
    if charge >= 50:
        return Power("solar", _clamp(charge / 100), charge)
    return Power("battery", BATTERY_WILLINGNESS, charge)


def offer_workers(cores: int, cpu_offer_pct: float, reserve_pct: float, willingness: float) -> int:
    """Worker processes lent to peers: floor(cores * min(offer, 100 - reserve) / 100 * will).

    At least one while willingness is above zero, there is a core, and the owner offers any
    share at all: ``cpu_offer_pct`` 0 (or ``reserve_pct`` 100) means lend nothing.
    """
    share = min(cpu_offer_pct, 100 - reserve_pct) / 100
    if willingness <= 0 or cores <= 0 or share <= 0:
        return 0
    return max(1, math.floor(cores * share * willingness + 1e-9))


def offer_mem_mb(
    mem_available_mb: int, mem_total_mb: int, mem_offer_mb: int, reserve_pct: float,
    willingness: float,
) -> int:
    """Memory lent to peers: what is available beyond the reserve, capped, scaled by willingness."""
    spare = mem_available_mb - mem_total_mb * reserve_pct / 100
    return max(0, math.floor(min(spare, mem_offer_mb) * willingness))


def split_units(start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """Split units [start, end) into at most ``parts`` contiguous, near-equal, non-empty ranges."""
    count = end - start
    parts = max(1, min(parts, count))
    if count <= 0:
        return []
    base, extra = divmod(count, parts)
    ranges, at = [], start
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        ranges.append((at, at + size))
        at += size
    return ranges


def exec_permitted(argv0: str, allow_exec: bool, allowlist: Sequence[str]) -> tuple[bool, str]:
    """Whether a peer may run ``argv0`` here, and if not, why (a sentence)."""
    if not allow_exec:
        return False, "exec is off on this node (allow_exec is false)"
    if not allowlist:
        return True, ""
    name = os.path.basename(argv0)
    if argv0 in allowlist or name in allowlist:
        return True, ""
    return False, f"{argv0!r} is not in exec_allowlist ({', '.join(allowlist)})"


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))
