"""A cpu job split over a pool of daemons: how much faster two nodes are than one, beside what a
plain ``multiprocessing`` split gains on the same cores; how close a pool whose nodes differ in
speed comes to the sum of their rates; how soon the units of a node that goes away mid-job
(SIGKILL, as in a crash, or SIGTERM, as when its owner stops it) are handed to the other; and
how soon a lender stops the work it runs for a peer when its owner starts a program.

Every daemon here is pinned to one core: a, and a lone daemon for one-node runs, to core 0; b to
core 1, so the two nodes of a split never share a core and a one-node run has a core to itself.
Jobs are submitted with vesta's Python client; a job's time is the ``seconds`` of its result,
from its first chunk's start to its last one's end. Each split's digest must be the one-node
run's.

A daemon takes part in a split only while it reads its own cores below its spill line, lends
nothing while its last reading of its owner's load (all but the work it lends) is at or over
that line, and, where it pauses lent work for its owner, resumes only after ``-reclaim-s``
seconds of calm (10 by default). The owner's load on a core here is the bench's own: the
one-node runs and the plain loop on the same cores, and a daemon's start. So every split is
submitted once both nodes read their cores idle and the submitter sees its peer offer workers;
and where vestad has ``-reclaim-s``, every daemon that lends here has it at 0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
from harness import (
    UNITS_PER_MILLION,
    VESTAD,
    BenchError,
    Daemon,
    Daemons,
    Load,
    Row,
    calibrate,
    clean_env,
    linked,
    plain_cpu,
    ratios,
    remove_cgroup,
    say,
)

from vesta.client import Client
from vesta.messages import CpuJob, JobDone, JobProgress, JobStarted, MemJob
from vesta.workers import supervisor

TARGET_SPLIT_RATIO = 0.55
TARGET_SPLIT_OF_CEILING = 0.95
TARGET_UNEVEN_RATIO = 1.10
TARGET_KILL_RELEASE_S = 3.0
TARGET_TERM_RELEASE_S = 0.5

#: Seconds the split measurement's job takes on one core.
SPLIT_JOB_SECONDS = 6.0
#: Seconds the job of the uneven pool and of the failovers takes on one core.
SMALL_JOB_SECONDS = 3.0
#: The smallest ``cpu N`` that vestad splits (vesta.policy.SPLIT_MIN_UNITS units): every job
#: with ``--quick``.
MIN_SPLIT_N = 4
#: The seed of every job here.
SEED = 1
#: Rounds of every part with ``--quick``; else the split takes ``--rounds``, the uneven pool and
#: the failovers half as many, at least 3.
QUICK_ROUNDS = 2

#: The slow node's cgroup lets its processes run 50 ms of every 100 ms: half a core.
HALF_QUOTA_US = 50_000
PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Seconds to wait for the processes of the slow node's cgroup to be gone before removing it.
CGROUP_REMOVE_TIMEOUT = 10.0

#: A daemon below vestad's spill line (80 %) takes part in a split; one is submitted a job once
#: it reads its core below this (it reads once a second).
SETTLED_CPU_PCT = 50.0
SETTLE_TIMEOUT = 60.0
LINK_TIMEOUT = 20.0
#: Tries of a split (or a warm-up job) that a node sat out: another program's load on its core
#: can make it refuse work in the moment between the look at its reading and the job.
TRIES = 3
#: Chunks handed to b before it is stopped mid-job: its first, which measures its rate, and the
#: first sized by that rate.
CHUNKS_BEFORE_STOP = 2


def _wait(what: str, timeout: float, ready: Callable[[], bool], step: float = 0.05) -> float:
    """Wait until ``ready``; returns the seconds waited."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() > t0 + timeout:
            raise BenchError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(step)
    return time.monotonic() - t0


@functools.cache
def lender_flags() -> tuple[str, ...]:
    """``-reclaim-s 0`` where vestad has that option (see above), else nothing."""
    usage = subprocess.run([str(VESTAD), "--help"], capture_output=True, text=True,
                           env=clean_env(), check=False).stdout
    return ("-reclaim-s", "0") if "-reclaim-s" in usage else ()


