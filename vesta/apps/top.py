"""vestatop: a live, full-screen view of every node of a vesta federation.

Usage:
  vestatop [options]
  vestatop (-h | --help)
  vestatop --version

Shows this node and each of its peers: CPU load split into the owner's own load and the load of
work lent to peers, memory, the cores offered, power mode and willingness, temperature, version,
state and the ledger balance; the work flowing between nodes; and the recent events.

Keys:
  q, Ctrl-C  quit
  ?          show the keys (any key closes the help)
  s          sort the nodes by name, by CPU load or by lent load
  Up, Down   select a node: its every field shows below the list

Options:
  --node=<NAME>      the daemon of node NAME (else $VESTA_NODE, else the only one running)
  --socket=<PATH>    the daemon on this control socket (else $VESTA_SOCKET)
  --interval=<SECS>  seconds between refreshes, 0.1 to 60 [default: 1]
  --debug            show tracebacks on errors
  -h --help          show this help
  --version          show the version

Exit status: 0 quit, 2 usage error or no terminal, 3 no daemon to talk to, or it stopped answering.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from docopt import DocoptExit, docopt

from vesta import __version__, exits
from vesta.apps import Interrupted, signals_interrupt
from vesta.client import Client, DaemonUnreachable, UsageError, VestaError, find_socket
from vesta.names import sanitize_name

_USAGE = __doc__ or ""

#: The orders ``s`` cycles through: by name, by total CPU load, by the load lent to peers.
SORTS = ("name", "cpu", "lent")
#: Seconds a status request may take before the daemon counts as gone.
STATUS_TIMEOUT = 5.0
#: Seconds between looks at the keyboard and the terminal's size, so that keys and resizes show
#: at once while the daemon is asked only once a refresh.
SLICE = 0.1

#: A run of text and the names of its styles, space separated ("" for plain).
Seg = tuple[str, str]
#: One screen line as runs of styled text; painted into a string at the very end.
Row = list[Seg]


# -- the model -------------------------------------------------------------------------------------


@dataclass
class View:
    """What the person at the keyboard chose: kept across refreshes, changed only by keys."""

    sort: str = "name"
    selected: str = ""  # fingerprint of the selected node; "" is this node
    help: bool = False
    updated: float = 0.0  # when the status shown was read (seconds since the epoch)


@dataclass(frozen=True)
class Palette:
    """The terminal sequences of each style name; empty everywhere for plain text."""

    styles: Mapping[str, str] = field(default_factory=dict)
    normal: str = ""


PLAIN = Palette()


def palette_for(term: Any, colour: bool) -> Palette:
    """The styles of a blessed terminal. Without colour only bold and reverse video are used, so
    that a monochrome terminal still shows the title, the headings and the selected node; the bars
    are readable from their characters alone."""
    styles = {"title": term.reverse, "sel": term.reverse, "head": term.bold, "bad": term.bold,
              "key": term.bold}
    if colour:
        styles.update(owner=term.green, lent=term.cyan, mem=term.yellow, good=term.green,
                      warn=term.yellow, bad=term.bold_red, flow=term.cyan)
    return Palette(styles, term.normal)


def wants_colour(term: Any, env: Mapping[str, str]) -> bool:
    """Colour only where the terminal has 8 colours or more, TERM is not ``dumb`` and the person
    did not ask for none (NO_COLOR, https://no-color.org)."""
    return (term.number_of_colors >= 8 and env.get("TERM", "") != "dumb"
            and not env.get("NO_COLOR"))


def nodes_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a status document: this one (marked ``here``), then its peers."""
    return [{**doc["node"], "here": True}] + [dict(p, here=False) for p in doc.get("peers", [])]


def node_order(doc: dict[str, Any], sort: str) -> list[dict[str, Any]]:
    """The nodes in the order the list shows them: by name, or busiest first by total CPU load or
    by the load lent to peers (nodes that told no load last, then by name)."""
    def key(n: dict[str, Any]) -> tuple[float, str, str]:
        load = {"cpu": n.get("cpu_pct"), "lent": n.get("lent_cpu_pct")}.get(sort, 0.0)
        return (-(load if load is not None else -1.0), n.get("name", ""), n["fingerprint"])
    return sorted(nodes_of(doc), key=key)


def selected_index(order: list[dict[str, Any]], view: View) -> int:
    """Where the selected node is in ``order``: this node while none (or a gone one) is chosen."""
    for i, n in enumerate(order):
        if n["fingerprint"] == view.selected:
            return i
    return next((i for i, n in enumerate(order) if n["here"]), 0)


def move_selection(view: View, doc: dict[str, Any], step: int) -> None:
    """Select the node ``step`` rows below (or above) the selected one, stopping at the ends."""
    order = node_order(doc, view.sort)
    i = max(0, min(len(order) - 1, selected_index(order, view) + step))
    view.selected = order[i]["fingerprint"]


def next_sort(view: View) -> None:
    """The next order of the node list: name, then CPU load, then lent load, then name again."""
    view.sort = SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)]


# -- rendering: pure functions of (status, width, height, view) ------------------------------------


def render(doc: dict[str, Any], width: int, height: int, view: View,
           palette: Palette = PLAIN) -> list[str]:
    """The screen as at most ``height`` lines of at most ``width`` columns each, painted with
    ``palette``: what the monitor paints, cell by cell, from :func:`layout`'s rows. Pure."""
    return [paint(row, palette) for row in layout(doc, width, height, view)]


def layout(doc: dict[str, Any], width: int, height: int, view: View) -> list[Row]:
    """The screen as styled rows. Sections give way to one another when the terminal is short:
    the node list first, then the flows, the selected node's details, and the events take what is
    left. The bottom-right cell stays empty, so that no terminal scrolls."""
    if width < 1 or height < 1:
        return []
    order = node_order(doc, view.sort)
    sel = selected_index(order, view)
    ledger = doc.get("ledger", {})
    table = node_table(order, sel, ledger, width)
    detail = detail_pane(order[sel], ledger, width)
    flows = flow_section(doc.get("flows", []), width)
    events = event_section(doc.get("events", []), width)
    room = height - 1
    n_table = _fit(len(table), max(2, room // 2) if room > 3 else room)
    room -= n_table
    n_flows = _fit(len(flows), min(room, 6))
    room -= n_flows
    n_detail = _fit(len(detail), min(room - min(3, len(events)), 9))
    room -= n_detail
    n_events = _fit(len(events), room)
    rows = [title_row(doc, order, view, width)]
    rows += _window(table, n_table, sel + 1)
    rows += detail[:n_detail] + flows[:n_flows] + events[:n_events]
    if view.help:
        rows = overlay_help(rows, width, height)
    rows = [_clip(row, width) for row in rows[:height]]
    if len(rows) == height:
        rows[-1] = _clip(rows[-1], width - 1)
    return rows


def _fit(want: int, room: int) -> int:
    """How many of a section's ``want`` rows to show in ``room``: none rather than a lone
    heading cut from its content."""
    n = min(want, max(0, room))
    return n if n >= min(want, 2) else 0


def _window(table: list[Row], n: int, keep: int) -> list[Row]:
    """The heading of ``table`` and as many of its rows as fit in ``n``, scrolled so that row
    ``keep`` shows."""
    if n <= 0:
        return []
    body = n - 1
    start = max(1, keep - body + 1) if keep > body else 1
    return table[:1] + table[start:start + body]


def title_row(doc: dict[str, Any], order: list[dict[str, Any]], view: View, width: int) -> Row:
    """The top line in reverse video: this node, how many nodes are up, jobs and flows, the sort
    order and the time of the status shown (its ticking says the view is live); the keys at the
    right. Pieces drop out, the least useful first, when the terminal is narrow."""
    here = doc["node"]
    up = sum(1 for n in order if n.get("state", "up") == "up")
    flows, jobs = len(doc.get("flows", [])), len(doc.get("jobs", []))
    clock = time.strftime("%H:%M:%S", time.localtime(view.updated)) if view.updated else ""
    parts = {"node": f"vestatop  {here.get('name', '?')}", "up": f"{up}/{len(order)} up",
             "jobs": _count(jobs, "job"), "flows": _count(flows, "flow"),
             "sort": f"sort {view.sort}", "clock": clock}
    right = "? help  q quit "
    for drop in (None, "jobs", "flows", "clock", "sort", "up"):
        parts.pop(drop or "", None)
        left = " " + "  ".join(p for p in parts.values() if p)
        if len(left) + len(right) < width:
            break
    return _pad([(left.ljust(width - len(right)) + right, "title")], width, "title")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


# the node list: one row a node

#: Columns of the node list: (name, heading, width); a width of 0 stretches (the two bars).
_COLUMNS = [
    ("mark", "", 2), ("name", "NODE", 9), ("cpu", "CPU |own #lent", 0),
    ("mem", "MEM in use", 0), ("cores", "CORES", 5), ("power", "POWER", 10),
    ("temp", "TEMP", 4), ("ver", "VER", 3), ("state", "STATE", 8), ("balance", "LEDGER", 7),
]
#: Columns left out, in this order, while the bars would be narrower than these minimums.
_DROP = ("ver", "temp", "power", "balance", "cores", "mem")
_MIN_CPU, _MIN_MEM = 15, 13


def columns_for(width: int) -> list[tuple[str, str, int]]:
    """The columns that fit ``width``, the two bars sharing what the others leave (CPU the
    larger part)."""
    cols = list(_COLUMNS)
    for drop in (None, *_DROP):
        cols = [c for c in cols if c[0] != drop]
        fixed = sum(w for _, _, w in cols) + len(cols) - 2  # a space before each but the name
        bars = width - fixed
        minimum = _MIN_CPU + (_MIN_MEM if any(c[0] == "mem" for c in cols) else 0)
        if bars >= minimum:
            break
    has_mem = any(c[0] == "mem" for c in cols)
    mem = max(_MIN_MEM, bars * 9 // 20) if has_mem else 0
    cpu = max(_MIN_CPU, bars - mem - has_mem)
    return [(n, h, {"cpu": cpu, "mem": mem}.get(n, w)) for n, h, w in cols]


def node_table(order: list[dict[str, Any]], sel: int, ledger: dict[str, Any],
               width: int) -> list[Row]:
    """The heading and one row per node; the selected row in reverse video, marked ``>``, and
    this node marked ``*`` for terminals without reverse video."""
    cols = columns_for(width)
    heading: Row = []
    for name, head, w in cols:
        heading += [(("" if name in ("mark", "name") else " ") + _fix(head, w), "head")]
    rows = [heading]
    for i, node in enumerate(order):
        cells = node_cells(node, i == sel, _balance(node, ledger), {n: w for n, _, w in cols})
        row: Row = []
        for name, _, _w in cols:
            row += ([] if name in ("mark", "name") else [(" ", "")]) + cells[name]
        if i == sel:
            row = _pad([(text, f"{style} sel".strip()) for text, style in row], width, "sel")
        rows.append(row)
    return rows


def node_cells(node: dict[str, Any], selected: bool, balance: float | None,
               widths: dict[str, int]) -> dict[str, Row]:
    """The cells of one node's row, each exactly its column's width."""
    known = node.get("cpu_pct") is not None  # a node refused at the handshake told us little
    state = _state(node)
    cells: dict[str, Row] = {
        "mark": [((">" if selected else " ") + ("*" if node["here"] else " "), "key")],
        "name": [(_fix(node.get("name", node["fingerprint"][:8]), widths["name"]), "")],
        "state": [(_fix(state, widths.get("state", 0)), _STATE_STYLE.get(state, ""))],
    }
    if "cpu" in widths:
        cells["cpu"] = cpu_bar(node, widths["cpu"]) if known else _no_bar(widths["cpu"])
    if "mem" in widths:
        cells["mem"] = mem_bar(node, widths["mem"]) if known else _no_bar(widths["mem"])
    texts = {
        "cores": (f"{node['offer_workers']}/{node['cores']}" if known else "-", ">"),
        "power": (_power(node) if known else "-", "<"),
        "temp": (f"{node['temp_c']:.0f}C" if node.get("temp_c") is not None else "", ">"),
        "ver": (f"v{node['version']}" if node.get("version") is not None else "", ">"),
        "balance": ("" if node["here"] else _signed(balance), ">"),
    }
    for name, (text, align) in texts.items():
        if name in widths:
            w = widths[name]
            cells[name] = [(_fix(text, w) if align == "<" else text[:w].rjust(w), "")]
    return cells


_STATE_STYLE = {"paused": "warn", "leaving": "bad", "incompat": "bad", "seen": "warn"}


def _state(node: dict[str, Any]) -> str:
    state = node.get("state", "up")
    if state == "up" and node.get("paused"):
        return "paused"
    return "incompat" if state == "incompatible" else state


def _power(node: dict[str, Any]) -> str:
    mode = {"battery": "batt"}.get(node.get("power", "?"), node.get("power", "?"))
    willing = node.get("willingness")
    return f"{mode} {willing:.0%}" if willing is not None else mode


def _balance(node: dict[str, Any], ledger: dict[str, Any]) -> float | None:
    """Core-seconds this node lent the peer minus those it borrowed from it, from the ledger
    (else from the peer's own lent and borrowed figures); None where there is no account."""
    entry = ledger.get(node["fingerprint"]) or node
    if "lent" not in entry and "borrowed" not in entry:
        return None
    return float(entry.get("lent", 0.0)) - float(entry.get("borrowed", 0.0))


def _signed(value: float | None) -> str:
    """A balance in at most 6 characters: +12.5, -340, +12k."""
    if value is None:
        return ""
    if abs(value) < 100:
        return f"{value:+.1f}"
    if abs(value) < 10_000:
        return f"{value:+.0f}"
    return f"{value / 1000:+.0f}k"


def cpu_bar(node: dict[str, Any], width: int) -> Row:
    """The CPU load as a bar: ``|`` for the owner's own load, ``#`` for work lent to peers, ``.``
    for the rest (the daemon itself, and work at a lowered priority that is neither, as the node
    counts it), and the total in figures at its right end."""
    lent = float(node.get("lent_cpu_pct") or 0.0)
    total = float(node.get("cpu_pct") or 0.0)
    owner = node.get("owner_cpu_pct")
    owner = max(0.0, total - lent) if owner is None else float(owner)
    rest = max(0.0, total - owner - lent)
    return bar(width, [(owner, "|", "owner"), (lent, "#", "lent"), (rest, ".", "")],
               [f"{total:.0f}%"])


def mem_bar(node: dict[str, Any], width: int) -> Row:
    """Memory in use as a bar of ``|``, with used and total in figures; only what is free where
    the node does not tell its total."""
    free = node.get("mem_available_mb")
    total = node.get("mem_total_mb")
    if free is None:
        return _no_bar(width)
    if not total:
        return bar(width, [], [f"{_mib(free)} free", _mib(free)])
    used = max(0, total - free)
    both = (f"{_mib(used)}/{_mib(total)}" if total < 1024
            else f"{_gib(used)}/{_gib(total)}G")  # in one unit: 0.8/23.5G
    return bar(width, [(100.0 * used / total, "|", "mem")],
               [both, _mib(used), f"{100 * used // total}%"])


def _mib(mb: float) -> str:
    """A size in MiB, short: 512M, 3.2G, 24G."""
    return f"{mb:.0f}M" if mb < 1024 else f"{_gib(mb)}G"


def _gib(mb: float) -> str:
    gib = mb / 1024
    return f"{gib:.1f}" if gib < 100 else f"{gib:.0f}"


def _no_bar(width: int) -> Row:
    return bar(width, [], ["?"])


def bar(width: int, parts: list[tuple[float, str, str]], labels: list[str]) -> Row:
    """A meter ``[|||##    42%]`` of ``width`` columns: each part a percentage drawn with its own
    character and style, then the first of ``labels`` that leaves a third of the meter to the bar
    written over its right end."""
    inner = max(0, width - 2)
    cells: list[Seg] = []
    for pct, char, style in parts:
        n = min(inner - len(cells), max(0, round(pct / 100 * inner)))
        cells += [(char, style)] * n
    cells += [(" ", "")] * (inner - len(cells))
    label = next((text for text in labels if len(text) <= max(4, inner * 2 // 3)), "")
    for i, char in enumerate(label):
        cells[inner - len(label) + i] = (char, "")
    return [("[", ""), *_merge(cells), ("]", "")]


def _merge(cells: list[Seg]) -> Row:
    """Neighbouring runs of one style joined, so that painting emits few sequences."""
    row: Row = []
    for text, style in cells:
        if row and row[-1][1] == style:
            row[-1] = (row[-1][0] + text, style)
        else:
            row.append((text, style))
    return row


# the selected node in full


#: Fields the detail pane writes out in words; it lists every other field by name.
_DESCRIBED = {
    "name", "fingerprint", "address", "version", "state", "reason", "cores", "cpu_pct",
    "owner_cpu_pct", "lent_cpu_pct", "offer_workers", "offer_mem_mb", "mem_available_mb",
    "mem_total_mb", "power", "willingness", "battery_pct", "temp_c", "temps_c", "paused", "here",
    "lent", "borrowed", "workers_busy", "workers", "queued", "stress", "last_seen_s",
}


def detail_pane(node: dict[str, Any], ledger: dict[str, Any], width: int) -> list[Row]:
    """The selected node: a heading, then its every field and its ledger line, wrapped to the
    width."""
    name = node.get("name", node["fingerprint"][:8])
    rows = [_rule(f"{name} ({'this node' if node['here'] else 'peer'})  fingerprint "
                  f"{node['fingerprint']}", width)]
    for text in detail_lines(node, ledger):
        rows += [[(line, "")] for line in _wrap(text, width)]
    return rows


def detail_lines(node: dict[str, Any], ledger: dict[str, Any]) -> list[str]:
    """A node's fields in sentences, the ones vestatop does not describe listed as they are."""
    n = node
    state = n.get("state", "up") + (f": {n['reason']}" if n.get("reason") else "")
    seen = "" if n["here"] else f", seen {n.get('last_seen_s', 0.0):.1f} s ago"
    lines = [f"address {n.get('address', '?')}  version {n.get('version', '?')}  {state}{seen}"]
    if n.get("cpu_pct") is not None:
        lines += _load_lines(n)
    if n.get("paused"):
        lines.append(f"paused for its owner: {n['paused']}")
    if n["here"] and "workers" in n:
        stress = n.get("stress")
        lines.append(f"workers {n['workers_busy']}/{n['workers']} busy, {n['queued']} queued"
                     + (f"; stress on {_count(stress['cores'], 'core')}, "
                        f"{stress['seconds_left']:.0f} s left" if stress else ""))
    lines.append(ledger_line(n, ledger))
    rest = [f"{k} {_plain(v)}" for k, v in sorted(n.items()) if k not in _DESCRIBED]
    if rest:
        lines.append("also: " + ", ".join(rest))
    return lines


def _load_lines(n: dict[str, Any]) -> list[str]:
    """What a node that told its figures says about its CPU, memory, power and heat."""
    battery = n.get("battery_pct")
    temps = ", ".join(f"{k} {v:.0f}C" for k, v in (n.get("temps_c") or {}).items())
    return [
        f"cpu {n['cpu_pct']:.1f}% of {_count(n['cores'], 'core')}: owner "
        f"{n.get('owner_cpu_pct', 0):.1f}%, lent {n.get('lent_cpu_pct', 0):.1f}%; offers "
        f"{_count(n['offer_workers'], 'worker')}, {n['offer_mem_mb']} MiB",
        f"memory {n['mem_available_mb']}/{n.get('mem_total_mb', '?')} MiB free; power "
        f"{n['power']}, willing {n.get('willingness', 0):.0%}"
        + (f", battery {battery:.0f}%" if battery is not None else "")
        + f"; temp {temps or 'unknown'}",
    ]


def ledger_line(node: dict[str, Any], ledger: dict[str, Any]) -> str:
    """The ledger's account of a peer in core-seconds, or this node's totals over all peers."""
    if node["here"]:
        lent = sum(e.get("lent", 0.0) for e in ledger.values())
        borrowed = sum(e.get("borrowed", 0.0) for e in ledger.values())
        return (f"ledger: lent {lent:.1f} core-s to peers, borrowed {borrowed:.1f} core-s "
                f"({len(ledger)} account{'s' * (len(ledger) != 1)})")
    entry = ledger.get(node["fingerprint"])
    if entry is None:
        return "ledger: no account yet"
    cap = f"; its cap here {entry['cap']:.0f}" if "cap" in entry else ""
    return (f"ledger: lent it {entry.get('lent', 0.0):.1f} core-s, borrowed "
            f"{entry.get('borrowed', 0.0):.1f}{cap}; MiB-s lent "
            f"{entry.get('lent_mib_s', 0.0):.0f}, borrowed {entry.get('borrowed_mib_s', 0.0):.0f}")


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(_plain(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` cut at spaces into lines of ``width``, continuation lines indented."""
    import textwrap  # only the detail pane needs it

    return textwrap.wrap(text, max(8, width), subsequent_indent="  ", break_on_hyphens=False) or [
        ""]


# flows and events


def flow_section(flows: list[dict[str, Any]], width: int) -> list[Row]:
    """The parts running on other nodes: which node lends to which, for what job, how far."""
    rows = [_rule(f"flows: {len(flows) or 'none'}  lender -> borrower", width)]
    bar_width = max(6, width - 69)  # the rest of a row: names, job, figures and " paused"
    for f in flows:
        units = max(1, int(f.get("units", 1)))
        done = int(f.get("units_done", 0))
        pct = 100 * done / units
        row: Row = [
            (f"{_fix(f.get('to', '?'), 9)} -> {_fix(f.get('from', '?'), 9)} ", "flow"),
            (_fix(f.get("job_id", "?"), 13) + " ", ""),
            *bar(bar_width, [(pct, "#", "lent")], []),
            (f" {done:>4}/{units:<4}{pct:4.0f}% {f.get('rate', 0.0):5.2f} u/s", ""),
        ]
        if f.get("paused"):
            row.append((" paused", "warn"))
        rows.append(row)
    return rows


_EVENT_STYLE = {"join": "good", "resume": "good", "leave": "bad", "refusal": "bad",
                "failover": "bad", "incompatible": "bad", "pause": "warn", "straggler": "warn",
                "suspend": "warn"}


def event_section(events: list[dict[str, Any]], width: int) -> list[Row]:
    """The recent events, newest first, one line each."""
    rows = [_rule(f"events: {len(events) or 'none yet'}", width)]
    for e in reversed(events):
        at = time.strftime("%H:%M:%S", time.localtime(e.get("at", 0)))
        kind = str(e.get("kind", "?"))
        rows.append([(at + " ", ""), (_fix(kind, 9), _EVENT_STYLE.get(kind, "")),
                     (f" {_fix(str(e.get('node', '')), 9)} {e.get('detail', '')}", "")])
    return rows


# the help overlay

HELP = [
    "vestatop keys",
    "",
    "q  Ctrl-C   quit",
    "?           this help",
    "s           sort nodes: name, cpu, lent",
    "Up  Down    select a node (details below)",
    "",
    "CPU bar   | owner's own load  # lent load",
    "          . the rest (daemon, niced work)",
    "MEM bar   | memory in use",
    "CORES     offered / all cores",
    "LEDGER    core-s lent to it minus",
    "          core-s borrowed from it",
    "*         this node   > selected",
    "",
    "any key closes this help",
]


def overlay_help(rows: list[Row], width: int, height: int) -> list[Row]:
    """The help box drawn over the middle of the screen."""
    inner = max(len(line) for line in HELP) + 2
    box = [[("+" + "-" * inner + "+", "title")]]
    box += [[("|", "title"), (" " + _fix(line, inner - 1), "key" if not i else ""),
             ("|", "title")] for i, line in enumerate(HELP)]
    box += [[("+" + "-" * inner + "+", "title")]]
    rows = rows + [[] for _ in range(height - len(rows))]
    top = max(0, (height - len(box)) // 2)
    left = max(0, (width - inner - 2) // 2)
    for i, line in enumerate(box[:height]):
        target = _pad(rows[top + i], left + inner + 2, "")
        rows[top + i] = _slice(target, 0, left) + line + _slice(target, left + inner + 2, width)
    return rows


# rows of styled runs


def _rule(title: str, width: int) -> Row:
    text = f"-- {title} "
    return [(text + "-" * max(0, width - len(text)), "head")]


def _fix(text: str, width: int) -> str:
    """``text`` in exactly ``width`` columns: padded, or cut with a ``~`` at the cut."""
    if len(text) <= width:
        return text.ljust(width)
    return text[:max(0, width - 1)] + "~" if width > 0 else ""


def _width(row: Row) -> int:
    return sum(len(text) for text, _ in row)


def _pad(row: Row, width: int, style: str) -> Row:
    """``row`` filled with spaces of ``style`` to ``width`` columns."""
    short = width - _width(row)
    return [*row, (" " * short, style)] if short > 0 else row


def _slice(row: Row, start: int, end: int) -> Row:
    """The columns [start, end) of ``row``."""
    out: Row = []
    at = 0
    for text, style in row:
        lo, hi = max(start, at), min(end, at + len(text))
        if lo < hi:
            out.append((text[lo - at:hi - at], style))
        at += len(text)
    return out


_CONTROL = {c: "?" for c in [*range(32), *range(127, 160)]}


def _clip(row: Row, width: int) -> Row:
    """``row`` cut to ``width`` columns, with control characters (from a peer's text, say)
    shown as ``?`` so that nothing in a status document can move the cursor."""
    return [(text.translate(_CONTROL), style) for text, style in _slice(row, 0, max(0, width))]


def first_change(old: Row, new: Row) -> int | None:
    """The first column where ``new`` differs from ``old`` in a character or its style (the
    end of the shorter, where one is longer); None where they are the same."""
    cells_old = [(c, style) for text, style in old for c in text]
    cells_new = [(c, style) for text, style in new for c in text]
    if cells_old == cells_new:
        return None
    at = 0
    for a, b in zip(cells_old, cells_new, strict=False):
        if a != b:
            break
        at += 1
    return at


def paint(row: Row, palette: Palette) -> str:
    """One row as a string: each styled run between its sequences and the terminal's normal."""
    out = []
    for text, style in row:
        codes = "".join(palette.styles.get(name, "") for name in style.split())
        out.append(f"{codes}{text}{palette.normal}" if codes else text)
    return "".join(out)


# -- the terminal loop -----------------------------------------------------------------------------


class Monitor:
    """The thin loop around :func:`layout`: asks the daemon for its status once a refresh on one
    connection, reads keys, and writes to the terminal only the cells that changed."""

    def __init__(self, term: Any, client: Client, doc: dict[str, Any], interval: float,
                 colour: bool) -> None:
        self.term = term
        self.client = client
        self.doc = doc
        self.interval = interval
        self.palette = palette_for(term, colour)
        self.view = View(updated=time.time())
        self.shown: list[Row] = []  # the rows on the screen now
        self.size = (0, 0)

    def run(self) -> int:
        """Show the federation until ``q`` or Ctrl-C (0), or until the daemon stops answering
        (:class:`DaemonUnreachable`, raised once the screen is restored)."""
        term = self.term
        name = self.doc["node"].get("name", "?")
        try:
            with signals_interrupt(), term.fullscreen(), term.cbreak(), term.keypad(), \
                    term.hidden_cursor():
                self.loop()
        except DaemonUnreachable as exc:
            raise DaemonUnreachable(f"vestad {name} stopped answering: {exc}") from None
        except Interrupted as exc:
            return exits.killed_by(exc.signum)
        except KeyboardInterrupt:
            pass
        except OSError:  # the terminal went away (its window closed): nobody is left to tell
            return exits.FAILED
        return exits.OK

    def loop(self) -> None:
        """Look at the keys and the terminal's size every :data:`SLICE` seconds, and ask the
        daemon for its status once every interval."""
        due = time.monotonic() + self.interval
        self.draw()
        while True:
            key = self.term.inkey(timeout=max(0.0, min(SLICE, due - time.monotonic())))
            if key and not self.press(key):
                return
            if time.monotonic() >= due:
                self.doc = self.client.status()
                self.view.updated = time.time()
                due = time.monotonic() + self.interval
            self.draw()

    def press(self, key: Any) -> bool:
        """Act on a key; False to quit."""
        view = self.view
        if view.help:  # any key closes the help
            view.help = False
        elif key in ("q", "Q", "\x03"):  # Ctrl-C comes as a key where it raises no SIGINT
            return False
        elif key == "?":
            view.help = True
        elif key == "s":
            next_sort(view)
        elif key.name in ("KEY_UP", "KEY_DOWN"):
            move_selection(view, self.doc, -1 if key.name == "KEY_UP" else 1)
        return True

    def draw(self) -> None:
        """Write the cells of the new frame that differ from those on the screen: on each line
        that changed, from its first changed cell on; clear the whole screen only when its size
        changed."""
        term = self.term
        size = (term.width, term.height)
        out = []
        if size != self.size:
            self.size, self.shown = size, []
            out.append(term.normal + term.clear)
        width, height = size
        rows = layout(self.doc, width, height, self.view)  # clipped to the width
        for y, row in enumerate(rows):
            old = self.shown[y] if y < len(self.shown) else []
            start = first_change(old, row)
            if start is None:
                continue
            # clearing the rest of a full line would erase its last column: the cursor stays there
            shorter = not old or _width(row) < _width(old)  # what was there must go
            tail = term.clear_eol if shorter and _width(row) < width else ""
            out.append(term.move_yx(y, start) + paint(_slice(row, start, width), self.palette)
                       + tail)
        out += [term.move_yx(y, 0) + term.clear_eol for y in range(len(rows), len(self.shown))]
        self.shown = rows
        if out:
            term.stream.write("".join(out))
            term.stream.flush()


def _interval(text: str) -> float:
    """The refresh interval of --interval: at least 0.1 s, so as not to keep the daemon busy."""
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"--interval must be a number of seconds, not {text!r}") from None
    if not 0.1 <= seconds <= 60:
        raise UsageError(f"--interval must be from 0.1 to 60 seconds, not {text}")
    return seconds


def start(args: dict[str, Any]) -> int:
    """Reach the daemon first (no daemon: exit 3 before the screen is touched), then take the
    terminal."""
    interval = _interval(args["--interval"])
    node = sanitize_name(args["--node"]) if args["--node"] else None
    client = Client(find_socket(node, args["--socket"]), timeout=STATUS_TIMEOUT)
    with client:
        doc = client.status()
        from blessed import Terminal  # only once a daemon answers: it costs start-up time

        term = Terminal()
        if not (term.is_a_tty and sys.stdin.isatty()):  # its screen and its keyboard
            raise UsageError("vestatop needs a terminal; for a one-off view run: vesta status")
        return Monitor(term, client, doc, interval, wants_colour(term, os.environ)).run()


def main(argv: list[str] | None = None) -> int:
    """``vestatop``: errors are one sentence on stderr and an exit status, as ``vesta``'s are."""
    words = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(_USAGE, argv=words, version=f"vestatop {__version__}")
    except DocoptExit:  # docopt exits 1 on a usage error; the contract says 2
        print(f"vestatop: those arguments do not fit\n\n{_USAGE.split(chr(10) * 2)[1]}",
              file=sys.stderr)
        return exits.USAGE
    try:
        return start(args)
    except VestaError as exc:
        if args["--debug"]:
            raise
        print(f"vestatop: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return exits.OK


if __name__ == "__main__":
    sys.exit(main())
