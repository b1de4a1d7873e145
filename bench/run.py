"""vesta's benchmarks: the figures of docs/performance.md, measured side by side in one run.

Run it with ``tox -e bench`` (or ``python bench/run.py`` from an environment where vesta is
installed): it starts the ``vestad`` and ``vesta`` programs installed next to the interpreter that
runs it. Every comparison is interleaved (A, B, A, B, ...) over at least five rounds and reported
as median and spread, because this machine's absolute figures move 20-40 % between runs.

1. cpu throughput per core: ``vesta --json cpu N`` on a vestad pinned to core 0, against a plain
   hashlib loop over the same units in one process pinned to the same core.
2. speed-up on 2 cores: the same job on a vestad on cores {0,1} against one on core {0}, beside the
   same-run ceiling of a plain ``multiprocessing`` split over 2 processes against 1.
3. ``vesta status`` round trip, interpreter start included, beside a bare ``python -c pass``.
4. idle vestad: PSS of the whole process tree, main process RSS and CPU, for a fresh daemon and
   one that has run a job (its fork server then exists).

Results go to a table on stdout and to bench/results/latest.json with the machine's facts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from vesta import __version__
from vesta.client import Client, VestaError
from vesta.workers.jobs import UNIT_ITERATIONS, UNITS_PER_MILLION

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VESTAD = BIN / "vestad"
VESTA = BIN / "vesta"
KEY = "bench-federation-key-" + secrets.token_hex(8)
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Targets: (comparison, value). A ratio must reach its target; a cost must stay within it.
TARGET_CPU_RATIO = 0.95
TARGET_SPEEDUP = 1.8
TARGET_STATUS_MS = 80.0
TARGET_IDLE_PSS_MIB = 45.0
TARGET_IDLE_CPU_PCT = 0.5

#: The idle window is sampled at the end of each of this many equal slices.
IDLE_SLICES = 5

#: Other programs' load, in cores, above which the run is flagged as not reliable.
QUIET_CORES = 0.25

#: Seconds a 1-core cpu job should take (``--quick``: less).
CPU_JOB_SECONDS = 4.0
QUICK_CPU_JOB_SECONDS = 1.5


class BenchError(RuntimeError):
    """Something that makes a figure meaningless: a daemon that fails, a wrong digest."""


# -- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: samples, their median and spread, and the target if there is one."""

    name: str
    unit: str
    samples: list[float]
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""
    digits: int = 2

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.median >= self.target
        return self.median <= self.target

    def fmt(self, x: float) -> str:
        return f"{x:.{self.digits}f}"

    def cells(self) -> list[str]:
        unit = f" {self.unit}" if self.unit else ""
        target = "" if self.target is None else (
            f"{'>=' if self.higher_is_better else '<='} {self.fmt(self.target)}{unit}")
        verdict = {None: "info", True: "PASS", False: "FAIL"}[self.passed]
        return [
            self.name, f"{self.fmt(self.median)}{unit}",
            f"{self.fmt(min(self.samples))}-{self.fmt(max(self.samples))}",
            str(len(self.samples)), target, verdict,
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "unit": self.unit, "median": round(self.median, 6),
            "min": round(min(self.samples), 6), "max": round(max(self.samples), 6),
            "n": len(self.samples), "target": self.target,
            "target_is": None if self.target is None else (
                "minimum" if self.higher_is_better else "maximum"),
            "passed": self.passed, "note": self.note,
            "samples": [round(s, 6) for s in self.samples],
        }