def offers(d: Daemon, peer: Daemon) -> bool:
    """Whether ``d`` lists ``peer`` up and offering workers (not paused for its owner)."""
    return any(p["name"] == peer.name and p["state"] == "up" and p.get("offer_workers", 0) > 0
               and not p.get("paused") for p in d.peers())


def idle(d: Daemon) -> bool:
    return float(d.status()["node"]["cpu_pct"]) < SETTLED_CPU_PCT


def settle(d: Daemon, peer: Daemon | None = None) -> float:
    """Wait until ``d`` reads its cores idle enough to take part in a split and, with ``peer``,
    until ``peer`` does too (a lender refuses work while its last reading of its owner's load is
    over the spill line) and ``d`` sees it offer workers; the seconds waited."""
    try:
        return _wait(f"vestad {d.name}" + (f" and {peer.name}" if peer else "")
                     + " to read their cores idle", SETTLE_TIMEOUT,
                     lambda: idle(d) and (peer is None or (idle(peer) and offers(d, peer))))
    except BenchError as exc:
        readings = ", ".join(f"{x.name} {x.status()['node']['cpu_pct']:.0f} %"
                             for x in (d, peer) if x is not None)
        raise BenchError(f"{exc} (they read {readings}: is another program busy on CPUs 0 "
                         "and 1?)") from exc


def warm(*ds: Daemon) -> None:
    """A first small job on each daemon itself, which starts its fork server (a cpu job's first
    chunk would otherwise include that start), once all of them read their cores idle: a busy
    daemon would pass the job to a peer."""
    for d in ds:
        settle(d)
    for d in ds:
        for attempt in range(1, TRIES + 1):
            with Client(d.socket, timeout=30) as client:
                done = [e for e in client.submit(MemJob(1, 0)) if isinstance(e, JobDone)][-1]
            if done.ok and {p["node"] for p in done.result["placements"]} == {d.name}:
                break
            if attempt == TRIES:
                raise BenchError(f"the warm-up job on {d.name} failed or ran elsewhere: "
                                 f"{done.error or done.result}")
            settle(d)


def join(daemons: Daemons, a: Daemon, label: str, cgroup: Path | None = None) -> Daemon:
    """A new b on core 1 (started in ``cgroup``, if given) that finds ``a`` through its seed;
    returns once both list the other up and b has run a first job."""
    b = daemons.start(label, {1}, seeds=[a.ports], extra=lender_flags(), cgroup=cgroup)
    b.wait_ready()
    _wait(f"vestad {a.name} and {b.name} to link", LINK_TIMEOUT,
          lambda: linked(a, b) and linked(b, a))
    warm(b)
    return b


#: Something done to a peer mid-job: the peer, and what does it (returns the ``perf_counter``
#: time it was done).
Upset = tuple[Daemon, Callable[[], float]]


def signalled(peer: Daemon, signum: int) -> Upset:
    return peer, lambda: peer.send_signal(signum)


def run_cpu(d: Daemon, n: int, stop: Upset | None = None) -> dict[str, Any]:
    """``cpu n`` submitted to ``d``: the job's seconds, digest and placements, and every chunk
    handed out (seconds since the submit, node, units).

    With ``stop`` (a peer and what to do to it: a signal, its owner's load), that is done as
    soon as the peer has been handed ``CHUNKS_BEFORE_STOP`` chunks; ``release`` is then the
    seconds from it to the next chunk handed to ``d``, which holds the lowest units not done,
    the peer's lost ones (a job is handed out from its first missing unit on); None if none
    came.
    """
    peer, upset = stop if stop is not None else (None, time.perf_counter)
    starts: list[tuple[float, str, int]] = []
    finished: dict[str, int] = {}
    sent = release = None
    lost = 0
    done: JobDone | None = None
    t0 = time.perf_counter()
    with Client(d.socket, timeout=60) as client:
        for event in client.submit(CpuJob(n, SEED)):
            now = time.perf_counter()
            if isinstance(event, JobProgress):
                finished = dict(event.nodes)
            elif isinstance(event, JobStarted):
                starts.append((round(now - t0, 4), event.node, event.units))
                if peer is not None and sent is None and event.node == peer.name and sum(
                        1 for _, node, _ in starts if node == peer.name) == CHUNKS_BEFORE_STOP:
                    sent = upset()
                    lost = (sum(u for _, node, u in starts if node == peer.name)
                            - finished.get(peer.name, 0))
                elif sent is not None and release is None and event.node == d.name:
                    release = now - sent
            elif isinstance(event, JobDone):
                done = event
    if done is None or not done.ok:
        raise BenchError(f"cpu {n} submitted to {d.name} failed: "
                         f"{done.error if done else 'no JobDone'}\n{d.log_tail()}")
    doc = done.result
    return {"seconds": doc["seconds"], "digest": doc["digest"], "placements": doc["placements"],
            "starts": starts, "signal_at": None if sent is None else round(sent - t0, 4),
            "release": release, "lost_units": lost if sent is not None else None}


