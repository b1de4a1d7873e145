"""vestatop in a real terminal (tmux) on a lab node, beside two peers on their own hosts, with
the node stressed and a split job in flight from it."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import python_env, sigint_as_in_a_shell, wait_for
from tests.e2e.test_top import TMUX, Tmux, busy_and_lending, node_rows, status, top_command
from tests.lab.conftest import start_vestad
from tests.lab.netlab import Lab
from tests.lab.test_federation import KEY, two_cpus

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(TMUX is None, reason="tmux is not installed")]

#: A cpu job long enough to be in flight while the screen is read.
JOB_N = 40


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    yield server
    server.kill()


def test_vestatop_on_a_lab_node_shows_its_peers_its_stress_and_the_work_it_lends_out(
        lab: Lab, tmux: Tmux, pin_here: Callable[[int], None]) -> None:
    cpu_desk, cpu_pis = two_cpus()
    hosts = {"desk": lab.add_host("desk", cpu=cpu_desk), "laptop": lab.add_host("laptop",
             cpu=cpu_pis), "pi4": lab.add_host("pi4", cpu=cpu_pis)}
    pin_here(cpu_desk)  # the CLI, tmux and vestatop: not on the CPU the peers lend
    desk, laptop, pi4 = (start_vestad(host, name, KEY, "-advertise-spare", "250")
                         for name, host in hosts.items())
    wait_for(lambda: all(sum(p["state"] == "up" for p in status(d)["peers"]) == 2
                         for d in (desk, laptop, pi4)), timeout=15, what="the three to link")
    tmux.start(top_command(desk.socket))
    tmux.wait_screen(lambda s: {n for n, _ in node_rows(s)} == set(hosts), "the three nodes")
    assert desk.cli("stress", "0", "20").returncode == 0
    wait_for(lambda: busy_and_lending(desk, laptop, pi4), timeout=15,
             what="desk to be busy while laptop and pi4 offer workers")
    job = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", desk.socket, "cpu", str(JOB_N)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env(),
        stdin=subprocess.DEVNULL, preexec_fn=sigint_as_in_a_shell)
    try:
        flow = re.compile(r"^(laptop|pi4) +-> desk +desk-\S+ +\[[# ]*\] +\d+/\d+")
        screen = tmux.wait_screen(
            lambda s: len([line for line in s if flow.match(line)]) == 2
            and any("|" in bar for n, bar in node_rows(s) if n == "desk"),
            "both peers' flows, and desk's CPU bar showing its owner's load")
        print("\n" + "\n".join(screen))
        assert len(screen) <= 24 and all(len(line) <= 80 for line in screen)
        assert screen[0].startswith(" vestatop  desk  3/3 up")
        assert any(line.startswith(">*desk ") for line in screen)
    finally:
        job.send_signal(signal.SIGINT)  # cancels the job everywhere
        job.communicate(timeout=20)
        desk.cli("stop-stress")
    tmux.keys("q")
    assert tmux.wait_exit() == 0
