"""``vesta-demo``: a real three-node federation on this machine: discovery, a split, a spill,
an exec on a lender, and a clean stop.

Everything is real: three ``vestad`` processes ("desk", "laptop" and "pi4") with their own state
directories, control sockets, identities and ports, sealed links between them, and the ``vesta``
CLI as a user would type it. They listen on the loopback address only and find each other through
``-seed``, so the demo sends nothing onto the network. Each runs on CPUs of its own where the
machine has enough (on two, laptop and pi4 share one), so that stressing desk leaves the others
free. Nothing is left behind: the daemons are stopped with SIGTERM and their files removed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vesta import exits
from vesta.apps import Interrupted, signals_interrupt
from vesta.workers.jobs import die_with_parent


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _vesta(socket_path: str, *args: str) -> int:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"$ vesta {shown}", flush=True)
    cmd = [sys.executable, "-m", "vesta.apps.cli", "--socket", socket_path, *args]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode


def _wait_for_socket(proc: subprocess.Popen[bytes], socket_path: str, timeout: float) -> bool:
    from vesta.client import Client, VestaError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with Client(socket_path, timeout=1) as client:
                client.status()
            return True
        except VestaError:
            time.sleep(0.05)
    return False


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _cpu_pct(socket_path: str) -> float:
    from vesta.client import Client, VestaError

    try:
        with Client(socket_path, timeout=2) as client:
            return float(client.status()["node"]["cpu_pct"])
    except VestaError:
        return 0.0


def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


ROLES = ("desk", "laptop", "pi4")


def cpu_groups(cores: list[int]) -> dict[str, set[int]]:
    """The CPUs of each node: a third of them each where there are three or more; on two, desk
    has one and laptop and pi4 share the other; on one, they all share it."""
    if len(cores) >= 3:
        size, extra = divmod(len(cores), 3)
        groups, at = {}, 0
        for i, role in enumerate(ROLES):
            take = size + (1 if i < extra else 0)
            groups[role] = set(cores[at:at + take])
            at += take
        return groups
    first, last = {cores[0]}, {cores[-1]}
    return {"desk": first, "laptop": last, "pi4": last}


def _linked(socket_path: str, count: int) -> bool:
    from vesta.client import Client, VestaError

    try:
        with Client(socket_path, timeout=2) as client:
            return sum(p.get("state") == "up" for p in client.peers()) >= count
    except VestaError:
        return False


def _seen_idle(socket_path: str, name: str) -> bool:
    """Whether the node on ``socket_path`` sees peer ``name`` below half its CPU."""
    from vesta.client import Client, VestaError

    try:
        with Client(socket_path, timeout=2) as client:
            return any(p["name"] == name and p.get("cpu_pct", 100) < 50 and not p.get("paused")
                       and p.get("offer_workers", 0) > 0 for p in client.peers())
    except VestaError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vesta-demo",
        description="Start three real vestad nodes on this machine (loopback only), show them "
        "find each other, split a job across them, spill work from a busy node, run a command "
        "on a lender, and stop them cleanly, leaving nothing behind.",
    )
    parser.add_argument("--cpu", type=int, default=8,
                        help="size of the job that splits (default 8: 80 units)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vesta-demo-"))
    tag = secrets.token_hex(2)
    key_file = work / "key"
    key_file.write_text(secrets.token_urlsafe(32) + "\n")
    key_file.chmod(0o600)
    names = {role: f"demo-{role}-{tag}" for role in ROLES}
    ports = {r: (_free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)) for r in ROLES}
    sockets = {role: f"/tmp/vestad-{names[role]}.sock" for role in ROLES}
    pins = cpu_groups(sorted(os.sched_getaffinity(0)))
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    code = 0
    try:
        with signals_interrupt():  # SIGTERM and SIGHUP stop the demo as Ctrl-C does
            for role in ROLES:
                daemons[role] = _start(role, names, ports, sockets, pins[role], key_file, work)
            failures = _show(args.cpu, names, sockets, work, daemons)
    except KeyboardInterrupt as exc:
        print("\nvesta-demo: interrupted", file=sys.stderr)
        code = exits.killed_by(exc.signum) if isinstance(exc, Interrupted) else exits.CANCELLED
        failures = 0
    finally:
        failures_stopping = _stop(daemons, sockets)
        shutil.rmtree(work, ignore_errors=True)
    if code:
        return code
    failures += failures_stopping
    if failures:
        print(f"vesta-demo: {failures} step(s) failed", file=sys.stderr)
        return 1
    _say("done: every node stopped, nothing left behind")
    return 0


def _start(role: str, names: dict[str, str], ports: dict[str, tuple[int, int]],
           sockets: dict[str, str], cpus: set[int], key_file: Path,
           work: Path) -> subprocess.Popen[bytes]:
    """Start one node: on its CPUs, on loopback, seeded with the others; it gets SIGTERM (and
    stops cleanly) should the demo itself die."""
    log = work / f"{role}.log"
    seeds = ",".join(f"127.0.0.1:{ports[other][1]}" for other in ROLES if other != role)
    extra = ["-allow-exec"] if role == "pi4" else []
    _say(f"starting vestad -name {names[role]} on CPU {','.join(map(str, sorted(cpus)))}"
         f" (log: {log})")

    def child() -> None:
        os.sched_setaffinity(0, cpus)
        die_with_parent(signal.SIGTERM)

    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vesta.apps.vestad", "-name", names[role], "-key-file",
             str(key_file), "-state-dir", str(work / role), "-socket", sockets[role],
             "-bind", "127.0.0.1", "-port", str(ports[role][0]), "-dport",
             str(ports[role][1]), "-seed", seeds, "-advertise-spare", "500", *extra],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=child,
        )


def _show(cpu: int, names: dict[str, str], sockets: dict[str, str], work: Path,
          daemons: dict[str, subprocess.Popen[bytes]]) -> int:
    """The demo's steps, once the nodes run; the number of steps that failed."""
    desk = sockets["desk"]
    failures = 0
    for role, daemon in daemons.items():
        if not _wait_for_socket(daemon, sockets[role], timeout=30):
            print((work / f"{role}.log").read_text(errors="replace"), file=sys.stderr)
            print(f"vesta-demo: {role} did not come up", file=sys.stderr)
            return 1
    _say("the three nodes find each other (sealed beacons, then sealed links)")
    if not _until(lambda: all(_linked(sockets[r], 2) for r in ROLES), timeout=15):
        print("vesta-demo: the nodes did not all link", file=sys.stderr)
        failures += 1
    failures += _vesta(desk, "peers") != 0
    _until(lambda: all(_cpu_pct(sockets[r]) < 50 for r in ROLES), timeout=15)
    _say(f"a job large enough to split: {cpu} million SHA-256 iterations, handed out in "
         "chunks as each node finishes its last")
    failures += _vesta(desk, "cpu", str(cpu)) != 0
    _say("where each part ran, and why")
    failures += _vesta(desk, "why") != 0
    _say("desk gets busy: vesta stress pins its CPUs for 30 s")
    failures += _vesta(desk, "stress", "0", "30") != 0
    _until(lambda: _cpu_pct(desk) >= 80, timeout=10)
    _say("a small job now spills from the busy desk to an idle peer, with the same digest")
    failures += _vesta(desk, "cpu", "2") != 0
    failures += _vesta(desk, "why") != 0
    _until(lambda: _seen_idle(desk, names["pi4"]), timeout=10)  # laptop's job has ended
    _say("a command goes only where commands are allowed (pi4), and says where it ran")
    failures += _vesta(desk, "exec", "--", "sh", "-c", 'echo "hello from $VESTA_NODE"') != 0
    failures += _vesta(desk, "why") != 0
    failures += _vesta(desk, "stop-stress") != 0
    return failures


def _stop(daemons: dict[str, subprocess.Popen[bytes]], sockets: dict[str, str]) -> int:
    """SIGTERM every node, wait for each; the number that did not stop cleanly."""
    _say("stopping every node with SIGTERM")
    for daemon in daemons.values():
        daemon.send_signal(signal.SIGTERM)
    failed = 0
    for role, daemon in daemons.items():
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
        gone = not os.path.exists(sockets[role])
        print(f"{role}: vestad exited with status {code}; control socket removed: {gone}")
        failed += code != 0 or not gone
    return failed


if __name__ == "__main__":
    sys.exit(main())
