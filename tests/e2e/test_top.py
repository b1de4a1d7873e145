"""vestatop: its screen as a pure function of a status document, and the program itself in a real
terminal (a tmux pane) watching real daemons on loopback.

The rendering tests need no terminal. The live tests drive ``python -m vesta.apps.top`` in a
detached tmux server of their own (``-L``, a fresh name each time), press keys with ``send-keys``
and read the screen with ``capture-pane``; they are skipped where tmux is not installed.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from blessed import Terminal
from blessed.keyboard import Keystroke

from tests.conftest import Daemon, free_port, python_env, sigint_as_in_a_shell, wait_for
from vesta.apps.top import (
    PLAIN,
    Monitor,
    View,
    cpu_bar,
    first_change,
    layout,
    move_selection,
    next_sort,
    node_order,
    palette_for,
    render,
    wants_colour,
)
from vesta.client import Client, DaemonUnreachable

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., Daemon]
TMUX = shutil.which("tmux")
needs_tmux = pytest.mark.skipif(
    TMUX is None, reason="tmux is not installed: the live tests run vestatop in a tmux pane")
#: an SGR sequence that sets a colour (30-49, 90-107, 38;5;N and 48;2;R;G;B among them)
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9]*;)*(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9]*)*m")


# -- a hand-made status document ---------------------------------------------------------------


def node(name: str, fp: str, cpu: float, owner: float, lent_pct: float,
         **extra: Any) -> dict[str, Any]:
    """A node as ``status`` describes it: its total CPU load, its owner's and the lent load."""
    doc = {
        "name": name, "fingerprint": fp * 32, "address": "10.0.0.1", "version": 1, "cores": 8,
        "cpu_pct": cpu, "owner_cpu_pct": owner, "lent_cpu_pct": lent_pct, "mem_available_mb": 12288,
        "mem_total_mb": 16384, "power": "grid", "willingness": 1.0, "battery_pct": None,
        "offer_workers": 6, "offer_mem_mb": 1024, "gpu": False, "allow_exec": False,
        "exec_allowlist": [], "temps_c": {"cpu": 61.0}, "temp_c": 61.0, "paused": "",
        "state": "up", "last_seen_s": 0.2,
    }
    doc.update(extra)
    return doc


def status_doc(events: int = 30) -> dict[str, Any]:
    """Three nodes (this one pinned by its owner, two lending to it), a ledger, two flows and
    ``events`` events."""
    return {
        "node": {**node("alpha", "a", 100.0, 99.0, 0.0), "workers_busy": 2, "workers": 2,
                 "queued": 0, "stress": {"cores": 8, "seconds_left": 7.5}},
        "peers": [
            node("bravo", "b", 75.0, 50.0, 25.0, lent=0.0, borrowed=40.0, reason=""),
            node("charlie", "c", 30.0, 5.0, 25.0, temp_c=None, temps_c={}, power="battery",
                 willingness=0.35, paused="owner load 91% >= 80%", reason=""),
        ],
        "ledger": {"b" * 32: {"name": "bravo", "lent": 0.0, "borrowed": 40.0, "lent_mib_s": 0.0,
                              "borrowed_mib_s": 0.0, "cap": 800.0}},
        "jobs": [{"job_id": "alpha-ef7a76", "kind": "cpu", "state": "running"}],
        "flows": [
            {"job_id": "alpha-ef7a76", "from": "alpha", "to": "bravo", "units_done": 3,
             "units": 10, "rate": 1.5, "paused": False},
            {"job_id": "alpha-ef7a76", "from": "alpha", "to": "charlie", "units_done": 1,
             "units": 10, "rate": 0.0, "paused": True},
        ],
        "events": [{"at": 1_700_000_000.0 + i, "kind": "join", "node": f"n{i}",
                    "detail": f"event number {i} " + "x" * 200} for i in range(events)],
        "counters": {"dropped_beacons": 0},
    }


