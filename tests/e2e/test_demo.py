"""The README's first command: ``vesta-demo`` runs three real nodes on this machine, splits a
job across them, spills one from a busy node, runs a command on the one that allows it, and
leaves nothing behind."""

from __future__ import annotations

import glob
import re
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