def print_table(rows: list[Row]) -> None:
    lines = [["measure", "median", "spread (min-max)", "n", "target", "result"]]
    lines += [r.cells() for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- how busy the rest of the machine is ---------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds spent busy on all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a process and its descendants, and of the children they have reaped.

    A daemon's job processes are reaped by its fork server: once a job is done, their CPU time is
    in the second figure and the daemon's own work in the first.
    """
    own = reaped = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return own, reaped
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            own += t.user + t.system
            reaped += t.children_user + t.children_system
    return own, reaped


def tree_cpu_seconds(pid: int) -> float:
    return sum(tree_cpu(pid))


def own_cpu_seconds() -> float:
    """CPU seconds of this process and the children it has waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


@dataclass
class Load:
    """Watches how much CPU other programs use while something is measured."""

    daemons: list[Daemon]
    foreign_cores: list[float] = field(default_factory=list)

    def ours(self) -> float:
        return own_cpu_seconds() + sum(tree_cpu_seconds(d.pid) for d in self.daemons if d.alive())

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        t0, busy0, ours0 = time.perf_counter(), machine_busy_seconds(), self.ours()
        yield
        wall = time.perf_counter() - t0
        foreign = (machine_busy_seconds() - busy0) - (self.ours() - ours0)
        self.foreign_cores.append(max(0.0, foreign / wall))


# -- daemons -------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VESTA_")}


class Daemon:
    """A vestad started for the bench, with its own name, state directory and control socket."""

    def __init__(self, workdir: Path, label: str, cpus: set[int] | None = None) -> None:
        self.name = f"{label}-{secrets.token_hex(3)}"
        self.socket = f"/tmp/vestad-bench-{self.name}.sock"
        self.log = workdir / f"{self.name}.log"
        self.cpus = cpus
        self.stop_seconds: float | None = None
        args = [str(VESTAD), "-name", self.name, "-state-dir", str(workdir / self.name),
                "-socket", self.socket, "-key", KEY]

        def pin() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=clean_env(), preexec_fn=pin if cpus is not None else None,
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait until the daemon answers ``status``; returns the seconds since it was started."""
        started = psutil.Process(self.pid).create_time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"vestad {self.name} exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")
            try:
                with Client(self.socket, timeout=2) as client:
                    client.status()
                return time.time() - started
            except VestaError:
                time.sleep(0.02)
        raise BenchError(f"vestad {self.name} did not answer on {self.socket} in {timeout:g} s")

    def cli(self, *args: str, timeout: float = 600,
            ) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Run ``vesta --socket S ARGS``; returns its wall time and the finished process."""
        argv = [str(VESTA), "--socket", self.socket, *args]
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=clean_env(), timeout=timeout, check=False)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise BenchError(f"vesta {' '.join(args)} exited with {done.returncode}: "
                             f"{done.stderr.strip()}\n{self.log_tail()}")
        return wall, done

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM, wait, and make sure no process of the daemon is left; returns any trouble."""
        trouble = []
        children = self.tree()[1:]
        if self.alive():
            t0 = time.perf_counter()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                self.stop_seconds = time.perf_counter() - t0
            except subprocess.TimeoutExpired:
                trouble.append(f"vestad {self.name} ignored SIGTERM for {timeout:g} s; killed")
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode not in (0, -signal.SIGKILL) and not trouble:
            trouble.append(f"vestad {self.name} exited with {self.proc.returncode}")
        _gone, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:
            trouble.append(f"vestad {self.name} left process {p.pid} behind; killed")
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(OSError):
            Path(self.socket).unlink()
        return trouble


class Daemons:
    """Every daemon of the run, so that each is stopped whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Daemon] = []
        self.trouble: list[str] = []
        self.stop_seconds: list[float] = []

    def start(self, label: str, cpus: set[int] | None = None) -> Daemon:
        d = Daemon(self.workdir, label, cpus)
        self.running.append(d)
        return d

    def stop(self, d: Daemon) -> None:
        self.trouble += d.stop()
        if d.stop_seconds is not None:
            self.stop_seconds.append(d.stop_seconds)
        self.running.remove(d)

    def stop_all(self) -> None:
        for d in list(self.running):
            self.stop(d)


# -- the plain loop ------------------------------------------------------------------------------


def plain_units(seed: int, start: int, end: int) -> dict[int, bytes]:
    """Units [start, end) of a cpu job, written out here rather than taken from vesta's code."""
    sha = hashlib.sha256
    results = {}
    for index in range(start, end):
        h = sha(b"vesta:%d:%d" % (seed, index)).digest()
        for _ in range(UNIT_ITERATIONS):
            h = sha(h).digest()
        results[index] = h
    return results


def _plain_child(conn: Connection, cpus: set[int], seed: int, start: int, end: int) -> None:
    os.sched_setaffinity(0, cpus)
    conn.send(plain_units(seed, start, end))
    conn.close()


