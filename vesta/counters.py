"""Counts of what went wrong or was refused, shared by the actors and their I/O threads."""

from __future__ import annotations

import threading
from collections import Counter

#: Counters that ``vesta status`` always shows, even at zero.
ALWAYS_SHOWN = (
    "dropped_beacons",
    "dropped_frames",
    "failed_handshakes",
    "refused_jobs",
    "bad_control_requests",
    "refused_control_clients",
    "actor_errors",
)


class Counters:
    """A thread-safe bag of named counts. Increments come from many threads; reads are snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            shown = dict.fromkeys(ALWAYS_SHOWN, 0)
            shown.update(self._counts)
            return shown