def settled_run(d: Daemon, n: int, stop: Upset) -> dict[str, Any]:
    """:func:`run_cpu` once ``d`` reads its core idle and sees the peer to stop offer workers."""
    settle(d, stop[0])
    return run_cpu(d, n, stop)


def one_node(d: Daemon, n: int) -> dict[str, Any]:
    """``cpu n`` on a lone daemon, which must run all of it."""
    run = run_cpu(d, n)
    if [p["node"] for p in run["placements"]] != [d.name]:
        raise BenchError(f"cpu {n} on the lone {d.name} ran elsewhere: {run['placements']}")
    return run


def split_on(d: Daemon, n: int, nodes: tuple[Daemon, Daemon]) -> dict[str, Any]:
    """``cpu n`` submitted to ``d`` once it reads its core idle and sees the other of ``nodes``
    offer workers; both must run some of it (``TRIES`` tries; ``sat_out`` counts the others)."""
    for attempt in range(1, TRIES + 1):
        settle(d, nodes[1] if d is nodes[0] else nodes[0])
        run = run_cpu(d, n)
        used = {p["node"] for p in run["placements"] if p["units"] > 0}
        if {x.name for x in nodes} <= used:
            run["sat_out"] = attempt - 1
            return run
        say(f"  cpu {n} submitted to {d.name} ran on {', '.join(sorted(used))} only; again")
    raise BenchError(f"cpu {n} submitted to {d.name} did not run on both {nodes[0].name} and "
                     f"{nodes[1].name} in {TRIES} tries: {run['placements']}")


def same_digest(runs: dict[str, list[dict[str, Any]]], what: str) -> str:
    digests = {run["digest"] for rs in runs.values() for run in rs}
    if len(digests) != 1:
        raise BenchError(f"the digests of {what} differ between runs: {sorted(digests)}")
    return digests.pop()


