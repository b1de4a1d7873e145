"""The job book: which units of a job are done, which are leased to which node, which are missing.

A plain class, no threads, no actors: the Autopilot keeps one per job and acts on what it says.
A unit is *missing* when it is neither done nor leased. A lease is a contiguous range of units
handed to one node under an id; results count only for units inside a lease that is still held,
and each unit's result counts once, wherever it finished. When a lease ends (its task finished,
failed, or its node went away) its unfinished units become missing again and can be handed out
at once, whatever the job's other leases are doing. A cpu job has ``10 * N`` units; mem and exec
jobs have one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class BookError(ValueError):
    """A lease that overlaps what is done or leased, or one that is not held."""


@dataclass
class Lease:
    """Units [start, end) handed to ``node``."""

    lease_id: str
    node: str
    start: int
    end: int
    done: int = 0  # units of it that finished

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class JobBook:
    """The state of one job's units."""

    total: int
    results: dict[int, bytes] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    finished_by: Counter[str] = field(default_factory=Counter)  # node -> units it finished

    @property
    def complete(self) -> bool:
        return len(self.results) == self.total

    @property
    def done(self) -> int:
        return len(self.results)

    def leased(self, index: int) -> bool:
        return any(lease.start <= index < lease.end for lease in self.leases.values())

    def missing(self) -> list[tuple[int, int]]:
        """Contiguous ranges of units neither done nor leased, in order."""
        covered = sorted((lease.start, lease.end) for lease in self.leases.values())
        ranges: list[tuple[int, int]] = []
        at = 0
        for start, end in [*covered, (self.total, self.total)]:
            ranges += self._undone(at, start)
            at = max(at, end)
        return ranges

    def missing_units(self) -> int:
        return sum(end - start for start, end in self.missing())

    def _undone(self, start: int, end: int) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        for i in range(start, end):
            if i in self.results:
                continue
            if ranges and ranges[-1][1] == i:
                ranges[-1] = (ranges[-1][0], i + 1)
            else:
                ranges.append((i, i + 1))
        return ranges

    def next_range(self, most: int) -> tuple[int, int] | None:
        """The first missing range, cut to at most ``most`` units; None if nothing is missing."""
        missing = self.missing()
        if not missing or most <= 0:
            return None
        start, end = missing[0]
        return start, min(end, start + most)

    def lease(self, lease_id: str, node: str, start: int, end: int) -> Lease:
        """Hand units [start, end) to ``node``; they must all be missing."""
        if lease_id in self.leases:
            raise BookError(f"lease {lease_id} is already held")
        if not 0 <= start < end <= self.total:
            raise BookError(f"units {start}-{end} are outside the job's 0-{self.total}")
        if not any(low <= start and end <= high for low, high in self.missing()):
            raise BookError(f"units {start}-{end} are not all missing")
        lease = self.leases[lease_id] = Lease(lease_id, node, start, end)
        return lease

    def duplicate(self, lease_id: str, node: str, of: str) -> Lease | None:
        """Hand the unfinished end of lease ``of`` to ``node`` as well, under a lease of its
        own: a straggler's insurance. Whichever finishes a unit first has it counted; the other's
        result for it counts for nothing. None when ``of`` is not held or has nothing left."""
        held = self.leases.get(of)
        if held is None or lease_id in self.leases:
            return None
        left = [i for i in range(held.start, held.end) if i not in self.results]
        if not left:
            return None
        lease = self.leases[lease_id] = Lease(lease_id, node, left[0], held.end)
        return lease

    def record(self, lease_id: str, units: dict[int, bytes]) -> int:
        """Results that arrived under a lease; returns how many were new. Units outside the
        lease, or already done, or under a lease no longer held, count for nothing."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return 0
        fresh = 0
        for index, result in units.items():
            if lease.start <= index < lease.end and index not in self.results:
                self.results[index] = result
                fresh += 1
        if fresh:
            lease.done += fresh
            self.finished_by[lease.node] += fresh
        return fresh

    def release(self, lease_id: str) -> Lease | None:
        """The lease ended: its unfinished units are missing again. None if it was not held."""
        return self.leases.pop(lease_id, None)

    def leases_of(self, node: str) -> list[Lease]:
        return [lease for lease in self.leases.values() if lease.node == node]

    def unfinished(self, lease: Lease) -> int:
        """Units of a lease that have no result."""
        return sum(1 for i in range(lease.start, lease.end) if i not in self.results)
