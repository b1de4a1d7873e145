"""``vesta doctor``'s verdicts over tables of facts: each check passes on a healthy node and
fails, with a fix, on the fault it is there for."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from vesta import doctor
from vesta.doctor import Check, checks, format_checks, key_facts, local_facts, path_modes


def healthy(**changes: Any) -> dict[str, Any]:
    """What a well-set-up daemon on a LAN says of itself."""
    facts: dict[str, Any] = {
        "name": "desk", "fingerprint": "ab" * 16, "advertised": "192.168.1.10", "advertise": "",
        "bind": "", "tcp": ["0.0.0.0", 7777], "dport": 7778, "seeds": [],
        "key": {"source": "key file", "length": 43, "variety": 30, "file": "/k",
                "file_mode": 0o600},
        "state_dir": "/home/u/.local/state/vesta", "socket": "/tmp/vestad-desk.sock",
        "modes": {"/home/u/.local/state/vesta": DIR | 0o700, "/tmp/vestad-desk.sock": 0o600,
                  "/home/u/.local/state/vesta/vestad-identity-desk.json": 0o600},
        "networks": [{"interface": "eth0", "address": "192.168.1.10",
                      "broadcast": "192.168.1.255"}],
        "beacon_targets": ["192.168.1.255:7778"],
        "foreign": {"other_key": {}, "other_version": {}}, "own_fingerprint_from": {},
        "twins": {}, "seed_status": [], "suspends": [], "clock_steps": [],
    }
    facts.update(changes)
    return facts


DIR = stat.S_IFDIR  # a mode's directory bit, as path_modes gives it

LOCAL: dict[str, Any] = {
    "networks": [{"interface": "eth0", "address": "192.168.1.10", "broadcast": "192.168.1.255"}],
    "hostname": "desk", "hostname_address": "127.0.1.1", "state_dir": "/home/u/.local/state/vesta",
    "modes": {}, "free_ports": {"tcp": True, "udp": True},
}


def verdict(found: list[Check], name: str) -> Check:
    (check,) = [c for c in found if c.name == name]
    return check


def test_a_healthy_node_passes_every_check() -> None:
    found = checks(healthy(), LOCAL)
    assert [c.name for c in found] == ["daemon", "interfaces", "ports", "address", "others",
                                       "fingerprint", "seeds", "clock", "key", "files"]
    assert all(c.ok for c in found), [c for c in found if not c.ok]
    assert verdict(found, "interfaces").detail == "beacons go to 192.168.1.255 on eth0"


FAULTS = [
    pytest.param({"advertised": "127.0.1.1"}, "address", "127.0.1.1, the address /etc/hosts",
                 "-advertise", id="127.0.1.1"),
    pytest.param({"advertised": "127.0.0.1", "bind": "127.0.0.1"}, "address",
                 "a loopback address", "-advertise", id="loopback"),
    pytest.param({"advertised": "10.9.9.9"}, "address", "no interface here holds",
                 "-advertise", id="not ours"),
    pytest.param({"foreign": {"other_key": {"192.168.1.20": 7}, "other_version": {}}},
                 "others", "7 beacon(s) under another key from 192.168.1.20 (7)", "same key",
                 id="another key"),
    pytest.param({"foreign": {"other_key": {}, "other_version": {"192.168.1.30": [3, "1"]}}},
                 "others", "192.168.1.30 (speaks 1)", "same vesta version", id="another version"),
    pytest.param({"own_fingerprint_from": {"192.168.1.40": 2}}, "fingerprint",
                 "a cloned SD card", "vestad-identity", id="our clone"),
    pytest.param({"twins": {"cd" * 16: ["192.168.1.50", "192.168.1.51"]}}, "fingerprint",
                 "192.168.1.50, 192.168.1.51", "identity file", id="twins"),
    pytest.param({"seeds": ["pi.example:7778"],
                  "seed_status": [{"seed": "10.1.0.5:7778", "answered": False}]},
                 "seeds", "no answer from 10.1.0.5:7778", "firewall", id="silent seed"),
    pytest.param({"seeds": ["pi.example:7778"],
                  "seed_status": [{"seed": "pi.example:7778", "answered": False,
                                   "unresolved": True}]},
                 "seeds", "pi.example:7778: the name does not resolve", "DNS",
                 id="seed name unknown"),
    pytest.param({"key": {"source": "command line", "length": 18, "variety": 6, "file": None}},
                 "key", "only 6 different characters", "vesta keygen", id="weak key"),
    pytest.param({"key": {"source": "key file", "length": 43, "variety": 30, "file": "/k",
                          "file_mode": 0o644}}, "key", "readable by others", "chmod 600 /k",
                 id="key file open"),
    pytest.param({"modes": {"/s": DIR | 0o777, "/s/vestad-ledger-desk.json": 0o644}}, "files",
                 "/s (mode 777)", "chmod 700 /s; chmod 600 /s/vestad-ledger-desk.json",
                 id="loose files"),
    pytest.param({"networks": [], "advertise": "192.168.1.10"}, "interfaces",
                 "beacons reach nobody", "-seed",
                 id="no network"),
]


@pytest.mark.parametrize(("changes", "name", "detail", "fix"), FAULTS)
def test_each_fault_fails_its_check_with_a_fix(changes: dict[str, Any], name: str, detail: str,
                                               fix: str) -> None:
    found = checks(healthy(**changes), LOCAL)
    check = verdict(found, name)
    assert not check.ok
    assert detail in check.detail
    assert fix in check.fix
    assert [c.name for c in found if not c.ok] == [name]


def test_a_seed_that_answers_and_a_suspend_are_fine() -> None:
    found = checks(healthy(seeds=["10.1.0.5:7778"], suspends=[1800.0], clock_steps=[-3600.0],
                           seed_status=[{"seed": "10.1.0.5:7778", "answered": True}]), LOCAL)
    assert all(c.ok for c in found)
    clock = verdict(found, "clock").detail
    assert "suspended 1 time(s), last for 1800 s" in clock and "stepped 1 time(s)" in clock


def test_a_key_on_the_command_line_passes_with_a_hint() -> None:
    check = verdict(checks(healthy(key={"source": "command line", "length": 20,
                                        "variety": 15, "file": None}), LOCAL), "key")
    assert check.ok and "ps" in check.detail and "-key-file" in check.fix
    assert "hint: prefer -key-file" in format_checks([check])


def test_without_a_daemon_the_local_checks_run_and_the_daemon_fails() -> None:
    found = checks(None, {**LOCAL, "free_ports": {"tcp": False, "udp": True}})
    assert [(c.name, c.ok) for c in found] == [("daemon", False), ("interfaces", True),
                                               ("ports", False), ("address", True),
                                               ("files", True)]
    assert verdict(found, "ports").detail == "TCP 7777 already in use by another program"
    assert "127.0.1.1" in verdict(found, "address").detail


def test_a_systemd_user_unit_is_checked() -> None:
    bad = {"path": "/u/vestad.service", "program": "/nope/vestad", "program_exists": False,
           "args": ["-name", "desk", "-key", "sekrit"], "linger": False}
    check = verdict(checks(healthy(), {**LOCAL, "unit": bad}), "systemd")
    assert not check.ok
    for words in ("/nope/vestad does not exist", "-key (others see it", "lingering is off"):
        assert words in check.detail
    assert "loginctl enable-linger" in check.fix
    good = {**bad, "program_exists": True, "args": ["-key-file", "/k"], "linger": True}
    hinted = verdict(checks(healthy(), {**LOCAL, "unit": good}), "systemd")
    assert hinted.ok and "KillMode=mixed" in hinted.fix and "Delegate=yes" in hinted.fix
    best = {**good, "kill_mode": "mixed", "delegate": "yes"}
    assert verdict(checks(healthy(), {**LOCAL, "unit": best}), "systemd").fix == ""


def test_a_user_unit_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unit = tmp_path / "vestad.service"
    unit.write_text("[Service]\nExecStart=%h/.local/bin/vestad -name %H -key-file %h/k\n"
                    "KillMode=mixed\nDelegate=yes\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    facts = doctor._unit_facts(unit)
    assert facts["program"] == f"{tmp_path}/.local/bin/vestad" and not facts["program_exists"]
    assert facts["args"] == ["-name", "%H", "-key-file", "%h/k"]
    assert (facts["kill_mode"], facts["delegate"]) == ("mixed", "yes")


def test_key_facts_never_carry_the_key(tmp_path: Path) -> None:
    key_file = tmp_path / "fed.key"
    key_file.write_text("x")
    key_file.chmod(0o640)
    facts = key_facts("0123456789abcdefXYZ", str(key_file), ["vestad", "-key-file", "f"])
    assert facts == {"source": "key file", "length": 19, "variety": 19, "file": str(key_file),
                     "file_mode": 0o640}
    assert key_facts("k" * 20, None, ["vestad", "--key=kkk"])["source"] == "command line"


def test_local_facts_read_this_machine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "vestad-identity-x.json").write_text("{}")
    facts = local_facts(str(state))
    assert facts["state_dir"] == str(state)
    assert facts["modes"][str(state)] == DIR | 0o755 & ~_umask_bits()
    sock = tmp_path / "control"  # a socket by any name is checked as a file
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        sock.chmod(0o644)
        found = checks(healthy(modes=path_modes(sock)), LOCAL)
    assert "chmod 600" in verdict(found, "files").fix
    assert set(facts["free_ports"]) == {"tcp", "udp"}
    assert path_modes(tmp_path / "missing") == {str(tmp_path / "missing"): None}


def _umask_bits() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
