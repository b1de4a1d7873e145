"""The Ledger actor: charges booked per peer, snapshots told after each change, the book on disk,
written so that a ``kill -9`` at any moment leaves a complete file."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pykka
import pytest

from tests.actors.conftest import Wiring
from tests.conftest import wait_for
from vesta.actors.ledger import Ledger, ledger_path, load_book
from vesta.messages import Charge, LedgerSnapshot

pytestmark = pytest.mark.timeout(60)

FP = "ab" * 16
OTHER = "cd" * 16


def start(wiring: Wiring, path: Path) -> pykka.ActorRef[Any]:
    ref = Ledger.start(wiring.counters, wiring.links, path)
    wiring.links.ledger = ref
    return ref


def test_charges_add_up_per_peer_and_each_change_is_told_to_the_admitter(
    wiring: Wiring, tmp_path: Path,
) -> None:
    ref = start(wiring, ledger_path(tmp_path, "n1"))
    assert wiring.executor.expect(LedgerSnapshot).book == {}  # at start, for the admitter
    assert wiring.autopilot.expect(LedgerSnapshot).book == {}  # and for status

    ref.tell(Charge(FP, "pi4", True, 1.5))
    ref.tell(Charge(FP, "pi4", False, 0.25, 100.0))
    ref.tell(Charge(OTHER, "desk", True, 2.0, 30.0))

    books = [wiring.executor.expect(LedgerSnapshot).book for _ in range(3)]
    assert books[0] == {FP: {"name": "pi4", "lent": 1.5, "borrowed": 0.0,
                             "lent_mib_s": 0.0, "borrowed_mib_s": 0.0}}
    assert books[2] == {
        FP: {"name": "pi4", "lent": 1.5, "borrowed": 0.25, "lent_mib_s": 0.0,
             "borrowed_mib_s": 100.0},
        OTHER: {"name": "desk", "lent": 2.0, "borrowed": 0.0, "lent_mib_s": 30.0,
                "borrowed_mib_s": 0.0},
    }
    wiring.autopilot.expect(LedgerSnapshot, lambda m: m.book == books[2])  # status sees it


def test_the_book_is_written_private_and_read_back_after_a_restart(
    wiring: Wiring, tmp_path: Path,
) -> None:
    path = ledger_path(tmp_path, "n1")
    ref = start(wiring, path)
    ref.tell(Charge(FP, "pi4", True, 3.0, 5.0))
    wiring.executor.expect(LedgerSnapshot, lambda m: FP in m.book)
    ref.stop()  # a clean stop writes what the last tick did not

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["peers"][FP]["lent"] == 3.0
    start(wiring, path)
    # the restarted ledger's first snapshot (the first one's with FP was taken above)
    told = wiring.executor.expect(LedgerSnapshot, lambda m: FP in m.book)
    assert told.book[FP]["lent"] == 3.0 and told.book[FP]["lent_mib_s"] == 5.0


def test_charges_that_are_not_figures_are_counted_and_change_nothing(
    wiring: Wiring, tmp_path: Path,
) -> None:
    ref = start(wiring, ledger_path(tmp_path, "n1"))
    ref.tell(Charge(FP, "pi4", True, float("nan")))
    ref.tell(Charge(FP, "pi4", True, -1.0))
    ref.tell(Charge(FP, "pi4", True, 1.0))

    assert wiring.executor.expect(LedgerSnapshot, lambda m: bool(m.book)).book[FP]["lent"] == 1.0
    assert wiring.counters.get("bad_charges") == 2


@pytest.mark.parametrize("content", [
    "{not json", json.dumps({"peers": {FP: {"lent": "lots"}}}), json.dumps([1, 2]),
    json.dumps({"peers": {FP: {"lent": -4}}}),
])
def test_a_book_that_cannot_be_read_is_kept_aside_and_a_new_one_begun(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture,
) -> None:
    path = ledger_path(tmp_path, "n1")
    path.write_text(content)

    assert load_book(path) == {}
    kept = list(tmp_path.glob("vestad-ledger-n1.json.bad-*"))
    assert len(kept) == 1 and kept[0].read_text() == content
    assert "is not readable" in caplog.text


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from vesta.statefiles import write_private_json
    path = Path(sys.argv[1])
    n = int(sys.argv[2])
    peers = {f"{i:032x}": {"name": f"n{i}", "lent": 0.0, "borrowed": 0.0, "lent_mib_s": 0.0,
                           "borrowed_mib_s": 0.0} for i in range(200)}
    print("writing", flush=True)
    while True:
        n += 1
        for entry in peers.values():
            entry["lent"] = float(n)
        write_private_json(path, {"version": 1, "peers": peers})
""")


def test_a_kill_9_at_any_moment_of_a_write_leaves_a_complete_book(tmp_path: Path) -> None:
    """The Ledger's writer (write, fsync, rename), killed 30 times at random moments while it
    rewrites a 200-peer book as fast as it can: each time the file reads as a whole book, newer
    than or as new as the last, and no temporary file is left after the next load."""
    path = ledger_path(tmp_path, "n1")
    last = 0.0
    rng = random.Random(9)
    for _ in range(30):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(int(last))],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        wait_for(lambda: path.exists(), what="a first write")
        with contextlib.suppress(subprocess.TimeoutExpired):  # a random moment of its writes
            writer.wait(rng.uniform(0.0, 0.03))
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        book = load_book(path)
        assert len(book) == 200
        values = {entry["lent"] for entry in book.values()}
        assert len(values) == 1
        (now,) = values
        assert now >= last
        last = now
        assert not list(tmp_path.glob(".vestad-ledger-n1.json.*"))
    assert last > 0