def split(total: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(total, parts)
    ranges, at = [], 0
    for i in range(parts):
        size = base + (i < extra)
        ranges.append((at, at + size))
        at += size
    return ranges


def plain_cpu(n: int, cpus: set[int], processes: int, seed: int = 0) -> dict[str, Any]:
    """The units of ``cpu n`` split over ``processes`` forked children; seconds and digest."""
    ctx = multiprocessing.get_context("fork")  # this process has one thread
    total = n * UNITS_PER_MILLION
    cpu0 = own_cpu_seconds()
    t0 = time.perf_counter()
    children = []
    for start, end in split(total, processes):
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_plain_child, args=(writer, cpus, seed, start, end))
        p.start()
        writer.close()
        children.append((p, reader))
    results: dict[int, bytes] = {}
    try:
        for p, reader in children:
            results.update(reader.recv())
            reader.close()
            p.join()
            if p.exitcode != 0:
                raise BenchError(f"a plain hashlib process exited with {p.exitcode}")
    finally:
        for p, _ in children:
            if p.is_alive():
                p.kill()
                p.join()
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(results[i] for i in range(total))).hexdigest()
    return {"seconds": seconds, "digest": digest, "cpu": own_cpu_seconds() - cpu0}


def vestad_cpu(d: Daemon, n: int) -> dict[str, Any]:
    """``vesta --json cpu n`` on ``d``: the job's own seconds, the CLI's wall time, the digest,
    and the CPU seconds of the daemon's own processes and of its job processes meanwhile."""
    own0, jobs0 = tree_cpu(d.pid)
    wall, done = d.cli("--json", "cpu", str(n))
    own1, jobs1 = tree_cpu(d.pid)
    doc = json.loads(done.stdout)
    placed = sum(p["units"] for p in doc["placements"] if p["node"] == d.name)
    if placed != n * UNITS_PER_MILLION:
        raise BenchError(f"cpu {n} on {d.name} was not run there entirely: {doc['placements']}")
    return {"seconds": doc["seconds"], "wall": wall, "digest": doc["digest"],
            "daemon_cpu": own1 - own0, "job_cpu": jobs1 - jobs0}


def calibrate(job_seconds: float) -> tuple[int, float]:
    """The N of ``cpu N`` that takes about ``job_seconds`` on one core, and one unit's seconds.

    A unit's time is the fastest of those run in about a second: this machine's speed drifts by up
    to 2x, and the fastest unit gives the shortest job; in a slow phase the job just takes longer.
    """
    times: list[float] = []
    deadline = time.perf_counter() + 1.0
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        plain_units(0, len(times), len(times) + 1)
        times.append(time.perf_counter() - t0)
    unit = min(times)
    return max(1, round(job_seconds / (unit * UNITS_PER_MILLION))), unit


# -- the measurements ----------------------------------------------------------------------------


def bench_cpu(daemons: Daemons, load: Load, n: int, rounds: int, details: dict[str, Any],
              ) -> list[Row]:
    """Measurements 1 and 2 in one interleaved loop: V2, V1, P1, P2, then P2, P1, V1, V2, and so
    on, where V is vestad, P the plain loop, 1 core {0} and 2 cores {0, 1}. Each pair compared
    (V1-P1, V1-V2, P1-P2) runs back to back, since this machine's speed drifts within seconds."""
    one, two = {0}, {0, 1}
    d1 = daemons.start("cpu1", one)
    d2 = daemons.start("cpu2", two)
    warm: dict[str, list[float]] = {}
    for d in (d1, d2):
        d.wait_ready()
        got = psutil.Process(d.pid).cpu_affinity()
        if set(got) != d.cpus:
            raise BenchError(f"vestad {d.name} runs on CPUs {got}, not {sorted(d.cpus or ())}")
        # the first job starts the fork server; the figures are for a daemon that has one
        warm[d.name] = [json.loads(d.cli("--json", "mem", "1", "0")[1].stdout)["seconds"]
                        for _ in range(2)]
    details["warm_up_mem_job_seconds"] = warm

    runs: dict[str, list[dict[str, Any]]] = {"vestad_1": [], "plain_1": [], "vestad_2": [],
                                             "plain_2": []}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "vestad_1": lambda: vestad_cpu(d1, n),
        "plain_1": lambda: plain_cpu(n, one, 1),
        "vestad_2": lambda: vestad_cpu(d2, n),
        "plain_2": lambda: plain_cpu(n, two, 2),
    }
    for r in range(rounds):
        order = ["vestad_2", "vestad_1", "plain_1", "plain_2"]
        if r % 2:
            order.reverse()
        for key in order:
            with load.watch():
                result = steps[key]()
            result["foreign_cores"] = round(load.foreign_cores[-1], 3)
            runs[key].append(result)
        say(f"  cpu round {r + 1}/{rounds}: " + ", ".join(
            f"{k} {runs[k][-1]['seconds']:.2f} s" for k in runs))
    daemons.stop(d1)
    daemons.stop(d2)
    details["cpu_runs"] = runs

    digests = {run["digest"] for rs in runs.values() for run in rs}
    if len(digests) != 1:
        raise BenchError(f"the cpu {n} digests differ between runs: {sorted(digests)}")
    details["cpu_digest"] = digests.pop()

    def s(key: str, what: str = "seconds") -> list[float]:
        return [run[what] for run in runs[key]]

    def ratio(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b, strict=True)]

    vestad_speedup = ratio(s("vestad_1"), s("vestad_2"))
    plain_speedup = ratio(s("plain_1"), s("plain_2"))
    return [
        Row(f"cpu {n}, 1 core: vestad job seconds", "s", s("vestad_1")),
        Row(f"cpu {n}, 1 core: plain hashlib loop", "s", s("plain_1")),
        Row("throughput per core, plain/vestad (job seconds)", "", ratio(s("plain_1"),
            s("vestad_1")), TARGET_CPU_RATIO, digits=3),
        Row("  same, with CLI wall time for vestad", "", ratio(s("plain_1"),
            s("vestad_1", "wall")), digits=3, note="includes the CLI's start and connect"),
        Row("  same, CPU seconds: plain process / job processes", "", ratio(s("plain_1", "cpu"),
            s("vestad_1", "job_cpu")), digits=3),
        Row("  vestad's own CPU during the 1-core job, % of it", "%",
            [100 * c / t for c, t in zip(s("vestad_1", "daemon_cpu"), s("vestad_1"),
                                         strict=True)], digits=2),
        Row(f"cpu {n}, 2 cores: vestad job seconds", "s", s("vestad_2")),
        Row(f"cpu {n}, 2 cores: plain multiprocessing split", "s", s("plain_2")),
        Row("speed-up 2 cores vs 1, vestad", "x", vestad_speedup, TARGET_SPEEDUP),
        Row("  ceiling: plain split 2 processes vs 1", "x", plain_speedup),
        Row("  vestad speed-up / plain speed-up", "", ratio(vestad_speedup, plain_speedup),
            digits=3),
    ]


