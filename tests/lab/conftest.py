"""Fixtures of the network lab: a fresh lab per test, and real vestad daemons inside its hosts."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, python_env, wait_answering
from tests.lab.netlab import Host, Lab, cleanup_stale, unavailable_reason


@pytest.fixture(scope="session")
def netns_available() -> None:
    """Skip unless network namespaces work here; once per run, sweep what crashed runs left."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def lab(netns_available: None, tmp_path: Path) -> Iterator[Lab]:
    """An empty lab; closed after the test whatever its outcome. Logs and state go to tmp_path."""
    the_lab = Lab(workdir=tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()


@dataclass
class LabDaemon(Daemon):
    """A real vestad inside a lab host. Its control socket is a Unix socket on the shared
    filesystem, so ``cli`` (inherited) runs the CLI from the root namespace."""

    host: Host = field(kw_only=True)

    def status(self) -> dict[str, Any]:
        """``vesta --json status`` of this daemon, parsed."""
        result = self.cli("--json", "status")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status


def start_vestad(host: Host, name: str, key: str, *extra_args: str) -> LabDaemon:
    """Start vestad inside ``host`` and wait (bounded) until its control socket answers. The lab
    kills it on close; its log is in the lab's workdir."""
    lab = host.lab
    tag = secrets.token_hex(3)
    sock = str(lab.rundir / f"{name}-{tag}.sock")
    state = lab.workdir / f"state-{name}-{tag}"
    log = lab.workdir / f"vestad-{name}-{tag}.log"
    args = ["-name", name, "-key", key, "-socket", sock, "-state-dir", str(state),
            "-log-level", "debug", *extra_args]
    with log.open("w") as out:
        proc = host.run([sys.executable, "-m", "vesta.apps.vestad", *args], stdout=out,
                        stderr=subprocess.STDOUT, env=python_env(), text=True)
    daemon = LabDaemon(name, sock, state, proc, log, args, host=host)
    wait_answering(daemon, f" in lab host {host.name}")
    return daemon


@pytest.fixture
def pin_here() -> Iterator[Callable[[int], None]]:
    """Keep this process, and the CLI processes it starts, on one CPU (desk's) for the rest of
    the test, so that they do not weigh on the load of the peer the work should spill to."""
    before = os.sched_getaffinity(0)
    yield lambda cpu: os.sched_setaffinity(0, {cpu})
    os.sched_setaffinity(0, before)