def row_of(lines: list[str], name: str) -> str:
    """The node list's row of node ``name``."""
    return next(line for line in lines if re.match(rf"^[> ][* ]{name} ", line))


# -- rendering, without a terminal -------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (80, 10), (40, 12), (120, 40), (20, 5), (200, 60),
                                  (80, 1), (1, 1)])
def test_every_line_fits_the_terminal(size: tuple[int, int]) -> None:
    width, height = size
    for view in (View(), View(help=True), View(sort="cpu", selected="c" * 32)):
        lines = render(status_doc(), width, height, view)
        assert len(lines) <= height
        assert all(len(line) <= width for line in lines), lines
        if len(lines) == height:  # the bottom-right cell stays empty: no terminal scrolls
            assert len(lines[-1]) < width


def test_at_80x24_everything_shows_and_the_events_take_what_is_left() -> None:
    lines = render(status_doc(), 80, 24, View())
    assert len(lines) == 24
    assert lines[0].startswith(" vestatop  alpha  3/3 up") and "? help  q quit" in lines[0]
    for name in ("alpha", "bravo", "charlie"):
        assert row_of(lines, name)
    assert any(line.startswith("-- alpha (this node)") for line in lines)
    events = [line for line in lines if re.match(r"^\d\d:\d\d:\d\d join", line)]
    assert 3 <= len(events) < 30  # fewer event lines than events: the terminal is short
    assert "event number 29" in events[0]  # newest first


def test_a_shorter_terminal_shows_fewer_events_but_keeps_the_nodes() -> None:
    tall = render(status_doc(), 80, 24, View())
    short = render(status_doc(), 80, 14, View())
    count = lambda lines: sum(1 for li in lines if re.match(r"^\d\d:\d\d", li))  # noqa: E731
    assert count(short) < count(tall)
    for name in ("alpha", "bravo", "charlie"):
        assert row_of(short, name)


def test_cpu_bars_show_owner_load_apart_from_lent_load() -> None:
    bar = cpu_bar({"cpu_pct": 75.0, "owner_cpu_pct": 50.0, "lent_cpu_pct": 25.0}, 22)
    assert "".join(text for text, _ in bar) == "[||||||||||#####  75%]"
    assert [style for text, style in bar if "|" in text] == ["owner"]
    assert [style for text, style in bar if "#" in text] == ["lent"]
    # the rest of the load, neither the owner's nor lent (the daemon's own, niced work): dots
    shared = cpu_bar({"cpu_pct": 100.0, "owner_cpu_pct": 0.0, "lent_cpu_pct": 50.0}, 22)
    assert "".join(text for text, _ in shared) == "[##########......100%]"
    lines = render(status_doc(), 80, 24, View())
    bravo = re.search(r"\[([^\]]*)\]", row_of(lines, "bravo"))
    assert bravo is not None
    assert bravo[1].startswith("|" * 6) and "#" * 3 in bravo[1] and bravo[1].endswith("75%")
    alpha = re.search(r"\[([^\]]*)\]", row_of(lines, "alpha"))
    assert alpha is not None and "#" not in alpha[1]  # alpha runs nothing for its peers


def test_a_node_row_shows_cores_power_temperature_state_and_balance() -> None:
    lines = render(status_doc(), 80, 24, View())
    bravo, charlie = row_of(lines, "bravo"), row_of(lines, "charlie")
    assert re.search(r"6/8 grid 100% +61C up +-40\.0$", bravo), bravo
    assert re.search(r"6/8 batt 35% +paused", charlie), charlie  # no temperature: blank
    wide = render(status_doc(), 120, 30, View())
    assert "VER" in wide[1] and " v1 " in row_of(wide, "bravo")


