"""vesta's rules as pure functions: power and willingness, the offer, placement, chunks of a
split job, exec permission.

No threads, no I/O: the actors call these with plain data, and the tests feed them tables of cases.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vesta.messages import ExecJob, Job, MemJob
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
    supplies = [s for s in supplies if s.scope != "Device"]  # a mouse's battery is not ours
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


def thermal_share(temp_c: float | None, thermal_max_c: float) -> float:
    """The share of its offer a node keeps at ``temp_c``: all of it 10 degrees or more below
    ``thermal_max_c``, shrinking linearly to nothing at it (SPEC); all of it where the temperature
    is unknown."""
    if temp_c is None:
        return 1.0
    return _clamp((thermal_max_c - temp_c) / THERMAL_BAND_C)


#: Degrees below ``thermal_max_c`` over which the offer shrinks to nothing.
THERMAL_BAND_C = 10.0
#: Readings in a row with the owner at or over the spill line before lent work pauses.
CONFIRM_READINGS = 2


@dataclass
class OwnerFirst:
    """When work lent to peers pauses for the owner, and when it may run again (SPEC "The owner
    comes first"): paused at once when, while the node lends, the owner's load (all minus lent)
    reaches ``spill_cpu_pct`` or the CPU reaches ``thermal_max_c``; running again once neither
    has held for ``reclaim_s``. A node offers nothing while paused, lent work or not (so work
    moved away for the owner does not come straight back). A busy owner with nothing lent is no
    pause: the daemon's own start, say, must not shut the node for ``reclaim_s``; such a node
    refuses new work at admission instead. Fed one reading at a time; no clock of its own."""

    spill_cpu_pct: float
    reclaim_s: float
    thermal_max_c: float
    paused: str = ""  # why lent work is paused now, a sentence; "" while it may run
    calm_since: float | None = None
    busy_readings: int = 0  # readings in a row with the owner at or over the line

    def update(self, now: float, owner_cpu_pct: float, temp_c: float | None,
               lending: bool = True) -> str:
        """The state after a reading taken at ``now`` (monotonic seconds): the pause's reason,
        or "". The owner's load must read at or over the line :data:`CONFIRM_READINGS` times in
        a row (half a second while lending): a blip of a quarter second is no owner's return."""
        busy = owner_busy(owner_cpu_pct, self.spill_cpu_pct)
        self.busy_readings = self.busy_readings + 1 if busy else 0
        if temp_c is not None and temp_c >= self.thermal_max_c:
            why = (f"its CPU is at {temp_c:.0f} C, at or over thermal_max_c "
                   f"{self.thermal_max_c:g}")
        elif busy and (self.busy_readings >= CONFIRM_READINGS or self.paused):
            why = busy
        else:
            why = ""
        if why and (lending or self.paused):
            self.paused, self.calm_since = why, None
        elif self.paused and not why:
            self.calm_since = now if self.calm_since is None else self.calm_since
            if now - self.calm_since >= self.reclaim_s:
                self.paused, self.calm_since = "", None
        return self.paused


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


# -- placement -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A node as placement sees it: plain data from the sampler (this node) or a peer's beacons.

    ``free`` is how many more workers this node may be given by us now: for this node the worker
    slots not booked, for a peer its offer less what we already run there.
    """

    key: str  # "" for this node, else the peer's fingerprint
    name: str
    cores: int
    cpu_pct: float
    mem_available_mb: int
    offer_mem_mb: int
    free: int
    willingness: float = 1.0
    power: str = "grid"
    gpu: bool = False
    allow_exec: bool = False
    exec_allowlist: tuple[str, ...] = ()
    state: str = "up"
    offer: int = 0  # workers a peer offers in all (``free`` is what is left of them for us)
    paused: str = ""  # why a peer's lent work is paused for its owner; "" if it is not

    @property
    def local(self) -> bool:
        return self.key == ""


@dataclass(frozen=True)
class Want:
    """What a job needs of a node."""

    kind: str  # cpu, mem, exec
    argv0: str = ""
    gpu: bool = False
    mem_mb: int = 0


def want_of(job: Job) -> Want:
    """What a job needs of a node."""
    if isinstance(job, ExecJob):
        return Want("exec", job.argv[0] if job.argv else "", job.gpu)
    if isinstance(job, MemJob):
        return Want("mem", mem_mb=job.mb)
    return Want(job.kind)


@dataclass(frozen=True)
class Decision:
    """One node considered for a job: its score, whether it was chosen, and why, in a sentence."""

    key: str
    name: str
    score: float
    chosen: bool
    reason: str


def unable(node: Candidate, want: Want) -> str:
    """Why ``node`` cannot take the job at all (a sentence), or "" if it can."""
    if not node.local and node.state != "up":
        return f"{node.name} is {node.state}"
    if want.gpu and not node.gpu:
        return f"{node.name} has no GPU"
    if want.kind == "exec" and not node.local:
        allowed, why = exec_permitted(want.argv0, node.allow_exec, node.exec_allowlist)
        if not allowed:
            return f"{node.name} does not run it: {why.replace('this node', node.name)}"
    if want.kind == "mem":
        room = node.mem_available_mb if node.local else node.offer_mem_mb
        if want.mem_mb > room:
            return f"{node.name} has {room} MiB {'available' if node.local else 'offered'}"
    if not node.local and node.free <= 0:
        return _no_room(node)
    return ""


def _no_room(peer: Candidate) -> str:
    """Why a peer has no worker for us: the rule that took its offer, or our work using it."""
    if peer.paused:
        return f"{peer.name} is paused for its owner: {peer.paused}"
    if peer.power == "empty":
        return f"{peer.name} is on battery below its battery_min_pct: it lends nothing"
    if peer.offer <= 0:
        return (f"{peer.name} offers no worker now (at {peer.cpu_pct:.0f}% CPU, willingness "
                f"{peer.willingness:.2f}, power {peer.power})")
    return f"every worker {peer.name} offers runs our work ({peer.offer} of {peer.offer})"


def spare(node: Candidate) -> float:
    """A node's spare capacity: idle cores, at most its free workers, scaled by its willingness
    to lend; memory available breaks ties."""
    idle = max(0.0, node.cores * (1 - node.cpu_pct / 100))
    return round(min(float(node.free), idle) * node.willingness + node.mem_available_mb / 1e7, 7)


def place(want: Want, here: Candidate, peers: Sequence[Candidate],
          spill_cpu_pct: float) -> tuple[Candidate | None, list[Decision]]:
    """Where a job goes, and the decision on every node considered (SPEC's placement rule).

    Local unless this node's CPU is at or above ``spill_cpu_pct`` or its workers are all booked;
    otherwise the peer with the most spare capacity that can take the job; failing any, this node
    again (the job waits for a worker here) if it can take the job at all. None when no node can.
    """
    decisions: list[Decision] = []
    local_problem = unable(here, want)
    busy = here.cpu_pct >= spill_cpu_pct
    full = here.free <= 0
    if not local_problem and not busy and not full:
        decisions.append(Decision("", here.name, spare(here), True,
                                  f"{here.name} (this node) is at {here.cpu_pct:.0f}% CPU, "
                                  f"below the {spill_cpu_pct:.0f}% spill line, with "
                                  f"{here.free} worker(s) free"))
        decisions += [Decision(p.key, p.name, spare(p), False, f"{p.name} is not needed: the "
                               f"job stays on {here.name}, the node it was submitted to")
                      for p in peers]
        return here, decisions
    best: Candidate | None = None
    for peer in peers:
        problem = unable(peer, want)
        if problem:
            decisions.append(Decision(peer.key, peer.name, 0.0, False, problem))
        elif best is None or spare(peer) > spare(best):
            best = peer
    for peer in peers:
        if best is not None and not unable(peer, want):
            chosen = peer is best
            why = (f"{peer.name} is at {peer.cpu_pct:.0f}% CPU with {peer.free} worker(s) "
                   f"offered: the most spare capacity" if chosen else
                   f"{peer.name} has less spare capacity ({spare(peer):.2f} against "
                   f"{spare(best):.2f} for {best.name})")
            decisions.append(Decision(peer.key, peer.name, spare(peer), chosen, why))
    if local_problem:
        local_why = local_problem
    elif busy:
        local_why = (f"{here.name} (this node) is at {here.cpu_pct:.0f}% CPU, at or above the "
                     f"{spill_cpu_pct:.0f}% spill line")
    else:
        local_why = f"{here.name} (this node) has every worker busy"
    if best is not None:
        decisions.insert(0, Decision("", here.name, spare(here), False, local_why))
        return best, decisions
    if local_problem:
        decisions.insert(0, Decision("", here.name, 0.0, False, local_why))
        return None, decisions
    decisions.insert(0, Decision("", here.name, spare(here), True,
                                 f"{local_why}, but no peer can take it: it runs here"))
    return here, decisions


#: A cpu job of at least this many units splits across two or more viable nodes (SPEC: cpu 4).
SPLIT_MIN_UNITS = 40
#: Seconds of a node's work in each chunk of a split job, once its rate is known.
CHUNK_SECONDS = 1.0
#: Units per worker in a node's first chunk of a split job: enough to measure its rate.
FIRST_CHUNK_PER_WORKER = 2


def split_nodes(want: Want, here: Candidate, peers: Sequence[Candidate],
                spill_cpu_pct: float, here_committed: bool = False) -> list[Candidate]:
    """The nodes a cpu job may split across now: this node while it is below the spill line and
    has a free worker, and every peer that can take the job.

    Once this node runs part of a split (``here_committed``), its own load is mostly that job:
    it goes on taking chunks while it has a free worker.
    """
    below = here.cpu_pct < spill_cpu_pct or here_committed
    nodes = [here] if not unable(here, want) and below and here.free > 0 else []
    return nodes + [p for p in peers if not unable(p, want)]


def chunk_size(missing: int, workers: int, rate: float | None,
               others: Sequence[tuple[float, int]] = ()) -> int:
    """How many units of a split job to hand a node that is free for it now; 0 for none.

    A node whose rate (units a second) is not known yet gets a small first chunk, a few units per
    worker, which measures it. A known node gets about ``CHUNK_SECONDS`` of its own work, but no
    more than its share of what is left (``missing`` units not handed out, and the units the
    ``others``, each ``(rate, units in hand)``, have yet to finish) in proportion to its rate,
    rounded down: so the last chunks shrink and the nodes end at about the same time. Once its
    share is under two units, it gets one only if no other node would finish one sooner, busy
    as it is: a slow node (a Pi) never holds the job back.
    """
    if missing <= 0:
        return 0
    if rate is None or rate <= 0:
        return min(missing, FIRST_CHUNK_PER_WORKER * max(1, workers))
    pool = rate + sum(r for r, _ in others)
    share = (missing + sum(u for _, u in others)) * rate / pool
    if share >= 2:
        return min(missing, max(1, math.floor(min(rate * CHUNK_SECONDS, share))))
    sooner = any(r > 0 and (held + 1) / r < 1 / rate for r, held in others)
    return 0 if sooner else 1


def owner_busy(owner_cpu_pct: float, spill_cpu_pct: float) -> str:
    """Why a lender takes no new work while its owner's own load is at or over the spill line
    (the owner comes first), or "" when it is below."""
    if owner_cpu_pct < spill_cpu_pct:
        return ""
    return (f"its owner's load is {owner_cpu_pct:.0f}%, at or over the {spill_cpu_pct:g}% "
            "spill line")


def leech_refusal(name: str, lent: float, borrowed: float, max_borrow_ratio: float,
                  goodwill_core_s: float) -> str:
    """SPEC's fairness rule, on the lender: a peer's work is taken while what this node ran for
    it (``lent``, core-seconds) is at most ``max_borrow_ratio * (goodwill_core_s + borrowed)``,
    ``borrowed`` being what the peer ran for this node. "" when it is, else the refusal with the
    figures."""
    cap = max_borrow_ratio * (goodwill_core_s + borrowed)
    if lent <= cap:
        return ""
    return (f"{name} has used {lent:.0f} core-seconds of this node, over its cap of {cap:.0f} "
            f"(max_borrow_ratio {max_borrow_ratio:g} x (goodwill_core_s {goodwill_core_s:g} + "
            f"the {borrowed:.0f} core-seconds it ran for this node)); it gets room by lending")


def admit(want: Want, offer_workers: int, lent_busy: int, offer_mem_mb: int, lent_mem_mb: int,
          allow_exec: bool, allowlist: Sequence[str], gpu: bool = False, owner: str = "") -> str:
    """Whether this node takes a task a peer asks it to run: "" if so, else the rule that says
    no, as a sentence with the figures (the lender's side of placement). ``owner`` is why the
    owner has the node now ("" if it has not): it comes after the rules that never change and
    before the offer, which is nothing while the owner has the node."""
    if want.kind == "exec":
        allowed, why = exec_permitted(want.argv0, allow_exec, allowlist)
        if not allowed:
            return why
    if owner:
        return owner
    if offer_workers <= 0:
        return "it lends nothing now (its offer is 0 workers)"
    if lent_busy >= offer_workers:
        return f"every worker it offers is busy ({lent_busy} of {offer_workers})"
    if want.kind == "mem" and want.mem_mb > offer_mem_mb - lent_mem_mb:
        return (f"it offers {max(0, offer_mem_mb - lent_mem_mb)} MiB of memory now, "
                f"{want.mem_mb} MiB asked")
    if want.gpu and not gpu:
        return "it has no GPU"
    return ""
