"""``vesta doctor`` in the lab finds what keeps real hosts apart: a node under another key on the
subnet, a seed whose UDP port a filter drops, and an advertised address no peer can reach."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.lab.conftest import LabDaemon, start_vestad
from tests.lab.netlab import Lab
from tests.lab.test_federation import KEY, SAMPLED

pytestmark = pytest.mark.timeout(60)

OTHER_KEY = "another-pool-entirely-0123456789"
DPORT = 7778


def doctor(d: LabDaemon) -> tuple[int, dict[str, dict[str, Any]], str]:
    """``vesta doctor`` on ``d``: its exit status, its checks by name, and what people see."""
    doc = d.cli("--json", "doctor")
    people = d.cli("doctor")
    checks = {c["name"]: c for c in json.loads(doc.stdout)["checks"]}
    assert people.returncode == doc.returncode
    return doc.returncode, checks, people.stdout


def test_a_node_under_another_key_is_named_by_its_address(lab: Lab) -> None:
    desk_host, rogue_host = lab.add_host("desk"), lab.add_host("rogue")
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED)
    start_vestad(rogue_host, "rogue", OTHER_KEY, *SAMPLED)

    def flagged() -> bool:
        return rogue_host.address in doctor(desk)[1]["others"]["detail"]

    wait_for(flagged, timeout=10, what="desk's doctor to hear the rogue's beacons")
    code, checks, shown = doctor(desk)
    assert code == 1
    assert not checks["others"]["ok"]
    assert "beacon(s) under another key from " + rogue_host.address in checks["others"]["detail"]
    assert [n for n, c in checks.items() if not c["ok"]] == ["others"]
    assert "FAIL  others       " in shown and "fix: give every node the same key" in shown


def test_a_seed_whose_udp_port_is_dropped_on_the_way_is_named(lab: Lab) -> None:
    """pi4 and pi3 are on another subnet, so desk finds them through -seed only; a rule in
    desk's host drops every datagram to pi4's discovery port, as a firewall on the way would.
    Once pi3 has answered, pi4 would have too."""
    desk_host, pi4_host, pi3_host = (lab.add_host("desk", 0), lab.add_host("pi4", 1),
                                     lab.add_host("pi3", 1))
    subprocess.run(desk_host.command([
        "ip", "rule", "add", "to", pi4_host.address, "ipproto", "udp", "dport", str(DPORT),
        "blackhole", "pref", "100"]), check=True)
    start_vestad(pi4_host, "pi4", KEY, *SAMPLED)
    start_vestad(pi3_host, "pi3", KEY, *SAMPLED)
    seeds = f"{pi4_host.address}:{DPORT},{pi3_host.address}:{DPORT}"
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED, "-seed", seeds)

    def pi3_answered() -> bool:
        status = doctor(desk)[1]["seeds"]
        return pi3_host.address not in status["detail"] and not status["ok"]

    wait_for(pi3_answered, timeout=10, what="pi3 to answer desk's beacons")
    code, checks, _shown = doctor(desk)
    assert code == 1
    assert checks["seeds"]["detail"] == f"no answer from {pi4_host.address}:{DPORT}"
    assert "firewall" in checks["seeds"]["fix"]
    assert [n for n, c in checks.items() if not c["ok"]] == ["seeds"]


def test_an_advertised_loopback_address_is_refused_with_the_fix(lab: Lab) -> None:
    desk = start_vestad(lab.add_host("desk"), "desk", KEY, *SAMPLED, "-advertise", "127.0.1.1")
    code, checks, shown = doctor(desk)
    assert code == 1
    assert not checks["address"]["ok"]
    assert "127.0.1.1, the address /etc/hosts gives this machine's name" in (
        checks["address"]["detail"])
    assert "-advertise" in checks["address"]["fix"]
    assert [n for n, c in checks.items() if not c["ok"]] == ["address"]
    assert "FAIL  address" in shown