def test_flows_say_who_lends_to_whom_and_how_far() -> None:
    lines = render(status_doc(), 80, 24, View())
    flows = [line for line in lines if " -> " in line and "alpha-ef7a76" in line]
    assert len(flows) == 2
    assert re.match(r"^bravo +-> alpha +alpha-ef7a76 +\[###? *\] +3/10 +30% +1\.50 u/s", flows[0])
    assert flows[1].startswith("charlie") and flows[1].endswith("paused")


def test_the_selected_node_shows_its_every_field_and_its_ledger_line() -> None:
    doc = status_doc()
    view = View()
    move_selection(view, doc, 1)
    lines = render(doc, 80, 40, view)
    assert row_of(lines, "bravo").startswith("> bravo")
    assert row_of(lines, "alpha").startswith(" *alpha")  # * this node, > the selected one
    text = "\n".join(lines)
    assert f"-- bravo (peer)  fingerprint {'b' * 32} --" in text
    assert "ledger: lent it 0.0 core-s, borrowed 40.0; its cap here 800; MiB-s lent 0" in text
    assert "owner 50.0%, lent 25.0%" in text and "also: allow_exec no" in text
    move_selection(view, doc, 5)  # stops at the last node
    assert row_of(render(doc, 80, 40, view), "charlie").startswith("> charlie")
    assert "paused for its owner: owner load 91%" in "\n".join(render(doc, 80, 40, view))


def test_sorting_cycles_name_cpu_lent_and_keeps_the_selection() -> None:
    doc = status_doc()
    view = View(selected="b" * 32)
    names = lambda: [n["name"] for n in node_order(doc, view.sort)]  # noqa: E731
    assert names() == ["alpha", "bravo", "charlie"]
    next_sort(view)
    assert view.sort == "cpu" and names() == ["alpha", "bravo", "charlie"]
    next_sort(view)
    assert view.sort == "lent" and names() == ["bravo", "charlie", "alpha"]
    assert render(doc, 80, 24, view)[2].startswith("> bravo")  # selected, now first
    next_sort(view)
    assert view.sort == "name"


def test_help_lists_the_keys() -> None:
    text = "\n".join(render(status_doc(), 80, 24, View(help=True)))
    for key in ("q  Ctrl-C   quit", "?           this help", "s           sort",
                "Up  Down    select", "any key closes"):
        assert key in text


def test_a_peer_that_told_little_and_text_from_peers_cannot_move_the_cursor() -> None:
    doc = status_doc(events=1)
    doc["peers"].append({"name": "old", "fingerprint": "d" * 32, "address": "10.0.0.9",
                         "state": "incompatible", "version": 2, "reason": "speaks v2\x1b[2J"})
    doc["events"][0]["detail"] = "evil \x1b]0;title\x07 \x9b31m"
    view = View(selected="d" * 32)
    lines = render(doc, 80, 30, view)
    assert re.search(r"^> old +\[ +\?\] \[ +\?\] +- -", row_of(lines, "old"))
    assert "incompat" in row_of(lines, "old")
    assert not any(c in "\n".join(lines) for c in "\x1b\x07\x9b")


