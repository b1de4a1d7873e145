"""Measurements of daemons working together: a trivial job placed on a peer, many small jobs at
once against GNU parallel, and discovery in the network-namespace lab.

Jobs are submitted with vesta's Python client over the control socket, as the CLI does, but
without the CLI's start: a job's time is from sending its ``SubmitRequest`` to its ``JobDone``.
Every daemon started here binds 127.0.0.1 and finds its peer through ``-seed``, except in the lab,
where each daemon is alone in a network namespace and discovery is by broadcast, as on a LAN.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    KEY,
    ROOT,
    VESTAD,
    BenchError,
    Daemon,
    Daemons,
    Load,
    Row,
    clean_env,
    paired,
    percentile,
    ratios,
    say,
)

from vesta.client import Client, RequestFailed, VestaError, answers
from vesta.messages import (
    ExecJob,
    JobDone,
    JobStarted,
    StopStressRequest,
    StressRequest,
    SubmitRequest,
)

TARGET_REMOTE_MEDIAN_MS = 5.0
TARGET_REMOTE_P99_MS = 15.0
TARGET_LOCAL_MEDIAN_MS = 3.0
TARGET_MANY_RATIO = 1.0
TARGET_DISCOVERY_S = 1.0

#: Jobs of each kind in the remote measurement (``--quick``: fewer).
REMOTE_JOBS = 200
QUICK_REMOTE_JOBS = 50
#: Jobs submitted at once in the many-jobs measurement (``--quick``: fewer).
MANY_JOBS = 1000
QUICK_MANY_JOBS = 200
#: Control connections the many jobs are spread over, each carrying many submits.
MANY_CONNECTIONS = 8
#: The command every job runs.
TRUE = ["true"]
#: The stressed daemon's spill line, given explicitly (it is vestad's default).
SPILL_CPU_PCT = 80
#: A stress long enough for the remote measurement; it is stopped as soon as that is done.
STRESS_SECONDS = 1800.0
#: How long to wait for the stressed daemon to see itself busy, and for how long it must.
BUSY_TIMEOUT = 20.0
BUSY_HOLD = 2.5
#: Seconds of the discovery measurement's wait for two daemons to list each other.
DISCOVERY_TIMEOUT = 20.0


def timed_job(client: Client, argv: list[str]) -> tuple[float, float, JobDone]:
    """Run one exec job on an open connection: milliseconds from sending the SubmitRequest to
    its JobStarted and to its JobDone, and the JobDone."""
    started = float("nan")
    t0 = time.perf_counter()
    for event in client.submit(ExecJob(argv)):
        if isinstance(event, JobStarted) and started != started:
            started = (time.perf_counter() - t0) * 1000
        if isinstance(event, JobDone):
            return started, (time.perf_counter() - t0) * 1000, event
    raise BenchError("a job's events ended without its JobDone")


def _node(done: JobDone) -> str:
    return str(done.result.get("node", "")) if done.ok else ""


def _wait(what: str, timeout: float, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise BenchError(f"gave up waiting for {what} after {timeout:g} s")
        time.sleep(0.1)


def _steady(ready: Callable[[], bool], hold: float) -> bool:
    """Whether ``ready`` holds at every look (each 0.1 s) for ``hold`` seconds."""
    until = time.monotonic() + hold
    while time.monotonic() < until:
        if not ready():
            return False
        time.sleep(0.1)
    return True


# -- a trivial job on a peer -------------------------------------------------------------------


def bench_remote(daemons: Daemons, load: Load, jobs: int, details: dict[str, Any]) -> list[Row]:
    """``exec -- true`` placed on a peer against the same job kept local, job by job.

    a is pinned to core 0 and kept busy with ``vesta stress``, so that its work spills; b is
    pinned to core 1 and lends exec (``-allow-exec``). The remote job is submitted to a and must
    run on b; the local one is submitted to b and runs there (a does not lend exec, so b never
    spills). Both run on core 1; they alternate, the order swapped every other pair. The bench
    submits each job from where its user would: a remote job from a's core, where the owner's
    work (the stress) runs too; a local one from b's core.
    """
    mine = os.sched_getaffinity(0)
    a, b = daemons.pair(("remote-a", "remote-b"), ({0}, {1}),
                        (("-spill-cpu-pct", str(SPILL_CPU_PCT)), ("-allow-exec",)))
    with Client(a.socket, timeout=30) as to_a, Client(b.socket, timeout=30) as to_b:
        for _ in range(3):  # b's fork server starts with its first job
            timed_job(to_b, TRUE)
        to_a.request(StressRequest(0, STRESS_SECONDS))
        try:
            # a daemon reads its load once a second, and its first readings include its own
            # start: a is busy once every reading for a while is over the line
            _wait(f"{a.name} to be busy under stress", BUSY_TIMEOUT,
                  lambda: _steady(lambda: a.status()["node"]["cpu_pct"] >= SPILL_CPU_PCT,
                                  BUSY_HOLD))
            placed, deadline = 0, time.monotonic() + BUSY_TIMEOUT
            while placed < 3:  # until jobs submitted to a run on b (placement sees a busy)
                _, _, done = timed_job(to_a, TRUE)
                placed = placed + 1 if _node(done) == b.name else 0
                if time.monotonic() > deadline:
                    raise BenchError(f"jobs submitted to the stressed {a.name} still run on "
                                     f"{_node(done) or 'no node'}, not on its peer {b.name}, "
                                     f"after {BUSY_TIMEOUT:g} s: {done.error or done.result}")
            mark = len(load.foreign_cores)
            times: dict[str, list[float]] = {"remote": [], "local": [], "remote_started": []}
            misplaced: list[str] = []
            for i in range(jobs):
                order = ("remote", "local") if i % 2 == 0 else ("local", "remote")
                for kind in order:
                    client = to_a if kind == "remote" else to_b
                    os.sched_setaffinity(0, {0} if kind == "remote" else {1})  # see above
                    with load.watch():
                        started, took, done = timed_job(client, TRUE)
                    if _node(done) != b.name:
                        misplaced.append(f"{kind} job {i}: {_node(done) or done.error}")
                        continue
                    times[kind].append(took)
                    if kind == "remote":
                        times["remote_started"].append(started)
                if (i + 1) % 50 == 0:
                    say(f"  remote job pairs {i + 1}/{jobs}: median remote "
                        f"{percentile(times['remote'], 50):.1f} ms, local "
                        f"{percentile(times['local'], 50):.1f} ms")
        finally:
            os.sched_setaffinity(0, mine)
            with contextlib.suppress(VestaError):
                to_a.request(StopStressRequest())
    daemons.stop(a)
    daemons.stop(b)
    if len(misplaced) > jobs // 10:
        raise BenchError(f"{len(misplaced)} of {2 * jobs} jobs ran on the wrong node: "
                         f"{misplaced[:5]}")
    n = min(len(times["remote"]), len(times["local"]))
    details["remote"] = {
        "ms": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "misplaced": misplaced,
        "foreign_cores": round(load.since(mark), 3),
    }
    p99 = {k: percentile(times[k], 99) for k in ("remote", "local")}
    return [
        Row("remote exec true: submit to JobDone (a -> b)", "ms", times["remote"],
            TARGET_REMOTE_MEDIAN_MS, higher_is_better=False, digits=1,
            note=f"p99 {p99['remote']:.1f} ms"),
        Row("  p99 of the same", "ms", [p99["remote"]], TARGET_REMOTE_P99_MS,
            higher_is_better=False, digits=1),
        Row("  submit to JobStarted on a (placed, sent to b)", "ms", times["remote_started"],
            digits=1),
        Row("local exec true on b: submit to JobDone", "ms", times["local"],
            TARGET_LOCAL_MEDIAN_MS, higher_is_better=False, digits=1,
            note=f"p99 {p99['local']:.1f} ms"),
        Row("  p99 of the same", "ms", [p99["local"]], digits=1),
        Row("  remote - local (paired)", "ms", paired(times["remote"][:n], times["local"][:n]),
            digits=1),
    ]


# -- many small jobs ------------------------------------------------------------------------------


def submit_many(d: Daemon, jobs: int, connections: int) -> float:
    """Submit ``jobs`` exec jobs at once over a few connections; seconds until the last is done."""
    clients = [Client(d.socket, timeout=None) for _ in range(connections)]
    selector = selectors.DefaultSelector()
    try:
        for client in clients:
            selector.register(client.sock.fileno(), selectors.EVENT_READ, client)
        t0 = time.perf_counter()
        for i in range(jobs):
            clients[i % connections].send(SubmitRequest(ExecJob(TRUE)))
        done = 0
        while done < jobs:
            for key, _ in selector.select(60):
                event = key.data.receive()
                if not isinstance(event, JobDone):
                    continue
                if not event.ok or _node(event) != d.name:
                    raise BenchError(f"a job of the many failed or ran elsewhere: "
                                     f"{event.error or event.result}")
                done += 1
        return time.perf_counter() - t0
    finally:
        selector.close()
        for client in clients:
            client.close()


def run_parallel(parallel: str, jobs: int, workers: int, cpus: set[int]) -> float:
    """GNU parallel running ``true`` ``jobs`` times, ``workers`` at a time, on ``cpus``."""
    t0 = time.perf_counter()
    done = subprocess.run([parallel, "--will-cite", "-j", str(workers), "-N0", *TRUE],
                          input="\n" * jobs, text=True, capture_output=True, env=clean_env(),
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus), check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise BenchError(f"GNU parallel exited with {done.returncode}: {done.stderr.strip()}")
    return seconds


def bench_many(daemons: Daemons, load: Load, jobs: int, rounds: int, details: dict[str, Any],
               ) -> list[Row]:
    """``jobs`` ``exec -- true`` submitted at once to a vestad on cores {0, 1}, against GNU
    parallel running ``true`` as many times on the same cores with ``-j`` the daemon's worker
    count; interleaved, the order swapped every other round."""
    cpus = {0, 1}
    parallel = shutil.which("parallel")
    if parallel is None:
        say("bench: GNU parallel is not installed, so vestad's rate of small jobs is measured "
            "alone and not compared (install it: apt-get install parallel)")
    elif b"GNU parallel" not in subprocess.run([parallel, "--version"], capture_output=True,
                                               check=False).stdout:
        say(f"bench: {parallel} is not GNU parallel (moreutils?): the comparison is skipped")
        parallel = None
    d = daemons.start("many", cpus)
    d.wait_ready()
    workers = int(d.status()["node"]["workers"])
    with Client(d.socket, timeout=30) as client:
        for _ in range(3):  # the fork server starts with the first job
            timed_job(client, TRUE)
    mark = len(load.foreign_cores)
    rates: dict[str, list[float]] = {"vestad": [], "parallel": []}
    steps: dict[str, Callable[[], float]] = {
        "vestad": lambda: submit_many(d, jobs, MANY_CONNECTIONS),
    }
    if parallel is not None:
        steps["parallel"] = lambda: run_parallel(parallel, jobs, workers, cpus)
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for key in order:
            with load.watch():
                seconds = steps[key]()
            rates[key].append(jobs / seconds)
        say(f"  many jobs round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {rates[k][-1]:.0f} jobs/s" for k in steps))
    daemons.stop(d)
    details["many"] = {"jobs": jobs, "workers": workers, "connections": MANY_CONNECTIONS,
                       "parallel": parallel, "jobs_per_s": rates,
                       "foreign_cores": round(load.since(mark), 3)}
    rows = [Row(f"{jobs} x exec true at once, vestad ({workers} workers)", "jobs/s",
                rates["vestad"], digits=1)]
    if parallel is not None:
        rows += [
            Row(f"  GNU parallel -j {workers} true, same cores", "jobs/s", rates["parallel"],
                digits=1),
            Row("  vestad / GNU parallel", "", ratios(rates["vestad"], rates["parallel"]),
                TARGET_MANY_RATIO, digits=3),
        ]
    return rows


# -- discovery in the lab --------------------------------------------------------------------------


def _lab() -> Any:
    """The network lab module of the tests, or the reason it cannot run here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from tests.lab import netlab
    except ImportError as exc:
        return f"the network lab (tests/lab/netlab.py) cannot be imported: {exc}"
    return netlab.unavailable_reason() or netlab