def bench_status(daemons: Daemons, load: Load, samples: int, details: dict[str, Any],
                 ) -> list[Row]:
    """Measurement 3: the ``vesta status`` console script, interleaved with a bare interpreter
    start and one that only imports the CLI, against an idle daemon."""
    d = daemons.start("status")
    d.wait_ready()
    d.cli("status")  # the first call warms the page cache
    python = [sys.executable]
    argvs = {
        "status": [str(VESTA), "--socket", d.socket, "status"],
        "pass": [*python, "-c", "pass"],
        "import": [*python, "-c", "import vesta.apps.cli"],
    }
    times: dict[str, list[float]] = {k: [] for k in argvs}
    keys = list(argvs)
    with load.watch():
        for i in range(samples):
            for key in keys[i % 3:] + keys[:i % 3]:
                t0 = time.perf_counter()
                done = subprocess.run(argvs[key], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=clean_env(), check=False)
                times[key].append((time.perf_counter() - t0) * 1000)
                if done.returncode != 0:
                    raise BenchError(f"{argvs[key]} exited with {done.returncode}: "
                                     f"{done.stderr.decode(errors='replace').strip()}")
    daemons.stop(d)
    details["status_ms"] = {k: [round(v, 3) for v in vs] for k, vs in times.items()}
    details["status_foreign_cores"] = round(load.foreign_cores[-1], 3)
    p90 = percentile(times["status"], 90)
    details["status_p90_ms"] = round(p90, 3)
    return [
        Row("vesta status round trip (wall)", "ms", times["status"], TARGET_STATUS_MS,
            higher_is_better=False, digits=1, note=f"p90 {p90:.1f} ms"),
        Row("  p90 of the same", "ms", [p90], digits=1),
        Row("  python -c 'import vesta.apps.cli'", "ms", times["import"], digits=1),
        Row("  python -c pass (bare interpreter start)", "ms", times["pass"], digits=1),
        Row("  CLI imports (import - bare start, paired)", "ms",
            paired(times["import"], times["pass"]), digits=1),
        Row("  the rest: parse, connect, ask, print (status - import)", "ms",
            paired(times["status"], times["import"]), digits=1),
    ]


def paired(a: list[float], b: list[float]) -> list[float]:
    """Differences of samples taken back to back."""
    return [x - y for x, y in zip(a, b, strict=True)]


