"""``vesta doctor``: what usually keeps nodes apart, checked one line at a time, with a fix.

A LAN pool mostly fails on networking: a wrong advertised address, a blocked port, a second pool
under another key, a cloned SD card. The daemon keeps what it sees (its sockets, the beacons it
hears and drops, its seeds, its clock) and gives it on request (:func:`daemon_facts` at its start,
the rest from Discovery); the CLI adds what it can read itself (:func:`local_facts`) and
:func:`checks` turns both into verdicts. Every function here but the two that read the machine is
pure: the checks are tested with tables of facts.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vesta.sysstat import ipv4_networks

#: A key with fewer distinct characters than this is easy to guess, whatever its length.
MIN_KEY_VARIETY = 10
#: Wall-clock steps smaller than this (NTP slewing, a slow reading) are not worth a line.
CLOCK_STEP_S = 2.0
DEFAULT_PORT, DEFAULT_DPORT = 7777, 7778
USER_UNIT = "~/.config/systemd/user/vestad.service"
DEFAULT_STATE_DIR = "~/.local/state/vesta"


@dataclass(frozen=True)
class Check:
    """One line of ``vesta doctor``: what was checked, whether it is fine, and what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def doc(self) -> dict[str, Any]:
        return asdict(self)


# -- what the daemon knows ---------------------------------------------------------------------


def key_facts(key: str, key_file: str | None, argv: list[str]) -> dict[str, Any]:
    """How the federation key was given and how strong it looks (never the key itself)."""
    on_command_line = any(a in ("-key", "--key") or a.startswith(("-key=", "--key="))
                          for a in argv)
    facts: dict[str, Any] = {
        "source": "command line" if on_command_line else "key file" if key_file else
                  "environment or config file",
        "length": len(key), "variety": len(set(key)), "file": key_file,
    }
    if key_file:
        try:
            facts["file_mode"] = stat.S_IMODE(os.stat(key_file).st_mode)
        except OSError:
            facts["file_mode"] = None
    return facts


def path_modes(*paths: str | Path) -> dict[str, int | None]:
    """The permission bits of each path; None where it cannot be read."""
    modes: dict[str, int | None] = {}
    for path in paths:
        try:
            mode = os.stat(path).st_mode  # the permissions, and whether it is a directory
            modes[str(path)] = stat.S_IMODE(mode) | (stat.S_IFDIR if stat.S_ISDIR(mode) else 0)
        except OSError:
            modes[str(path)] = None
    return modes


def daemon_facts(config: Any, fingerprint: str, advertised: str, tcp: tuple[str, int],
                 argv: list[str]) -> dict[str, Any]:
    """What a daemon knows of itself at start, for ``vesta doctor``."""
    state = Path(config.state_dir)
    files = sorted(state.glob(f"vestad-*-{config.name}.json")) if state.is_dir() else []
    return {
        "name": config.name, "fingerprint": fingerprint, "advertised": advertised,
        "advertise": config.advertise, "bind": config.bind, "tcp": list(tcp),
        "dport": config.dport, "seeds": list(config.seed),
        "key": key_facts(config.key, config.key_file, argv),
        "state_dir": str(state), "socket": config.socket,
        "modes": path_modes(state, config.socket, *files),
    }


# -- what the CLI can read itself --------------------------------------------------------------


def local_facts(state_dir: str = DEFAULT_STATE_DIR) -> dict[str, Any]:
    """What ``vesta doctor`` reads on this machine, with or without a daemon."""
    state = Path(state_dir).expanduser()
    files = sorted(state.glob("vestad-*.json")) if state.is_dir() else []
    facts: dict[str, Any] = {
        "networks": [{"interface": name, "address": address, "broadcast": broadcast}
                     for name, address, _mask, broadcast in _networks()],
        "hostname": socket.gethostname(), "hostname_address": _resolve(socket.gethostname()),
        "state_dir": str(state), "modes": path_modes(state, *files),
        "free_ports": {"tcp": _free(socket.SOCK_STREAM, DEFAULT_PORT),
                       "udp": _free(socket.SOCK_DGRAM, DEFAULT_DPORT)},
    }
    unit = Path(USER_UNIT).expanduser()
    if unit.exists():
        facts["unit"] = _unit_facts(unit)
    return facts