def _lists_up(sock: str, name: str) -> bool:
    try:
        with Client(sock, timeout=2) as client:
            return any(p["name"] == name and p["state"] == "up" for p in client.peers())
    except (VestaError, RequestFailed):
        return False


class _LabDaemon:
    """A vestad alone in a lab host, found by broadcast on the host's subnet."""

    def __init__(self, host: Any, label: str) -> None:
        lab = host.lab
        self.name = f"{label}-{secrets.token_hex(3)}"
        self.socket = str(Path(lab.rundir) / f"{self.name}.sock")
        self.log = Path(lab.workdir) / f"{self.name}.log"
        args = [str(VESTAD), "-name", self.name, "-key", KEY, "-socket", self.socket,
                "-state-dir", str(Path(lab.workdir) / self.name), "-bind", host.address]
        self.started = time.monotonic()
        with self.log.open("w") as log:
            self.proc = host.run(args, stdout=log, stderr=subprocess.STDOUT, env=clean_env())

    def wait_ready(self) -> float:
        """Seconds from the start until the control socket answers."""
        _wait(f"lab vestad {self.name} to answer", DISCOVERY_TIMEOUT,
              lambda: self._alive() and answers(self.socket))
        return time.monotonic() - self.started

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-10:]
            raise BenchError(f"lab vestad {self.name} exited with {self.proc.returncode}:\n"
                             + "\n".join(tail))
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench_discovery(load: Load, rounds: int, details: dict[str, Any]) -> list[Row]:
    """Two hosts on one subnet of the lab, one daemon each, started fresh every round (new
    identities): the second daemon's start until both list each other up, polled every 5 ms."""
    netlab = _lab()
    if isinstance(netlab, str):
        say(f"bench: discovery skipped: {netlab}")
        details["discovery"] = {"skipped": netlab}
        return []
    times: dict[str, list[float]] = {"linked": [], "ready": []}
    mark = len(load.foreign_cores)
    with netlab.Lab() as lab:
        one, two = lab.add_host("one", cpu=0), lab.add_host("two", cpu=1)
        for r in range(rounds):
            first = _LabDaemon(one, "first")
            second: _LabDaemon | None = None
            try:
                first.wait_ready()
                load.extra.append(first.proc.pid)
                with load.watch():
                    second = _LabDaemon(two, "second")
                    load.extra.append(second.proc.pid)
                    ready = None
                    deadline = second.started + DISCOVERY_TIMEOUT
                    while True:
                        if ready is None and second._alive() and answers(second.socket):
                            ready = time.monotonic() - second.started
                        if ready is not None and _lists_up(first.socket, second.name) and (
                                _lists_up(second.socket, first.name)):
                            break
                        if time.monotonic() > deadline:
                            raise BenchError(f"the lab daemons did not list each other in "
                                             f"{DISCOVERY_TIMEOUT:g} s")
                        time.sleep(0.005)
                    linked = time.monotonic() - second.started
                    assert ready is not None
                times["linked"].append(linked)
                times["ready"].append(ready)
                say(f"  discovery round {r + 1}/{rounds}: linked {linked:.3f} s after the "
                    f"start, control socket at {times['ready'][-1]:.3f} s")
            finally:
                for d in (second, first):
                    if d is not None:
                        with contextlib.suppress(ValueError):
                            load.extra.remove(d.proc.pid)
                        d.stop()
    details["discovery"] = {"seconds": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
                            "foreign_cores": round(load.since(mark), 3)}
    return [
        Row("discovery (lab): 2nd daemon's start to both listing each other up", "s",
            times["linked"], TARGET_DISCOVERY_S, higher_is_better=False, digits=3),
        Row("  of which: start until its control socket answers", "s", times["ready"],
            digits=3),
        Row("  then until both list each other (paired)", "s",
            paired(times["linked"], times["ready"]), digits=3),
    ]
