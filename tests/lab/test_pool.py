"""The pool in the lab, beyond a single failure: a node that slows down mid-job is insured by the
idle one, and a node that only borrows is capped by the lender until it lends in turn.

Each test runs desk and pi4 in network namespaces, each pinned to a CPU of its own, as the tests of
test_federation.py do (root only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.lab.conftest import LabDaemon, start_vestad
from tests.lab.netlab import Lab
from tests.lab.test_federation import (
    KEY,
    SAMPLED,
    cli_json,
    fingerprint,
    idle_peer,
    quick_status,
    reference_digest,
    spill_to_pi4,
    stress,
    throttled,
    two_cpus,
    up,
)
from vesta.client import Client
from vesta.messages import CpuJob, JobDone, JobStarted

pytestmark = pytest.mark.timeout(120)

#: The share of its CPU pi4 is left once it has been handed its second chunk: a node whose owner
#: took it over, or that overheated, after its rate was measured.
SLOWED_SHARE = 0.05


def events_of(d: LabDaemon, kind: str) -> list[dict[str, Any]]:
    return [e for e in quick_status(d)["events"] if e["kind"] == kind]


def capped_by(d: LabDaemon) -> list[dict[str, Any]]:
    """The refusals ``d`` got under the fairness rule."""
    return [e for e in events_of(d, "refusal") if "max_borrow_ratio" in e["detail"]]


def ledger_with(d: LabDaemon, peer: LabDaemon) -> dict[str, Any]:
    book: dict[str, Any] = quick_status(d)["ledger"].get(fingerprint(peer), {})
    return book


def test_a_node_slowed_mid_job_is_insured_by_the_idle_one_and_the_first_result_counts(
    lab: Lab, pin_here: Callable[[int], None],
) -> None:
    """desk and pi4 idle; once pi4 has its second chunk it is held to 5 % of its CPU. desk,
    done with its own chunks, runs the unfinished end of pi4's again; the first result counts,
    pi4's copy is cancelled, the digest is one node's, and what pi4 ran is booked alike on both
    sides."""
    n, seed = 8, 4
    expected = reference_digest(n, seed)
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    pi4 = start_vestad(pi4_host, "pi4", KEY, *SAMPLED, "-spill-cpu-pct", "95")
    with throttled(pi4.proc.pid, 1.0) as set_share:
        desk = start_vestad(desk_host, "desk", KEY, *SAMPLED, "-spill-cpu-pct", "95")
        wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10, what="the link")
        idle_peer(desk, "pi4")
        wait_for(lambda: quick_status(desk)["node"]["cpu_pct"] < 50, what="desk to be idle")
        chunks_on_pi4 = 0
        done = None
        with Client(desk.socket, timeout=60) as client:  # a CLI's start would load desk's CPU
            for event in client.submit(CpuJob(n, seed)):
                if isinstance(event, JobStarted) and event.node == "pi4":
                    chunks_on_pi4 += 1
                    if chunks_on_pi4 == 2:
                        set_share(SLOWED_SHARE)
                elif isinstance(event, JobDone):
                    done = event
        assert done is not None and done.ok, done
        result = done.result
        print(f"\npi4 slowed mid-job: {result['placements']} in {result['seconds']} s")
        assert chunks_on_pi4 >= 2
        assert result["digest"] == expected
        assert sum(p["units"] for p in result["placements"]) == 10 * n  # each unit counted once
        assert [e["node"] for e in events_of(desk, "straggler")] == ["pi4"]

        set_share(1.0)  # the cancelled copy ends as soon as it next runs
        wait_for(lambda: ledger_with(desk, pi4).get("borrowed", 0) > 0
                 and ledger_with(desk, pi4).get("borrowed") == ledger_with(pi4, desk).get("lent"),
                 timeout=20, what="both ledgers to book pi4's work alike, its cancelled copy "
                                  "included")
        desk.stop()
        pi4.stop()


def test_a_node_that_only_borrows_is_capped_and_admitted_again_once_it_lends(
    lab: Lab, pin_here: Callable[[int], None],
) -> None:
    """pi4 gives every peer 0.5 core-seconds of goodwill and lends at most as much again as it
    borrows (``max_borrow_ratio`` 1). desk, stressed, spills a job to pi4 and uses up its
    goodwill; its next job is refused by pi4 with the rule and the figures, and runs on desk.
    Then pi4 borrows from desk, which raises desk's cap, and desk's next job runs on pi4."""
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED)
    pi4 = start_vestad(pi4_host, "pi4", KEY, *SAMPLED, "-goodwill-core-s", "0.5",
                       "-max-borrow-ratio", "1")
    wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10, what="the link")

    stress(desk)
    first = spill_to_pi4(desk, lambda: cli_json(desk, "cpu", "2"))
    assert [p["node"] for p in first["placements"]] == ["pi4"], first["placements"]
    lent = ledger_with(pi4, desk)["lent"]
    assert lent > 0.5, lent  # over the cap of 1 x (0.5 + 0)

    idle_peer(desk, "pi4")
    capped = cli_json(desk, "cpu", "1")
    assert [p["node"] for p in capped["placements"]] == ["desk"], capped["placements"]
    (refusal,) = capped_by(desk)
    assert refusal["node"] == "pi4"
    assert f"desk has used {lent:.0f} core-seconds of this node" in refusal["detail"]
    assert "max_borrow_ratio 1 x (goodwill_core_s 0.5 + the 0 core-seconds" in refusal["detail"]
    assert desk.cli("stop-stress").returncode == 0

    stress(pi4)  # pi4's owner is busy: its own job spills to desk
    idle_peer(pi4, "desk")
    back = cli_json(pi4, "cpu", "3")  # under 40 units: not split, though pi4 is busy anyway
    assert [p["node"] for p in back["placements"]] == ["desk"], back["placements"]
    borrowed = ledger_with(pi4, desk)["borrowed"]
    assert 0.5 + borrowed > 1.5 * lent, (lent, borrowed)  # desk's cap now well over its use
    assert pi4.cli("stop-stress").returncode == 0

    stress(desk)
    again = spill_to_pi4(desk, lambda: cli_json(desk, "cpu", "1"))
    assert [p["node"] for p in again["placements"]] == ["pi4"], again["placements"]
    assert len(capped_by(desk)) == 1
    assert desk.cli("stop-stress").returncode == 0