def interleave(steps: dict[str, Callable[[], dict[str, Any]]], rounds: int, load: Load,
               what: str, show: Callable[[dict[str, Any]], str],
               after: Callable[[str], None] = lambda key: None,
               ) -> dict[str, list[dict[str, Any]]]:
    """Each step once a round, in the order given and the reverse every other round;
    ``after(key)`` runs after each step, outside the load watch."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in steps}
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for key in order:
            with load.watch():
                result = steps[key]()
            result["foreign_cores"] = round(load.foreign_cores[-1], 3)
            runs[key].append(result)
            after(key)
        say(f"  {what} round {r + 1}/{rounds}: " + ", ".join(
            f"{key} {show(runs[key][-1])}" for key in steps))
    return runs


def _seconds(run: dict[str, Any]) -> str:
    return f"{run['seconds']:.2f} s"


# -- two nodes against one -------------------------------------------------------------------------


def bench_split(daemons: Daemons, load: Load, pool: tuple[Daemon, Daemon, Daemon], n: int,
                rounds: int, details: dict[str, Any]) -> list[Row]:
    """``cpu n`` on a lone daemon on core 0 (``one``) against the same job split over a (core 0)
    and b (core 1), and the plain hashlib loop over the same units in 1 process on core 0 and in
    2 on cores 0 and 1, whose speed-up is the ceiling of the split's. The split is submitted to
    b, whose core the step before it left idle (a one-node run, or the plain loop on core 0).
    b is stopped at the end."""
    one, a, b = pool
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "one": lambda: one_node(one, n),
        "split": lambda: split_on(b, n, (a, b)),
        "plain_1": lambda: plain_cpu(n, {0}, 1, SEED),
        "plain_2": lambda: plain_cpu(n, {0, 1}, 2, SEED),
    }
    runs = interleave(steps, rounds, load, "pool split", _seconds)
    daemons.stop(b)
    digest = same_digest(runs, f"cpu {n} (one node, split and plain)")
    details["split"] = {"n": n, "digest": digest, "runs": runs}

    def s(key: str) -> list[float]:
        return [run["seconds"] for run in runs[key]]

    speedup = ratios(s("one"), s("split"))
    ceiling = ratios(s("plain_1"), s("plain_2"))
    return [
        Row(f"pool cpu {n}: one node (core 0), job seconds", "s", s("one")),
        Row("  split over a (core 0) and b (core 1)", "s", s("split")),
        Row("  split / one node", "", ratios(s("split"), s("one")), TARGET_SPLIT_RATIO,
            higher_is_better=False, digits=3),
        Row("  split speed-up (one node / split)", "x", speedup),
        Row("  ceiling: plain split 2 processes vs 1", "x", ceiling),
        Row("  split speed-up / ceiling", "", ratios(speedup, ceiling), TARGET_SPLIT_OF_CEILING,
            digits=3),
    ]


# -- an uneven pool --------------------------------------------------------------------------------


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _make_half_core() -> Path:
    """A new cgroup whose processes get half a core: cgroup v2's ``cpu.max`` where the v2
    hierarchy has the cpu controller (enabled for the root's children if it is not); else the
    same quota in a cgroup v1 cpu hierarchy (a machine whose cpu controller is bound there)."""
    name = f"vesta-bench-half-{secrets.token_hex(3)}"
    v1 = CGROUP_ROOT / "cpu"
    try:
        if "cpu" in _words(CGROUP_ROOT / "cgroup.controllers"):
            if "cpu" not in _words(CGROUP_ROOT / "cgroup.subtree_control"):
                (CGROUP_ROOT / "cgroup.subtree_control").write_text("+cpu\n")
            path = CGROUP_ROOT / name
            path.mkdir()
            (path / "cpu.max").write_text(f"{HALF_QUOTA_US} {PERIOD_US}\n")
        elif (v1 / "cpu.cfs_quota_us").exists():
            path = v1 / name
            path.mkdir()
            (path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (path / "cpu.cfs_quota_us").write_text(f"{HALF_QUOTA_US}\n")
        else:
            raise BenchError(f"no cgroup cpu controller under {CGROUP_ROOT} (neither cgroup v2's "
                             "cpu.max nor a cgroup v1 cpu hierarchy) to hold b to half a core")
    except OSError as exc:
        raise BenchError(f"cannot make a cgroup that holds b to half a core (root is needed): "
                         f"{exc}") from exc
    return path


@contextlib.contextmanager
def half_core(daemons: Daemons) -> Iterator[Path]:
    """A cgroup holding its processes to half a core, for the life of the block; then every
    daemon started in it is stopped and the cgroup removed."""
    path = _make_half_core()
    try:
        yield path
    finally:
        for d in [d for d in daemons.running if d.cgroup == path]:
            daemons.stop(d)
        trouble = remove_cgroup(path, CGROUP_REMOVE_TIMEOUT)
        if trouble:
            daemons.trouble.append(trouble)


def _throttled(path: Path) -> int:
    """How many times the cgroup's quota has held its processes back (``nr_throttled``)."""
    for line in (path / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "nr_throttled":
            return int(value)
    raise BenchError(f"the cgroup {path} does not count its throttling (no nr_throttled)")


def _in_cgroup(d: Daemon, path: Path) -> None:
    try:
        mine = Path(f"/proc/{d.pid}/cgroup").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the cgroup of vestad {d.name}: {exc}") from exc
    if path.name not in mine:
        raise BenchError(f"vestad {d.name} is not in the cgroup {path}: {mine.strip()}")


def bench_uneven(daemons: Daemons, load: Load, pool: tuple[Daemon, Daemon], n: int,
                 rounds: int, details: dict[str, Any]) -> list[Row]:
    """a on core 0 and a new b on core 1 held to half of it by a cgroup's CPU quota (its job
    processes, started below it, too). Each node's rate alone, from ``cpu n`` on a lone twin
    (``fast``, the lone daemon on core 0, and one in b's cgroup on core 1), against the same job
    split over a and b, submitted to a: the ideal split takes units / (rate a + rate b). Both
    daemons in the cgroup are stopped at the end, and the cgroup removed."""
    units = n * UNITS_PER_MILLION
    fast, a = pool
    with half_core(daemons) as half:
        slow = daemons.start("pool-slow", {1}, cgroup=half)
        b = join(daemons, a, "pool-b-half", half)
        slow.wait_ready()
        warm(slow)
        for d in (slow, b):
            _in_cgroup(d, half)
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "fast": lambda: one_node(fast, n),
            "slow": lambda: one_node(slow, n),
            "split": lambda: split_on(a, n, (a, b)),
        }
        runs = interleave(steps, rounds, load, "uneven pool", _seconds)
        names = {"a": a.name, "b": b.name}
        throttled = _throttled(half)
    if not throttled:
        raise BenchError(f"the quota of b's cgroup {half} never held it back")
    digest = same_digest(runs, f"cpu {n} (one node and split)")
    details["uneven"] = {"n": n, "digest": digest, "cgroup": str(half), "nodes": names,
                         "nr_throttled": throttled, "runs": runs}

    def s(key: str) -> list[float]:
        return [run["seconds"] for run in runs[key]]

    rate_a = [units / t for t in s("fast")]
    rate_b = [units / t for t in s("slow")]
    ideal = [units / (x + y) for x, y in zip(rate_a, rate_b, strict=True)]
    b_units = [sum(p["units"] for p in run["placements"] if p["node"] == names["b"]) / units
               for run in runs["split"]]
    b_rate = [y / (x + y) for x, y in zip(rate_a, rate_b, strict=True)]
    return [
        Row(f"uneven pool cpu {n}: rate alone, a (core 0)", "units/s", rate_a, digits=1),
        Row("  rate alone, b (half of core 1, cgroup quota)", "units/s", rate_b, digits=1),
        Row("  split over a and b, job seconds", "s", s("split")),
        Row("  ideal: units / (rate a + rate b)", "s", ideal),
        Row("  split / ideal", "", ratios(s("split"), ideal), TARGET_UNEVEN_RATIO,
            higher_is_better=False, digits=3),
        Row("  b's share of the units / its share of the rate", "", ratios(b_units, b_rate),
            digits=3),
    ]


# -- a node that goes away mid-job -----------------------------------------------------------------


def bench_failover(daemons: Daemons, load: Load, a: Daemon, n: int, rounds: int, digest: str,
                   details: dict[str, Any]) -> list[Row]:
    """a (core 0) and a new b (core 1), idle, then ``cpu n`` submitted to a; as soon as b has
    been handed two chunks, b's vestad gets SIGKILL (its sockets close with it, so a notices at
    once) or SIGTERM (it tells a it is stopping and hands its units back), against the same job
    undisturbed. The figure is the time from the signal until a is handed its next chunk,
    which begins with b's lost units; b is started afresh after each signal. ``digest`` is
    the one-node run's of ``cpu n``. The last b is stopped at the end."""
    current = {"b": join(daemons, a, "pool-b")}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "calm": lambda: split_on(a, n, (a, current["b"])),
        "kill": lambda: settled_run(a, n, signalled(current["b"], signal.SIGKILL)),
        "term": lambda: settled_run(a, n, signalled(current["b"], signal.SIGTERM)),
    }

    def restart(key: str) -> None:
        if key != "calm":
            daemons.stop(current["b"])
            current["b"] = join(daemons, a, "pool-b")

    def show(run: dict[str, Any]) -> str:
        release = run.get("release")
        return _seconds(run) + ("" if release is None else f" (re-leased in {release:.3f} s)")

    runs = interleave(steps, rounds, load, "failover", show, after=restart)
    daemons.stop(current["b"])
    digests = {run["digest"] for rs in runs.values() for run in rs}
    if digests != {digest}:
        raise BenchError(f"cpu {n} split, with or without a node stopped mid-job, gave digests "
                         f"{sorted(digests)}, not the one-node run's {digest}")
    details["failover"] = {"n": n, "runs": runs}

    rows = [Row(f"failover cpu {n}: undisturbed split, job seconds", "s",
                [run["seconds"] for run in runs["calm"]])]
    for key, label, target in (("kill", "SIGKILL", TARGET_KILL_RELEASE_S),
                               ("term", "SIGTERM", TARGET_TERM_RELEASE_S)):
        missed = [r for r, run in enumerate(runs[key]) if run["release"] is None]
        if missed:
            say(f"  {label}: in rounds {[r + 1 for r in missed]} no chunk was handed to a after "
                "the signal (b held nothing, or was never handed two chunks)")
        release = [run["release"] for run in runs[key] if run["release"] is not None]
        if not release:
            raise BenchError(f"no {label} of b mid-job led to a chunk on a: {runs[key]}")
        rows += [
            Row(f"{label} of b mid-job -> its units leased to a", "s", release, target,
                higher_is_better=False, digits=3,
                note=f"{len(missed)} round(s) without" if missed else ""),
            Row(f"  job seconds with the {label} / undisturbed", "",
                ratios([run["seconds"] for run in runs[key]],
                       [run["seconds"] for run in runs["calm"]]), digits=3),
        ]
    return rows