def snapshot(d: Daemon) -> dict[str, Any]:
    """CPU seconds per process, PSS of the tree, RSS of the main process, one line per process."""
    cpu: dict[int, float] = {}
    procs = []
    pss = 0
    rss_main = 0
    for p in d.tree():
        try:
            with p.oneshot():
                t = p.cpu_times()
                mem = p.memory_full_info()
                cmd = " ".join(p.cmdline())[:100]
        except psutil.NoSuchProcess:
            continue
        cpu[p.pid] = t.user + t.system
        pss += mem.pss
        if p.pid == d.pid:
            rss_main = mem.rss
        procs.append({"pid": p.pid, "cmdline": cmd, "pss_mib": round(mem.pss / MIB, 2),
                      "rss_mib": round(mem.rss / MIB, 2), "uss_mib": round(mem.uss / MIB, 2)})
    return {"t": time.perf_counter(), "cpu": cpu, "pss": pss, "rss_main": rss_main,
            "procs": procs}


def role(cmdline: str) -> str:
    """What a process of a daemon's tree is, from its command line."""
    for marker, name in (("forkserver", "fork server"), ("resource_tracker", "resource tracker"),
                         ("vestad", "vestad")):
        if marker in cmdline:
            return name
    return cmdline.split(" ", 1)[0]


def cpu_pct(a: dict[str, Any], b: dict[str, Any]) -> float:
    """CPU used between two snapshots, percent of one core."""
    used = sum(b["cpu"][pid] - a["cpu"].get(pid, 0.0) for pid in b["cpu"])
    return 100 * used / (b["t"] - a["t"])


def bench_idle(daemons: Daemons, load: Load, window: float, slices: int, details: dict[str, Any],
               ) -> list[Row]:
    """Measurement 4: two daemons idle side by side over the same window, one fresh and one that
    has run a small job; sampled at the end of each of ``slices`` equal slices of the window."""
    fresh = daemons.start("idle-fresh")
    used = daemons.start("idle-job")
    fresh.wait_ready()
    used.wait_ready()
    _, done = used.cli("--json", "cpu", "1")
    details["idle_small_job"] = json.loads(done.stdout)
    deadline = time.monotonic() + 10  # the job's processes end before the window starts
    while len(used.tree()) > 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    pair = {"fresh": fresh, "after_job": used}
    series: dict[str, list[dict[str, Any]]] = {k: [snapshot(d)] for k, d in pair.items()}
    t0 = time.monotonic()
    with load.watch():
        for i in range(1, slices + 1):
            time.sleep(max(0.0, t0 + window * i / slices - time.monotonic()))
            for key, d in pair.items():
                if not d.alive():
                    raise BenchError(f"vestad {d.name} died while idle:\n{d.log_tail()}")
                series[key].append(snapshot(d))
    details["idle_foreign_cores"] = round(load.foreign_cores[-1], 3)
    for d in pair.values():
        daemons.stop(d)

    rows = []
    labels = {"fresh": "idle, fresh", "after_job": "idle, after one job"}
    for key, snaps in series.items():
        slices_pct = [cpu_pct(a, b) for a, b in itertools.pairwise(snaps)]
        whole = cpu_pct(snaps[0], snaps[-1])
        end = snaps[-1]
        details[f"idle_{key}"] = {
            "window_seconds": round(end["t"] - snaps[0]["t"], 2),
            "cpu_pct_whole_window": round(whole, 4),
            "pss_mib_at_end": round(end["pss"] / MIB, 2),
            "rss_main_mib_at_end": round(end["rss_main"] / MIB, 2),
            "processes_at_end": end["procs"],
        }
        n = len(end["procs"])
        rows += [
            Row(f"{labels[key]}: PSS, all {n} processes", "MiB",
                [s["pss"] / MIB for s in snaps[1:]], TARGET_IDLE_PSS_MIB,
                higher_is_better=False, digits=1),
            Row(f"{labels[key]}: RSS, main process", "MiB",
                [s["rss_main"] / MIB for s in snaps[1:]], digits=1),
            Row(f"{labels[key]}: CPU, % of one core", "%", slices_pct, TARGET_IDLE_CPU_PCT,
                higher_is_better=False, digits=3, note=f"whole window {whole:.3f} %"),
        ]
    return rows


# -- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                                "vesta"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty.strip() else "")


