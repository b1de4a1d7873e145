"""``vesta-demo``: start a real node, run jobs through the CLI, show the results, stop cleanly.

Everything is real: a ``vestad`` process with its own state directory and control socket, and the
``vesta`` CLI as a user would type it. Nothing is left behind: the daemon is stopped with SIGTERM
and its temporary files are removed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vesta-demo",
        description="Start a real vestad, run jobs through the vesta CLI, show the results, and "
        "stop the node cleanly, leaving nothing behind.",
    )
    parser.add_argument("--cpu", type=int, default=4, help="size of the cpu job (default 4)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="vesta-demo-"))
    name = f"demo-{secrets.token_hex(2)}"
    socket_path = f"/tmp/vestad-{name}.sock"
    key_file = work / "key"
    key_file.write_text(secrets.token_urlsafe(24) + "\n")
    key_file.chmod(0o600)
    log = work / "vestad.log"
    _say(f"starting vestad -name {name} (log: {log})")
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "vesta.apps.vestad", "-name", name, "-key-file", str(key_file),
             "-state-dir", str(work / "state"), "-socket", socket_path],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    failures = 0
    try:
        if not _wait_for_socket(daemon, socket_path, timeout=30):
            print(log.read_text(errors="replace"), file=sys.stderr)
            print("vesta-demo: the daemon did not come up", file=sys.stderr)
            return 1
        _say("the node, as vesta status shows it")
        failures += _vesta(socket_path, "status") != 0
        _say(f"{args.cpu} million SHA-256 iterations, split over the node's cores")
        failures += _vesta(socket_path, "cpu", str(args.cpu)) != 0
        _say("the same job as JSON, with another seed")
        failures += _vesta(socket_path, "--json", "cpu", "1", "--seed", "7") != 0
        _say("hold 64 MiB for half a second")
        failures += _vesta(socket_path, "mem", "64", "500") != 0
        piwork = "piwork" if shutil.which("piwork") else None
        _say("a command: piwork estimates pi and says which host ran it")
        if piwork:
            failures += _vesta(socket_path, "exec", "--", "piwork", "2") != 0
        else:
            failures += _vesta(socket_path, "exec", "--", sys.executable, "-m", "piwork", "2") != 0
        _say("a command that fails keeps its exit status")
        status = _vesta(socket_path, "exec", "--", "sh", "-c", "echo about to fail >&2; exit 3")
        print(f"(exit status {status})")
        failures += status != 3
    finally:
        _say("stopping the node with SIGTERM")
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
        print(f"vestad exited with status {code}; control socket removed: "
              f"{not os.path.exists(socket_path)}")
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"vesta-demo: {failures} step(s) failed", file=sys.stderr)
        return 1
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