# -- the owner's load on a lender mid-job ----------------------------------------------------------

TARGET_RECLAIM_S = 1.0
#: Seconds between two looks at the lender's processes while its owner's loop runs.
HELD_POLL_S = 0.005
#: Seconds to wait for every lent process to stop once the owner's loop runs.
RECLAIM_TIMEOUT = 5.0


def lent_processes(d: Daemon) -> list[psutil.Process]:
    """``d``'s job processes that run work for a peer (at nice 19), and what they started."""
    lent = []
    for proc in d.tree()[1:]:
        with contextlib.suppress(psutil.Error):
            if proc.nice() == 19:
                lent.append(proc)
    return lent


def runs_lent(proc: psutil.Process) -> bool:
    """A lent process that runs, or could run: on the CPU or waiting for it, and not held."""
    with contextlib.suppress(psutil.Error):
        return proc.status() == psutil.STATUS_RUNNING and not supervisor.held(proc.pid)
    return False


class OwnersLoop:
    """What an owner does to a lender mid-job: a busy loop on the lender's core. ``held_after``
    is then the seconds from the loop's start until the lender says it paused its lent work
    and no lent process there runs (each is stopped, frozen or waiting for its next task);
    None when that did not happen within ``RECLAIM_TIMEOUT`` (its part ended first)."""

    def __init__(self, lender: Daemon, cpu: int) -> None:
        self.lender, self.cpu = lender, cpu
        self.loop: subprocess.Popen[bytes] | None = None
        self.held_after: float | None = None
        self.watch: threading.Thread | None = None

    def start(self) -> float:
        """Once a lent process runs on the lender, start the loop; the time it started."""
        _wait(f"a lent process on {self.lender.name} to run", 2.0,
              lambda: any(runs_lent(p) for p in lent_processes(self.lender)), step=0.002)
        self.loop = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                     preexec_fn=lambda: os.sched_setaffinity(0, {self.cpu}))
        began = time.perf_counter()
        self.watch = threading.Thread(target=self._watch, args=(began,), daemon=True)
        self.watch.start()
        return began

    def _watch(self, began: float) -> None:
        while time.perf_counter() < began + RECLAIM_TIMEOUT:
            if not any(runs_lent(p) for p in lent_processes(self.lender)) and (
                    self.lender.status()["node"].get("paused")):
                self.held_after = time.perf_counter() - began
                return
            time.sleep(HELD_POLL_S)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.join(RECLAIM_TIMEOUT + 1)
        if self.loop is not None:
            self.loop.kill()
            self.loop.wait(10)