def _networks() -> list[tuple[str, str, str, str | None]]:
    try:
        return ipv4_networks()
    except Exception:  # psutil on an odd system: say there are none
        return []


def _resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def _free(kind: int, port: int) -> bool:
    """Whether this user could bind ``port`` now (False: something listens there)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def _unit_facts(unit: Path) -> dict[str, Any]:
    """What a systemd user unit for vestad says: its program and arguments; lingering."""
    start, settings = "", {}
    for line in unit.read_text(errors="replace").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key in ("ExecStart", "KillMode", "Delegate"):
            settings[key] = value.strip()
    start = settings.get("ExecStart", "")
    try:
        argv = shlex.split(start)
    except ValueError:
        argv = start.split()
    home = str(Path.home())
    program = argv[0].lstrip("-@:+!").replace("%h", home) if argv else ""
    user = os.environ.get("USER") or Path.home().name
    return {"path": str(unit), "program": program, "program_exists": bool(program) and (
        os.access(program, os.X_OK)), "args": argv[1:],
        "linger": Path("/var/lib/systemd/linger", user).exists(),
        "kill_mode": settings.get("KillMode", "control-group"),
        "delegate": settings.get("Delegate", "no")}


# -- the verdicts ------------------------------------------------------------------------------


def checks(daemon: dict[str, Any] | None, local: dict[str, Any]) -> list[Check]:
    """Every check, in the order a person would look: the daemon, the network, the others."""
    found = [_daemon(daemon), _interfaces(daemon, local), _ports(daemon, local),
             _advertised(daemon, local)]
    if daemon is not None:
        found += [_foreign(daemon), _twins(daemon), _seeds(daemon), _clock(daemon),
                  _key(daemon)]
    found.append(_files(daemon, local))
    if "unit" in local:
        found.append(_unit(local["unit"]))
    return found


def _daemon(daemon: dict[str, Any] | None) -> Check:
    if daemon is None:
        return Check("daemon", False, "vestad is not running (the checks below that need it "
                     "are left out)", "start it: vestad -name NAME -key-file FILE")
    return Check("daemon", True, f"vestad {daemon['name']} answers "
                 f"(fingerprint {daemon['fingerprint'][:16]})")


def _interfaces(daemon: dict[str, Any] | None, local: dict[str, Any]) -> Check:
    nets = daemon["networks"] if daemon is not None else local["networks"]
    sent = [n for n in nets if n.get("broadcast")]
    if not sent:
        seeds = daemon is not None and daemon.get("seeds")
        return Check("interfaces", bool(seeds),
                     "no IPv4 interface with a broadcast address: beacons reach "
                     + ("only the seeds" if seeds else "nobody"),
                     "" if seeds else "connect to a network, or give -seed HOST:7778")
    where = ", ".join(f"{n['broadcast']} on {n['interface']}" for n in sent)
    return Check("interfaces", True, f"beacons go to {where}")


def _ports(daemon: dict[str, Any] | None, local: dict[str, Any]) -> Check:
    if daemon is not None:
        host, port = daemon["tcp"]
        return Check("ports", True, f"links on TCP {host or '*'}:{port}, beacons on UDP "
                     f"*:{daemon['dport']} (open both to your LAN in a firewall)")
    taken = [f"{kind.upper()} {DEFAULT_PORT if kind == 'tcp' else DEFAULT_DPORT}"
             for kind, free in local["free_ports"].items() if not free]
    if taken:
        return Check("ports", False, f"{' and '.join(taken)} already in use by another program",
                     "stop it, or start vestad with -port/-dport set to free ports")
    return Check("ports", True, f"TCP {DEFAULT_PORT} and UDP {DEFAULT_DPORT} are free for vestad")


def _advertised(daemon: dict[str, Any] | None, local: dict[str, Any]) -> Check:
    if daemon is None:
        named = local.get("hostname_address")
        if named and named.startswith("127."):
            return Check("address", True, f"{local['hostname']} resolves to {named} (as "
                         "/etc/hosts has it on Debian); vestad does not use it, it advertises "
                         "its first network address unless -advertise says otherwise")
        return Check("address", True, "vestad will advertise its first network address")
    address = daemon["advertised"]
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return Check("address", False, f"it advertises {address!r}, not an IPv4 address",
                     "give -advertise with this machine's LAN address")
    if address == "127.0.1.1":
        return Check("address", False, "it advertises 127.0.1.1, the address /etc/hosts gives "
                     "this machine's name on Debian: no other machine can reach it",
                     "start vestad with -advertise set to this machine's LAN address")
    if ip.is_loopback:
        return Check("address", False, f"it advertises {address}, a loopback address: only "
                     "nodes on this machine can reach it", "give -advertise (and -bind, if "
                     "set) this machine's LAN address")
    mine = {n["address"] for n in daemon["networks"]}
    if address not in mine and not daemon.get("advertise"):
        return Check("address", False, f"it advertises {address}, which no interface here "
                     "holds", "give -advertise with this machine's LAN address")
    return Check("address", True, f"peers are told to connect to {address}")


def _foreign(daemon: dict[str, Any]) -> Check:
    other_key, other_version = daemon["foreign"]["other_key"], daemon["foreign"]["other_version"]
    parts, fixes = [], []
    if other_key:
        parts.append(f"{sum(other_key.values())} beacon(s) under another key from "
                     + _hosts(other_key))
        fixes.append("give every node the same key (or ignore a second pool on this LAN)")
    if other_version:
        parts.append(f"{sum(v[0] for v in other_version.values())} beacon(s) of another "
                     "protocol version from " + ", ".join(
                         f"{host} (speaks {v[1]})" for host, v in other_version.items()))
        fixes.append("run the same vesta version on every node")
    if not parts:
        return Check("others", True, "no beacon heard under another key or version")
    return Check("others", False, "; ".join(parts), "; ".join(fixes))


def _hosts(counts: dict[str, int]) -> str:
    return ", ".join(f"{host} ({n})" for host, n in sorted(counts.items(), key=lambda e: -e[1]))


def _twins(daemon: dict[str, Any]) -> Check:
    own, twins = daemon["own_fingerprint_from"], daemon["twins"]
    if own:
        return Check("fingerprint", False, "beacons with this node's own fingerprint come from "
                     f"{_hosts(own)}: another machine has its identity (a cloned SD card?)",
                     f"on the copy, remove {daemon['state_dir']}/vestad-identity-*.json and "
                     "restart vestad there: it makes a new identity")
    if twins:
        where = "; ".join(f"{fp[:16]} from {', '.join(hosts)}" for fp, hosts in twins.items())
        return Check("fingerprint", False, f"one fingerprint from two machines: {where} "
                     "(a cloned SD card?)", "on one of them, remove the identity file in its "
                     "state directory and restart vestad")
    return Check("fingerprint", True, "no other machine uses a fingerprint twice")


def _seeds(daemon: dict[str, Any]) -> Check:
    if not daemon["seeds"]:
        return Check("seeds", True, "no seeds given (nodes beyond this subnet need -seed)")
    unknown = [s["seed"] for s in daemon["seed_status"] if s.get("unresolved")]
    silent = [s["seed"] for s in daemon["seed_status"]
              if not s["answered"] and not s.get("unresolved")]
    if unknown:
        return Check("seeds", False, f"{', '.join(unknown)}: the name does not resolve"
                     + (f"; no answer from {', '.join(silent)}" if silent else ""),
                     "check the name (or give the address), and this machine's DNS")
    if silent:
        return Check("seeds", False, f"no answer from {', '.join(silent)}",
                     "check that vestad runs there with the same key, that the address and UDP "
                     "port are right, and that no firewall drops UDP in between")
    return Check("seeds", True, f"every seed answers ({', '.join(daemon['seeds'])})")


def _clock(daemon: dict[str, Any]) -> Check:
    steps, sleeps = daemon["clock_steps"], daemon["suspends"]
    seen = []
    if sleeps:
        seen.append(f"suspended {len(sleeps)} time(s), last for {sleeps[-1]:.0f} s (lent work "
                    "ended, peers told at once)")
    if steps:
        seen.append(f"the wall clock stepped {len(steps)} time(s), last by {steps[-1]:+.0f} s "
                    "(vesta times nothing by it)")
    return Check("clock", True, "; ".join(seen) if seen else "no suspend or clock step seen")


def _key(daemon: dict[str, Any]) -> Check:
    key = daemon["key"]
    if key["variety"] < MIN_KEY_VARIETY:
        return Check("key", False, f"the key has only {key['variety']} different characters "
                     f"in its {key['length']}: easy to guess",
                     "make one with vesta keygen > fed.key and start every node with "
                     "-key-file fed.key")
    mode = key.get("file_mode")
    if key["file"] and mode is not None and mode & 0o077:
        return Check("key", False, f"the key file {key['file']} is readable by others "
                     f"(mode {mode:o})", f"chmod 600 {key['file']}")
    if key["source"] == "command line":
        return Check("key", True, f"{key['length']} characters, given on the command line "
                     "(other users see it in ps)", "prefer -key-file FILE or VESTA_KEY")
    return Check("key", True, f"{key['length']} characters, from the {key['source']}")


def _files(daemon: dict[str, Any] | None, local: dict[str, Any]) -> Check:
    modes: dict[str, int | None] = dict(local["modes"])
    if daemon is not None:
        modes.update(daemon["modes"])
    loose = []
    for path, mode in sorted(modes.items()):
        if mode is None:
            continue
        is_dir = stat.S_ISDIR(mode)
        if mode & (0o022 if is_dir else 0o077):
            loose.append((path, stat.S_IMODE(mode), is_dir))
    if loose:
        return Check("files", False, "open to other users: " + ", ".join(
            f"{path} (mode {mode:o})" for path, mode, _ in loose), "; ".join(
            f"chmod {'700' if is_dir else '600'} {shlex.quote(path)}"
            for path, _, is_dir in loose))
    where = daemon["state_dir"] if daemon is not None else local["state_dir"]
    return Check("files", True, f"the state directory {where} and the socket are this user's "
                 "alone")


def _unit(unit: dict[str, Any]) -> Check:
    problems, fixes = [], []
    if not unit["program_exists"]:
        problems.append(f"its ExecStart program {unit['program'] or '(none)'} does not exist")
        fixes.append("point ExecStart at vestad (command -v vestad)")
    if any(a in ("-key", "--key") or a.startswith(("-key=", "--key=")) for a in unit["args"]):
        problems.append("it gives the key with -key (others see it in ps)")
        fixes.append("use -key-file %h/.config/vesta/fed.key")
    if not unit["linger"]:
        problems.append("lingering is off: vestad stops when you log out")
        fixes.append("loginctl enable-linger $USER")
    if problems:
        return Check("systemd", False, f"{unit['path']}: " + "; ".join(problems),
                     "; ".join(fixes))
    hints = []
    if unit.get("kill_mode", "control-group") != "mixed":
        hints.append("KillMode=mixed (so that a stop gives local jobs their grace)")
    if unit.get("delegate", "no").lower() not in ("yes", "true", "1"):
        hints.append("Delegate=yes (a cgroup for each job process)")
    return Check("systemd", True, f"{unit['path']} starts {unit['program']}, lingering is on",
                 "add " + " and ".join(hints) if hints else "")


def format_checks(found: list[Check], mark: Callable[[bool], str] | None = None) -> str:
    """One line each: a mark, the name, what was found; the fix indented below."""
    mark = mark or (lambda ok: "ok  " if ok else "FAIL")
    width = max(len(c.name) for c in found)
    lines = []
    for c in found:
        lines.append(f"{mark(c.ok)}  {c.name.ljust(width)}  {c.detail}")
        if c.fix and not c.ok:
            lines.append(f"      {' ' * width}  fix: {c.fix}")
        elif c.fix:
            lines.append(f"      {' ' * width}  hint: {c.fix}")
    return "\n".join(lines) + "\n"
