"""The Ledger actor: what this node lent each peer and borrowed from it, kept on disk.

Each peer, by fingerprint, has four totals: core-seconds this node ran for it (``lent``) and it ran
for this node (``borrowed``), and the same in MiB-seconds for memory. A charge is the lender's
measurement of one part (the CPU its processes used, the memory a mem job held), carried to the
borrower in the part's ``TaskDone``, so both sides book the same figure. After each change the
Ledger tells the Executor, which admits lent work, and the Autopilot, which shows the balances,
a fresh snapshot: neither ever asks it anything. The book is written to
``vestad-ledger-NAME.json`` (mode 0600, write, fsync, rename), at most once every
:data:`SAVE_EVERY_S` seconds while charges come and once more when the daemon stops; a ``kill -9``
at any moment leaves the last complete file.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from vesta.actors.base import VestaActor
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.messages import Charge, LedgerSnapshot, Message, Tick
from vesta.statefiles import StateFileError, read_json, write_private_json

logger = logging.getLogger(__name__)

#: Seconds between writes of a book that keeps changing.
SAVE_EVERY_S = 2.0
TOTALS = ("lent", "borrowed", "lent_mib_s", "borrowed_mib_s")


def ledger_path(state_dir: str | Path, name: str) -> Path:
    return Path(state_dir) / f"vestad-ledger-{name}.json"


def load_book(path: Path) -> dict[str, dict[str, Any]]:
    """The book on disk; empty when there is none. A file that cannot be read as a book is kept
    beside it (``.bad-TIME``), so nothing is lost, and the node starts a new book. A temporary
    file of a write cut short by a crash is removed: the last complete book is the file itself."""
    for left in path.parent.glob(f".{path.name}.*"):  # a write a kill -9 cut short
        left.unlink(missing_ok=True)
    if not path.exists():
        return {}
    try:
        data = read_json(path)
        return {fp: _entry(fp, raw) for fp, raw in _peers(data).items()}
    except (StateFileError, ValueError) as exc:
        kept = path.with_name(f"{path.name}.bad-{int(time.time())}")
        path.replace(kept)
        logger.error("the ledger %s is not readable (%s); kept it as %s and started a new one",
                     path, exc, kept.name)
        return {}


def _peers(data: Any) -> dict[str, Any]:
    peers = data.get("peers") if isinstance(data, dict) else None
    if not isinstance(peers, dict):
        raise ValueError('it has no "peers" table')
    return peers


def _entry(fingerprint: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"the entry of {fingerprint[:16]} is not a table")
    entry: dict[str, Any] = {"name": str(raw.get("name", ""))}
    for total in TOTALS:
        value = raw.get(total, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(f"{total} of {fingerprint[:16]} is not a number of 0 or more")
        entry[total] = float(value)
    return entry


class Ledger(VestaActor):
    """Owns the per-peer book and its file."""

    def __init__(self, counters: Counters, links: Links, path: Path) -> None:
        super().__init__(counters)
        self.links = links
        self.path = path
        self.book = load_book(path)
        self.dirty = False

    def on_start(self) -> None:
        self.publish()
        self.every(SAVE_EVERY_S, "save")

    def stopping(self) -> None:
        self.save()

    def handle(self, message: Message) -> Any:
        match message:
            case Charge():
                self.charge(message)
            case Tick():
                self.save()
            case _:
                return super().handle(message)
        return None

    def charge(self, charge: Charge) -> None:
        if not (math.isfinite(charge.core_s) and math.isfinite(charge.mib_s)) or min(
                charge.core_s, charge.mib_s) < 0:
            self.counters.add("bad_charges")
            return
        entry = self.book.setdefault(charge.fingerprint, {"name": charge.name,
                                                          **dict.fromkeys(TOTALS, 0.0)})
        if charge.name:
            entry["name"] = charge.name
        side = "lent" if charge.lent else "borrowed"
        entry[side] += charge.core_s
        entry[f"{side}_mib_s"] += charge.mib_s
        self.dirty = True
        self.publish()

    def publish(self) -> None:
        snapshot = LedgerSnapshot({fp: dict(entry) for fp, entry in self.book.items()})
        self.links.executor.tell(snapshot)
        self.links.autopilot.tell(snapshot)

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            write_private_json(self.path, {"version": 1, "peers": self.book})
            self.dirty = False
        except OSError as exc:
            logger.error("cannot write the ledger %s: %s", self.path, exc)
