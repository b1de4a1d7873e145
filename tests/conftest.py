"""Fixtures shared by every test: a clean pykka runtime, real daemons, the CLI as a subprocess."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pykka
import pytest

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-federation-key-0123456789"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "a condition") -> Any:
    """Poll ``predicate`` until it returns something true; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: its wait() is the polling interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        pause.wait(interval)


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=10)


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a program under test: this checkout first on the path, no stray keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VESTA_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``vesta ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "vesta.apps.cli", *args], capture_output=True, text=True,
        env=env or python_env(), timeout=timeout, stdin=subprocess.DEVNULL, **kwargs,
    )


@dataclass
class Daemon:
    """A real vestad in a subprocess."""

    name: str
    socket: str
    state_dir: Path
    proc: subprocess.Popen[str]
    log: Path
    args: list[str] = field(default_factory=list)

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_cli("--socket", self.socket, *args, **kwargs)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the daemon and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def sigint_as_in_a_shell() -> None:
    """In a child, before exec: SIGINT and SIGHUP back to their defaults, as for a foreground
    job at a terminal. A test run started in the background has SIGINT ignored, and one started
    with ``nohup`` SIGHUP; a child inherits that, so a test that presses Ctrl-C or hangs up
    would do so in vain."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def free_port(kind: int) -> int:
    """A port of loopback that is free now, for TCP or UDP."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_daemon(tmp_path: Path, *extra: str, name: str | None = None,
                 env: dict[str, str] | None = None, wait: bool = True,
                 cpus: set[int] | None = None) -> Daemon:
    """Start vestad with a private state directory and control socket, and wait until it answers."""
    tag = secrets.token_hex(3)
    name = name or f"t{tag}"
    sock = f"/tmp/vestad-test-{tag}.sock"
    state = tmp_path / f"state-{tag}"
    log = tmp_path / f"vestad-{tag}.log"
    args = ["-name", name, "-state-dir", str(state), "-socket", sock, "-log-level", "debug",
            *extra]
    if not any(a in extra for a in ("-key", "--key", "-key-file", "--key-file")):
        args += ["-key", KEY]
    # on loopback only, on ports of its own: beacons never leave this machine in the tests
    if "-bind" not in extra:
        args += ["-bind", "127.0.0.1"]
    if "-port" not in extra:
        args += ["-port", str(free_port(socket.SOCK_STREAM))]
    if "-dport" not in extra:
        args += ["-dport", str(free_port(socket.SOCK_DGRAM))]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vesta.apps.vestad", *args], stdout=out,
            stderr=subprocess.STDOUT, env=env or python_env(), stdin=subprocess.DEVNULL,
            text=True, preexec_fn=None if cpus is None else partial(os.sched_setaffinity, 0, cpus),
        )
    daemon = Daemon(name, sock, state, proc, log, args)
    if wait:
        wait_answering(daemon)
    return daemon


def wait_answering(daemon: Daemon, where: str = "") -> None:
    """Wait (bounded) until a daemon answers on its control socket; fail with its log if it
    exits first."""
    from vesta.client import answers

    proc = daemon.proc
    wait_for(lambda: proc.poll() is not None or answers(daemon.socket), timeout=20,
             what=f"vestad {daemon.name}{where} to answer on {daemon.socket}")
    if proc.poll() is not None:
        pytest.fail(f"vestad {daemon.name} exited with {proc.returncode}:\n{daemon.log_text()}")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons; each is stopped after the test, which fails if one leaves a process behind."""
    started: list[Daemon] = []

    def factory(*extra: str, **kwargs: Any) -> Daemon:
        d = start_daemon(tmp_path, *extra, **kwargs)
        started.append(d)
        return d

    yield factory
    for d in started:
        children = d.descendants()
        stuck = False
        if d.proc.poll() is None:
            try:
                d.stop()
            except subprocess.TimeoutExpired:  # kill it, so that nothing outlives the test run
                stuck = True
                d.proc.kill()
                d.proc.wait(10)
        _gone, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            p.kill()
        assert not stuck, f"vestad {d.name} did not stop on SIGTERM within 20 s"
        assert not alive, f"processes outlived vestad {d.name}: {alive}"
        Path(d.socket).unlink(missing_ok=True)
        # the node's job space: what a daemon killed with kill -9 leaves for its next start
        shutil.rmtree(f"/tmp/vestad-{d.name}.{os.getuid()}", ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """One running daemon."""
    return daemon_factory()