def test_monochrome_output_has_no_colour_sequences() -> None:
    assert not any("\x1b" in line for line in render(status_doc(), 80, 24, View(), PLAIN))
    term = Terminal(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    mono = "\n".join(render(status_doc(), 80, 24, View(), palette_for(term, colour=False)))
    assert not COLOUR_SGR.search(mono)
    assert term.reverse in mono  # the title and the selected node still stand out
    coloured = render(status_doc(), 80, 24, View(), palette_for(term, colour=True))
    assert COLOUR_SGR.search("\n".join(coloured))
    assert all(term.length(line) <= 80 for line in coloured)
    plain_rows = ["".join(text for text, _ in row) for row in layout(status_doc(), 80, 24, View())]
    assert [term.strip_seqs(line) for line in coloured] == plain_rows


def test_colour_only_where_the_terminal_has_it_and_nobody_declined_it() -> None:
    colour = Terminal(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    none = Terminal(kind="vt100", stream=io.StringIO(), force_styling=True)
    assert none.number_of_colors == 0 and not wants_colour(none, {})
    assert wants_colour(colour, {"TERM": "xterm-256color"})
    assert not wants_colour(colour, {"TERM": "dumb"})
    assert not wants_colour(colour, {"TERM": "xterm", "NO_COLOR": "1"})


class FakeClient:
    """Hands out status documents, and counts when it was asked; gone after ``answers``."""

    def __init__(self, doc: dict[str, Any], answers: int = 1000) -> None:
        self.doc = doc
        self.answers = answers
        self.calls: list[float] = []

    def status(self) -> dict[str, Any]:
        self.calls.append(time.monotonic())
        if len(self.calls) > self.answers:
            raise DaemonUnreachable("lost the daemon at /tmp/x.sock: the connection closed")
        return self.doc


class NoKeys(Terminal):
    """A terminal whose keyboard nobody touches: a read waits its whole timeout."""

    def inkey(self, timeout: float | None = None, *args: Any, **kwargs: Any) -> Keystroke:
        threading.Event().wait(timeout)
        return Keystroke("")


def test_one_status_request_a_refresh_and_a_clear_word_when_the_daemon_goes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    term = NoKeys(kind="xterm-256color", stream=io.StringIO(), force_styling=True)
    client = FakeClient(status_doc(), answers=3)
    monitor = Monitor(term, client, status_doc(), 0.2, colour=False)  # type: ignore[arg-type]
    began = time.monotonic()
    with pytest.raises(DaemonUnreachable, match=r"^vestad alpha stopped answering: lost the "):
        monitor.run()
    gaps = [b - a for a, b in zip([began, *client.calls], client.calls, strict=False)]
    assert len(client.calls) == 4 and min(gaps) >= 0.19, gaps  # once an interval, no more
    assert term.stream.getvalue().endswith(term.exit_fullscreen)  # the screen is given back


def test_the_first_changed_cell_counts_characters_and_styles() -> None:
    assert first_change([("ab", ""), ("cd", "bold")], [("abcd", "")]) == 2  # a style changed
    assert first_change([("abcdef", "")], [("abc", ""), ("x", "")]) == 3
    assert first_change([("abc", "")], [("abcdef", "")]) == 3  # longer: from the old end
    assert first_change([("ab", ""), ("c", "")], [("abc", "")]) is None
    assert first_change([], [("a", "")]) == 0


def test_a_refresh_rewrites_only_the_cells_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    out = io.StringIO()
    term = Terminal(kind="xterm-256color", stream=out, force_styling=True)
    doc = status_doc()
    monitor = Monitor(term, FakeClient(doc), doc, 1.0, colour=True)  # type: ignore[arg-type]
    monitor.view.updated = 1_700_000_000.0  # the clock in the title stands still
    monitor.draw()
    first = out.getvalue()
    assert term.clear in first and first.count(term.move_yx(23, 0)) == 1
    out.truncate(0), out.seek(0)
    monitor.draw()
    assert out.getvalue() == ""  # nothing changed: nothing written
    doc["peers"][0]["cpu_pct"] = 10.0
    monitor.draw()
    again = out.getvalue()
    assert term.clear not in again and "\x1b[2J" not in again
    assert again.count("\x1b[") < first.count("\x1b[") // 5
    assert again.startswith("\x1b[4;") and "\x1b[3;" not in again  # bravo's row only,
    assert term.move_yx(3, 0) not in again  # from its first changed cell on
    out.truncate(0), out.seek(0)
    monkeypatch.setenv("COLUMNS", "100")  # a resize: the one time the screen is cleared
    monitor.draw()
    assert out.getvalue().startswith(term.normal + term.clear)


# -- the program -----------------------------------------------------------------------------


def top_command(sock: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vesta.apps.top", "--socket", sock, *extra]


def test_without_a_daemon_it_says_so_in_one_line_and_exits_3(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    done = subprocess.run(top_command(sock), capture_output=True, text=True, env=python_env(),
                          stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 3
    assert done.stdout == ""  # the screen was never taken
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"vestatop: cannot reach vestad at {sock}")


class Tmux:
    """A tmux server of our own with one detached session, 80x24 unless told otherwise.

    The program runs from a shell that prints ``EXIT=N`` after it and stays: tmux 3.3 may leave
    a dead pane's status unread (it marks the pane dead before it reaps the process, and now and
    then never reaps it), and a dead pane's screen loses the first part of a wrapped line. The
    shell catches SIGINT with a trap, so that Ctrl-C reaches only the program (a trap, unlike an
    ignored signal, is not inherited).
    """

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"vestatop-test-{secrets.token_hex(4)}"
        self.conf = tmp_path / "tmux.conf"
        self.conf.write_text("set -g status off\nset -g history-limit 0\n")
        self.env = {k: v for k, v in python_env().items() if k != "TMUX"}
        self.socket = ""  # where the server listens, once started

    def run(self, *args: str) -> str:
        done = subprocess.run([TMUX or "tmux", "-L", self.name, "-f", str(self.conf), *args],
                              capture_output=True, text=True, env=self.env, timeout=10,
                              stdin=subprocess.DEVNULL, check=True)
        return done.stdout

    def start(self, argv: list[str], width: int = 80, height: int = 24) -> None:
        command = f"trap : INT; {shlex.join(argv)}; echo EXIT=$?; sleep 60"
        self.run("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), command)
        self.socket = self.run("display", "-p", "-t", "top", "#{socket_path}").strip()

    def screen(self, joined: bool = False) -> list[str]:
        """The pane's lines; ``joined`` joins lines the terminal wrapped."""
        return self.run("capture-pane", "-p", *["-J"] * joined, "-t", "top").splitlines()

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def wait_screen(self, predicate: Callable[[list[str]], Any], what: str,
                    timeout: float = 15) -> list[str]:
        """The screen, once ``predicate`` holds for it (bounded); shown when it never does."""
        seen: list[list[str]] = [[]]

        def check() -> Any:
            seen[0] = self.screen()
            return predicate(seen[0])

        try:
            wait_for(check, timeout=timeout, what=what)
        except pytest.fail.Exception:
            print("\n".join(seen[0]))
            raise
        return seen[0]

    def wait_exit(self, timeout: float = 10) -> int:
        """The exit status of the program, once the shell has printed it (bounded)."""
        screen = self.wait_screen(lambda s: re.search(r"EXIT=\d+", "\n".join(s)),
                                  "vestatop to exit", timeout)
        found = re.search(r"EXIT=(\d+)", "\n".join(screen))
        assert found is not None
        return int(found[1])

    def kill(self) -> None:
        """Stop the server with its programs, and remove its socket, which it leaves behind."""
        subprocess.run([TMUX or "tmux", "-L", self.name, "kill-server"], capture_output=True,
                       timeout=10, check=False)
        if self.socket:
            Path(self.socket).unlink(missing_ok=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    yield server
    server.kill()


def status(d: Daemon) -> dict[str, Any]:
    with Client(d.socket, timeout=10) as client:
        return client.status()


def trio(start: Start) -> list[Daemon]:
    """Three daemons on loopback, each seeded with the other two; the first on CPUs of its own
    where the machine has two or more, so that its stress leaves the others room to lend.

    The two lenders may share a CPU, and each counts the other's lent work as its owner's load:
    they lend up to a spill line of 100% and resume at once, and the first leaves paused parts
    where they are, so that the job stays split while the screen is read."""
    ports = [(free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)) for _ in range(3)]
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    cpus = [set(cores[:half]), set(cores[half:]) or set(cores), set(cores[half:]) or set(cores)]
    tag = secrets.token_hex(2)
    daemons = []
    for i, letter in enumerate("abc"):
        seeds = ",".join(f"127.0.0.1:{ports[j][1]}" for j in range(3) if j != i)
        lending = (("-spill-cpu-pct", "100", "-reclaim-s", "0") if i
                   else ("-pause-replace-s", "600"))
        daemons.append(start("-port", str(ports[i][0]), "-dport", str(ports[i][1]), "-seed", seeds,
                             "-advertise-spare", "200", *lending, name=f"{letter}{tag}",
                             cpus=cpus[i]))
    return daemons


def busy_and_lending(a: Daemon, *lenders: Daemon) -> bool:
    """``a`` is past its spill line, and as it sees them the lenders offer workers."""
    doc = status(a)
    offers = {p["name"]: p.get("offer_workers", 0) for p in doc["peers"]}
    return doc["node"]["cpu_pct"] >= 80 and all(offers.get(d.name, 0) > 0 for d in lenders)


NODE_ROW = re.compile(r"^[> ][* ](\S+) +\[([^\]]*)\]")


def node_rows(screen: list[str]) -> list[tuple[str, str]]:
    """(name, CPU bar) of each row of the node list on a captured screen."""
    return [(m[1], m[2]) for line in screen if (m := NODE_ROW.match(line))]


@needs_tmux
def test_live_view_of_three_nodes_with_a_stress_and_a_split_job(daemon_factory: Start,
                                                                   tmux: Tmux) -> None:
    a, b, c = trio(daemon_factory)
    names = [a.name, b.name, c.name]
    wait_for(lambda: all(sum(p["state"] == "up" for p in status(d)["peers"]) == 2
                         for d in (a, b, c)), timeout=15, what="the three nodes to link")
    tmux.start(top_command(a.socket))
    tmux.wait_screen(lambda s: {n for n, _ in node_rows(s)} == set(names), "all three nodes")
    assert a.cli("stress", "0", "10").returncode == 0
    wait_for(lambda: busy_and_lending(a, b, c), timeout=15,
             what=f"{a.name} to be busy while {b.name} and {c.name} offer workers")
    job = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", a.socket, "--json", "cpu", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env(),
        stdin=subprocess.DEVNULL, preexec_fn=sigint_as_in_a_shell)
    try:
        wait_for(lambda: status(a)["flows"], timeout=15, what="part of the job to go to a peer")
        flow = re.compile(rf"^({b.name}|{c.name}) +-> {a.name} +{a.name}-\S+ +\[#* *\] +\d+/\d+")
        screen = tmux.wait_screen(
            lambda s: any(flow.match(line) for line in s)
            and any("|" in bar for n, bar in node_rows(s) if n == a.name),
            "a flow line, and the stressed node's CPU bar showing its owner's load (|)")
        screen = lent_on_screen(tmux, a, {b.name, c.name}) or screen
        print("\n".join(screen))  # the report's sample screen (pytest -s shows it)
        assert len(screen) <= 24 and all(len(line) <= 80 for line in screen)
        assert screen[0].startswith(f" vestatop  {a.name}  3/3 up")
        check_keys(tmux, names)
    finally:
        job.send_signal(signal.SIGINT)  # cancels the job everywhere
        job.communicate(timeout=20)
        a.cli("stop-stress")
    tmux.keys("q")
    assert tmux.wait_exit() == 0


def lent_on_screen(tmux: Tmux, submitter: Daemon, lenders: set[str]) -> list[str] | None:
    """A screen where a lender's CPU bar shows lent load (``#``), or None where the lenders never
    lent more than a sliver meanwhile: lent work runs at the lowest priority, so on a machine
    that other programs keep busy it gets no CPU, and there is nothing to show. A lender that
    lent a good share while no bar ever showed it fails the test."""
    most = 0.0
    deadline = time.monotonic() + 15
    pause = threading.Event()  # never set: its wait() is the polling interval
    while time.monotonic() < deadline:
        screen = tmux.screen()
        if any("#" in bar for name, bar in node_rows(screen) if name in lenders):
            return screen
        peers = status(submitter)["peers"]
        most = max([most] + [p.get("lent_cpu_pct") or 0.0 for p in peers if p["name"] in lenders])
        pause.wait(0.05)
    assert most < 25, f"a lender lent {most:.0f}% of its CPU, yet no bar showed lent load"
    print(f"the lenders lent at most {most:.0f}% of their CPU: other programs keep it busy")
    return None


def check_keys(tmux: Tmux, names: list[str]) -> None:
    """``?`` shows the help and any key closes it; ``s`` sorts by CPU and then by lent load;
    Down selects the next node."""
    tmux.keys("?")
    tmux.wait_screen(lambda s: any("vestatop keys" in line for line in s), "the help")
    tmux.keys("x")
    tmux.wait_screen(lambda s: not any("vestatop keys" in line for line in s), "the help to close")

    def by_cpu(screen: list[str]) -> bool:
        loads = [int(m[1]) for _, bar in node_rows(screen) if (m := re.search(r"(\d+)%$", bar))]
        return "sort cpu" in screen[0] and len(loads) == 3 and loads == sorted(loads, reverse=True)

    tmux.keys("s")
    tmux.wait_screen(by_cpu, "the nodes sorted by CPU load, busiest first")
    tmux.keys("s")
    tmux.wait_screen(lambda s: "sort lent" in s[0], "the nodes sorted by lent load")
    tmux.keys("s")
    screen = tmux.wait_screen(lambda s: "sort name" in s[0], "the nodes sorted by name")
    assert [n for n, _ in node_rows(screen)] == names
    assert any(line.startswith(f">*{names[0]} ") for line in screen)  # this node, selected
    tmux.keys("Down")
    tmux.wait_screen(lambda s: any(line.startswith(f"> {names[1]} ") for line in s)
                     and any(line.startswith(f"-- {names[1]} (peer)") for line in s),
                     "the second node selected, its details shown")


@needs_tmux
def test_it_follows_a_resize_and_ctrl_c_quits(daemon: Daemon, tmux: Tmux) -> None:
    tmux.start(top_command(daemon.socket))
    tmux.wait_screen(lambda s: s and s[0].rstrip().endswith("q quit") and len(s[0]) == 79,
                     "the 80-column screen")
    tmux.run("resize-window", "-t", "top", "-x", "120", "-y", "40")
    screen = tmux.wait_screen(lambda s: len(s[0]) == 119 and "VER" in s[1], "the 120x40 screen")
    assert len(screen) == 40
    tmux.run("resize-window", "-t", "top", "-x", "60", "-y", "12")
    screen = tmux.wait_screen(lambda s: len(s[0]) == 59 and "POWER" not in s[1],
                              "the 60x12 screen")
    assert screen[0].startswith(f" vestatop  {daemon.name}") and len(screen) == 12
    tmux.keys("C-c")
    assert tmux.wait_exit() == 0


@needs_tmux
def test_when_the_daemon_stops_it_leaves_the_screen_and_exits_3(daemon: Daemon,
                                                                  tmux: Tmux) -> None:
    tmux.start(top_command(daemon.socket))
    tmux.wait_screen(lambda s: s and s[0].startswith(f" vestatop  {daemon.name}"), "the screen")
    assert daemon.stop() == 0
    assert tmux.wait_exit() == 3
    text = "\n".join(line.rstrip() for line in tmux.screen(joined=True)).strip()
    assert text.startswith(f"vestatop: vestad {daemon.name} stopped answering: lost the daemon "
                           f"at {daemon.socket}")
    assert text.endswith("EXIT=3")
    assert "Traceback" not in text and "vestatop  " not in text  # the full screen is gone