def machine_facts() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "mem_total_mib": psutil.virtual_memory().total // MIB,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "interpreter": sys.executable,
        "vesta_version": __version__,
        "git_revision": git_revision(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of every interleaved comparison, at least 5 (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a shorter run to try the script: 10 s idle window, smaller cpu job")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                        help="where to write the JSON results (default bench/results/latest.json)")
    parser.add_argument("--cpu-n", type=int, default=None,
                        help="the N of `vesta cpu N` (default: chosen for a ~4 s run on one core)")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C, so that every daemon started is stopped
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: sys.exit(128 + signum))
    for program in (VESTAD, VESTA):
        if not program.exists():
            say(f"bench: {program} is missing: run the bench in an environment where vesta is "
                "installed, e.g. `tox -e bench`")
            return 2
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        say("bench: CPUs 0 and 1 must both be available")
        return 2
    facts = machine_facts()
    window = 10.0 if args.quick else 60.0
    status_samples = max(30, 8 * args.rounds)
    if args.cpu_n:
        n, unit = args.cpu_n, None
    else:
        n, unit = calibrate(QUICK_CPU_JOB_SECONDS if args.quick else CPU_JOB_SECONDS)
    settings = {"rounds": args.rounds, "quick": args.quick, "cpu_n": n,
                "unit_seconds_at_calibration": unit and round(unit, 4),
                "status_samples": status_samples, "idle_window_seconds": window,
                "vestad": str(VESTAD), "vesta": str(VESTA)}
    say(f"bench: vesta {__version__} from {BIN}; {facts['nproc']} x {facts['cpu_model']}; "
        f"cpu {n}, {args.rounds} rounds, idle window {window:g} s")

    details: dict[str, Any] = {}
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vesta-bench-") as tmp:
        daemons = Daemons(Path(tmp))
        load = Load(daemons.running)
        try:
            say("bench: cpu throughput and speed-up")
            rows += bench_cpu(daemons, load, n, args.rounds, details)
            say("bench: vesta status round trip")
            rows += bench_status(daemons, load, status_samples, details)
            say(f"bench: idle daemons over {window:g} s")
            rows += bench_idle(daemons, load, window, IDLE_SLICES, details)
        except BenchError as exc:
            say(f"bench: {exc}")
            return 1
        except (KeyboardInterrupt, SystemExit):
            say("bench: interrupted; stopping the daemons")
            raise
        finally:
            daemons.stop_all()
            for trouble in daemons.trouble:
                say(f"bench: {trouble}")
    facts["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    cpu_foreign = [run["foreign_cores"] for rs in details["cpu_runs"].values() for run in rs]
    details["foreign_cores_during_cpu_runs"] = {
        "median": round(statistics.median(cpu_foreign), 3), "max": round(max(cpu_foreign), 3)}
    details["vestad_stop_seconds"] = [round(s, 3) for s in daemons.stop_seconds]
    details["process_trouble"] = daemons.trouble
    settings["run_seconds"] = round(time.monotonic() - started, 1)

    print()
    print_table(rows)
    print()
    print(f"cpu {n} digest {details['cpu_digest'][:16]}... equal in all "
          f"{4 * args.rounds} runs (vestad and plain)")
    print(f"other programs on the machine used a median "
          f"{details['foreign_cores_during_cpu_runs']['median']:.2f} cores "
          f"(max {details['foreign_cores_during_cpu_runs']['max']:.2f}) during the cpu runs, "
          f"{details['status_foreign_cores']:.2f} during status, "
          f"{details['idle_foreign_cores']:.2f} during idle; "
          f"load average {facts['loadavg_at_start']} -> {facts['loadavg_at_end']}")
    busiest = max(details["foreign_cores_during_cpu_runs"]["median"],
                  details["status_foreign_cores"], details["idle_foreign_cores"])
    details["quiet_machine"] = busiest <= QUIET_CORES
    if busiest > QUIET_CORES:
        print(f"WARNING: other programs kept {busiest:.2f} cores busy: these figures are not "
              "reliable; run again on a quiet machine")
    for key in ("fresh", "after_job"):
        procs = details[f"idle_{key}"]["processes_at_end"]
        print(f"idle {key}: " + "; ".join(
            f"{role(p['cmdline'])} PSS {p['pss_mib']:.1f} MiB (RSS {p['rss_mib']:.1f}, "
            f"USS {p['uss_mib']:.1f})" for p in procs))
    print(f"run took {settings['run_seconds']:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": facts, "settings": settings, "results": [r.to_json() for r in rows],
           "details": details}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 1 if daemons.trouble else 0


if __name__ == "__main__":
    sys.exit(main())
