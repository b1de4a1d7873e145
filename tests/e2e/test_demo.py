"""The README's first command: ``vesta-demo`` runs three real nodes on this machine, splits a
job across them, spills one from a busy node, runs a command on the one that allows it, and
leaves nothing behind."""

from __future__ import annotations

import glob
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import python_env

pytestmark = pytest.mark.timeout(120)

#: A newcomer sees the federation work in under a minute.
WITHIN_S = 60.0


def demo_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if any(re.fullmatch(r"demo-(desk|laptop|pi4)-[0-9a-f]{4}", a)
                   for a in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_the_demo_shows_the_federation_work_and_leaves_nothing_behind() -> None:
    before = set(glob.glob("/tmp/vestad-demo-*")) | set(glob.glob("/tmp/vesta-demo-*"))
    began = time.monotonic()
    shown = subprocess.run([sys.executable, "-m", "vesta.apps.demo"], capture_output=True,
                           text=True, env=python_env(), timeout=WITHIN_S + 30,
                           stdin=subprocess.DEVNULL)
    took = time.monotonic() - began
    print(shown.stdout[-3000:], shown.stderr[-2000:])
    assert shown.returncode == 0, shown.stderr
    assert took < WITHIN_S

    out = shown.stdout
    split = next(line for line in out.splitlines() if line.startswith("cpu 8 done in"))
    assert all(f"demo-{role}-" in split for role in ("desk", "laptop", "pi4")), split
    assert re.search(r"demo-laptop-\w+ +[\d.]+ +chosen +\d+ +\d+ +demo-laptop-\w+ takes part in "
                     r"the split", out)
    spill = next(line for line in out.splitlines() if line.startswith("cpu 2 done in"))
    assert "demo-desk-" not in spill, spill  # desk was busy: its job ran on a peer
    assert "at or above the 80% spill line" in out
    assert re.search(r"^hello from demo-pi4-\w+$", out, re.MULTILINE)  # the lender says so
    assert "does not run it: exec is off on demo-laptop-" in out
    for role in ("desk", "laptop", "pi4"):
        assert f"{role}: vestad exited with status 0; control socket removed: True" in out

    after = set(glob.glob("/tmp/vestad-demo-*")) | set(glob.glob("/tmp/vesta-demo-*"))
    assert after <= before, after - before
    assert not demo_processes()


def started_demo() -> subprocess.Popen[str]:
    """The demo, once its three nodes have started and it waits for them to link."""
    demo = subprocess.Popen([sys.executable, "-m", "vesta.apps.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=python_env(),
                            stdin=subprocess.DEVNULL)
    assert demo.stdout is not None
    for line in demo.stdout:
        if "the three nodes find each other" in line:
            break
    assert len(demo_processes()) == 3
    return demo


def test_a_demo_stopped_with_sigterm_stops_its_nodes_and_leaves_nothing() -> None:
    before = set(glob.glob("/tmp/vestad-demo-*")) | set(glob.glob("/tmp/vesta-demo-*"))
    demo = started_demo()
    demo.send_signal(signal.SIGTERM)
    out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 128 + signal.SIGTERM, out
    assert "vesta-demo: interrupted" in out
    assert not demo_processes()
    after = set(glob.glob("/tmp/vestad-demo-*")) | set(glob.glob("/tmp/vesta-demo-*"))
    assert after <= before, after - before


def test_a_demo_killed_with_sigkill_still_has_its_nodes_stop() -> None:
    """Nobody is left to stop the nodes: each asked the kernel for SIGTERM when the demo dies,
    and stops as cleanly as on any SIGTERM (its control socket removed)."""
    before = set(glob.glob("/tmp/vestad-demo-*.sock"))
    works = set(glob.glob("/tmp/vesta-demo-*"))
    demo = started_demo()
    nodes = demo_processes()
    demo.kill()
    demo.communicate(timeout=10)
    _gone, alive = psutil.wait_procs(nodes, timeout=30)
    for proc in alive:
        proc.kill()
    assert not alive
    assert set(glob.glob("/tmp/vestad-demo-*.sock")) <= before
    # the demo's own directory stays (its nodes' state and logs): it had no time to remove it
    for work in set(glob.glob("/tmp/vesta-demo-*")) - works:
        shutil.rmtree(work, ignore_errors=True)