def reclaimed_run(a: Daemon, b: Daemon, n: int) -> dict[str, Any]:
    """``cpu n`` submitted to ``a`` with an owner's loop started on ``b``'s core mid-job."""
    owner = OwnersLoop(b, 1)
    try:
        run = settled_run(a, n, (b, owner.start))
    finally:
        owner.stop()
    run["held_after"] = owner.held_after
    return run


def bench_reclaim(daemons: Daemons, load: Load, a: Daemon, n: int, rounds: int, digest: str,
                  details: dict[str, Any]) -> list[Row]:
    """a (core 0) and a new b (core 1), idle, then ``cpu n`` submitted to a; as soon as b has
    been handed two chunks and runs one, a busy loop starts on core 1, as b's owner would
    start a program; against the same job undisturbed. The figure is the time from the loop's
    start until b has paused its lent work and none of it runs. b, at the default
    ``pause_replace_s`` of a (5 s), gets its part placed elsewhere after that long; it resumes
    at once when the loop ends (``-reclaim-s 0``). a and b are stopped at the end."""
    b = join(daemons, a, "pool-b")
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "calm": lambda: split_on(a, n, (a, b)),
        "owner": lambda: reclaimed_run(a, b, n),
    }

    def show(run: dict[str, Any]) -> str:
        held = run.get("held_after")
        return _seconds(run) + ("" if held is None else f" (lent work stopped in {held:.3f} s)")

    runs = interleave(steps, rounds, load, "reclaim", show)
    for d in (a, b):
        daemons.stop(d)
    digests = {run["digest"] for rs in runs.values() for run in rs}
    if digests != {digest}:
        raise BenchError(f"cpu {n} split, with or without b's owner busy mid-job, gave digests "
                         f"{sorted(digests)}, not the one-node run's {digest}")
    details["reclaim"] = {"n": n, "runs": runs}
    missed = [r for r, run in enumerate(runs["owner"]) if run["held_after"] is None]
    if missed:
        say(f"  owner's loop: in rounds {[r + 1 for r in missed]} b did not pause its lent work "
            f"within {RECLAIM_TIMEOUT:g} s (its part ended first?)")
    held = [run["held_after"] for run in runs["owner"] if run["held_after"] is not None]
    if not held:
        raise BenchError(f"no owner's loop on b mid-job led to a pause: {runs['owner']}")
    return [
        Row(f"owner's loop on b mid-job (cpu {n}) -> lent work stopped", "s", held,
            TARGET_RECLAIM_S, higher_is_better=False, digits=3,
            note=f"{len(missed)} round(s) without" if missed else ""),
        Row("  job seconds with b's owner busy / undisturbed", "",
            ratios([run["seconds"] for run in runs["owner"]],
                   [run["seconds"] for run in runs["calm"]]), digits=3),
    ]


