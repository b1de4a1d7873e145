"""``vesta-demo``: a real two-node federation on this machine: discovery, spill, and a clean stop.

Everything is real: two ``vestad`` processes ("desk" and "pi4") with their own state directories,
control sockets, identities and ports, sealed links between them, and the ``vesta`` CLI as a user
would type it. They listen on the loopback address only and find each other through ``-seed``, so
the demo sends nothing onto the network. Nothing is left behind: both daemons are stopped with
SIGTERM and their temporary files are removed.
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
from functools import partial
from pathlib import Path


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


def _peers_up(socket_path: str) -> bool:
    from vesta.client import Client, VestaError

    try:
        with Client(socket_path, timeout=2) as client:
            return any(p.get("state") == "up" for p in client.peers())
    except VestaError:
        return False


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vesta-demo",
        description="Start two real vestad nodes on this machine (loopback only), show them find "
        "each other, run jobs that spill from the busy one to the idle one, and stop both "
        "cleanly, leaving nothing behind.",
    )
    parser.add_argument("--cpu", type=int, default=4, help="size of the cpu job (default 4)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vesta-demo-"))
    tag = secrets.token_hex(2)
    key_file = work / "key"
    key_file.write_text(secrets.token_urlsafe(32) + "\n")
    key_file.chmod(0o600)
    names = {"desk": f"demo-desk-{tag}", "pi4": f"demo-pi4-{tag}"}
    ports = {n: (_free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)) for n in names}
    sockets = {n: f"/tmp/vestad-{names[n]}.sock" for n in names}
    # on a machine with several cores each node gets its own half, as two machines would
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    pins = {"desk": set(cores[:half]), "pi4": set(cores[half:]) or set(cores)}
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    for role, other in (("desk", "pi4"), ("pi4", "desk")):
        log = work / f"{role}.log"
        extra = ["-allow-exec"] if role == "pi4" else []
        _say(f"starting vestad -name {names[role]} (log: {log})")
        with log.open("wb") as out:
            daemons[role] = subprocess.Popen(
                [sys.executable, "-m", "vesta.apps.vestad", "-name", names[role], "-key-file",
                 str(key_file), "-state-dir", str(work / role), "-socket", sockets[role],
                 "-bind", "127.0.0.1", "-port", str(ports[role][0]), "-dport",
                 str(ports[role][1]), "-seed", f"127.0.0.1:{ports[other][1]}", *extra],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=partial(os.sched_setaffinity, 0, pins[role]),
            )
    desk = sockets["desk"]
    failures = 0
    try:
        for role, daemon in daemons.items():
            if not _wait_for_socket(daemon, sockets[role], timeout=30):
                print((work / f"{role}.log").read_text(errors="replace"), file=sys.stderr)
                print(f"vesta-demo: {role} did not come up", file=sys.stderr)
                return 1
        _say("the two nodes find each other (sealed beacons, then a sealed link)")
        if not _until(lambda: _peers_up(desk) and _peers_up(sockets["pi4"]), timeout=10):
            print("vesta-demo: the nodes did not link", file=sys.stderr)
            failures += 1
        failures += _vesta(desk, "peers") != 0
        _until(lambda: _cpu_pct(desk) < 50, timeout=10)  # the start-up load passes
        _say(f"an idle desk keeps its own work: {args.cpu} million SHA-256 iterations")
        failures += _vesta(desk, "cpu", str(args.cpu)) != 0
        _say("desk gets busy: vesta stress pins its cores for 30 s")
        failures += _vesta(desk, "stress", "0", "30") != 0
        _until(lambda: _cpu_pct(desk) >= 80, timeout=10)
        _say("now the same job spills to the idle peer, with the same digest")
        failures += _vesta(desk, "cpu", str(args.cpu)) != 0
        _say("a command runs on the peer too: piwork estimates pi and says which host ran it")
        piwork = "piwork" if shutil.which("piwork") else None
        if piwork:
            failures += _vesta(desk, "exec", "--", "piwork", "2") != 0
        else:
            failures += _vesta(desk, "exec", "--", sys.executable, "-m", "piwork", "2") != 0
        failures += _vesta(desk, "stop-stress") != 0
        _until(lambda: _cpu_pct(desk) < 50, timeout=10)
        _say("a command that fails keeps its exit status")
        status = _vesta(desk, "exec", "--", "sh", "-c", "echo about to fail >&2; exit 3")
        print(f"(exit status {status})")
        failures += status != 3
    finally:
        _say("stopping both nodes with SIGTERM")
        codes = {}
        for daemon in daemons.values():
            daemon.send_signal(signal.SIGTERM)
        for role, daemon in daemons.items():
            try:
                codes[role] = daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                codes[role] = daemon.wait()
            print(f"{role}: vestad exited with status {codes[role]}; control socket removed: "
                  f"{not os.path.exists(sockets[role])}")
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"vesta-demo: {failures} step(s) failed", file=sys.stderr)
        return 1
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