# -- all of it -------------------------------------------------------------------------------------


def bench_pool(daemons: Daemons, load: Load, rounds: int, quick: bool, details: dict[str, Any],
               ) -> list[Row]:
    """The split, the uneven pool and the failovers, one after the other, with the same a and
    lone daemon on core 0 and a new b for each: the split with ``--rounds`` rounds of a job of
    about 6 s on one core; the others with half as many (at least 3) of a job of about 3 s.
    ``--quick``: 2 rounds of each, of the smallest job vestad splits."""
    if quick:
        n_split = n_small = MIN_SPLIT_N
        unit = None
    else:
        n_split, unit = calibrate(SPLIT_JOB_SECONDS)
        n_small = round(SMALL_JOB_SECONDS / (unit * UNITS_PER_MILLION))
        n_split, n_small = max(MIN_SPLIT_N, n_split), max(MIN_SPLIT_N, n_small)
    side = QUICK_ROUNDS if quick else max(3, (rounds + 1) // 2)
    pool: dict[str, Any] = {"unit_seconds_at_calibration": unit and round(unit, 4),
                            "seed": SEED}
    details["pool"] = pool
    one = daemons.start("pool-one", {0})
    a, b = daemons.pair(("pool-a", "pool-b"), ({0}, {1}), (lender_flags(), lender_flags()))
    one.wait_ready()
    warm(one, a, b)
    rows = bench_split(daemons, load, (one, a, b), n_split,
                       QUICK_ROUNDS if quick else rounds, pool)
    rows += bench_uneven(daemons, load, (one, a), n_small, side, pool)
    daemons.stop(one)
    rows += bench_failover(daemons, load, a, n_small, side, pool["uneven"]["digest"], pool)
    rows += bench_reclaim(daemons, load, a, n_small, side, pool["uneven"]["digest"], pool)
    return rows
