"""What every measurement of the bench shares: result rows, the watch on other programs' load,
the plain hashlib loop that vesta's cpu jobs are compared with, and the daemons it starts (each
bound to 127.0.0.1 on ports of its own)."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from vesta.client import Client, VestaError
from vesta.workers.supervisor import own_cgroup_dir

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VESTAD = BIN / "vestad"
VESTA = BIN / "vesta"
KEY = "bench-federation-key-" + secrets.token_hex(8)
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Every daemon the bench starts listens here and finds its peers through -seed: nothing it
#: starts broadcasts on the machine's real interfaces (vestad broadcasts only on the interface
#: that holds -bind, and loopback has none).
LOOPBACK = "127.0.0.1"
#: The units of ``vesta cpu N`` (SPEC): 10 per million iterations, each 100,000 chained SHA-256.
UNITS_PER_MILLION = 10
UNIT_ITERATIONS = 100_000


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


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def paired(a: list[float], b: list[float]) -> list[float]:
    """Differences of samples taken back to back."""
    return [x - y for x, y in zip(a, b, strict=True)]


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Ratios of samples taken back to back."""
    return [x / y for x, y in zip(a, b, strict=True)]


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
    """CPU seconds of a daemon's own processes, and of its job processes, alive or reaped.

    The daemon's own are its main process and that process's children (the fork server and
    multiprocessing's resource tracker); the processes below them are job processes, warm or
    running, and the children reaped in the tree were job processes too.
    """
    own = jobs = 0.0
    try:
        root = psutil.Process(pid)
        mine = {pid, *(c.pid for c in root.children())}
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return own, jobs
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            if p.pid in mine:
                own += t.user + t.system
            else:
                jobs += t.user + t.system
            jobs += t.children_user + t.children_system
    return own, jobs


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
    """Watches how much CPU other programs use while something is measured.

    Ours is this process, the children it has waited for, every daemon running and the process
    trees in ``extra`` (children not yet waited for: the transport's processes, the lab's daemons).
    """

    daemons: list[Daemon]
    foreign_cores: list[float] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)

    def ours(self) -> float:
        return (own_cpu_seconds()
                + sum(tree_cpu_seconds(d.pid) for d in self.daemons if d.alive())
                + sum(tree_cpu_seconds(pid) for pid in self.extra))

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        t0, busy0, ours0 = time.perf_counter(), machine_busy_seconds(), self.ours()
        yield
        wall = time.perf_counter() - t0
        foreign = (machine_busy_seconds() - busy0) - (self.ours() - ours0)
        self.foreign_cores.append(max(0.0, foreign / wall))

    def since(self, mark: int) -> float:
        """The median foreign load of the watches since ``mark`` (a length of foreign_cores)."""
        return statistics.median(self.foreign_cores[mark:]) if self.foreign_cores[mark:] else 0.0


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


# -- daemons -------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VESTA_")}


def free_port(kind: int, host: str) -> int:
    """A port nobody listens on now (the kernel's pick; taken again at once by the daemon)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    """A daemon's peer port (TCP, on 127.0.0.1) and discovery port (UDP, every address)."""

    port: int
    dport: int

    @classmethod
    def reserve(cls) -> Ports:
        return cls(free_port(socket.SOCK_STREAM, LOOPBACK), free_port(socket.SOCK_DGRAM, ""))

    @property
    def seed(self) -> str:
        return f"{LOOPBACK}:{self.dport}"


class Daemon:
    """A vestad started for the bench, with its own name, state directory, control socket and
    ports, bound to 127.0.0.1; ``seeds`` are the peers it finds (their discovery ports).

    With ``cgroup`` (a cgroup's directory), the daemon starts in that cgroup, so that its job
    processes, which it starts below itself, are held to the cgroup's limits too.
    """

    def __init__(self, workdir: Path, label: str, cpus: set[int] | None = None,
                 ports: Ports | None = None, seeds: Sequence[Ports] = (),
                 extra: Sequence[str] = (), cgroup: Path | None = None) -> None:
        self.name = f"{label}-{secrets.token_hex(3)}"
        self.socket = f"/tmp/vestad-bench-{self.name}.sock"
        self.log = workdir / f"{self.name}.log"
        self.cpus = cpus
        self.cgroup = cgroup
        self.ports = ports or Ports.reserve()
        self.stop_seconds: float | None = None
        self.signalled: int | None = None
        self.orphans: list[psutil.Process] = []
        self.cgroup2: str | None = None
        args = [str(VESTAD), "-name", self.name, "-state-dir", str(workdir / self.name),
                "-socket", self.socket, "-key", KEY, "-bind", LOOPBACK,
                "-port", str(self.ports.port), "-dport", str(self.ports.dport), *extra]
        if seeds:
            args += ["-seed", ",".join(p.seed for p in seeds)]

        def place() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=clean_env(),
                preexec_fn=place if cpus is not None or cgroup is not None else None,
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

    def status(self) -> dict[str, Any]:
        with Client(self.socket, timeout=10) as client:
            return client.status()

    def peers(self) -> list[dict[str, Any]]:
        with Client(self.socket, timeout=10) as client:
            return client.peers()

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

    def send_signal(self, signum: int) -> float:
        """Send the daemon ``signum`` now, as its machine's owner or a crash would (SIGKILL, or
        SIGTERM); returns the ``perf_counter`` time it was sent. Its processes are left to end
        by themselves: :meth:`stop` then waits for them and reports any left behind."""
        self.orphans = self.tree()[1:]
        self.signalled = signum
        with contextlib.suppress(OSError):
            self.cgroup2 = own_cgroup_dir(Path(f"/proc/{self.pid}/cgroup").read_text(),
                                          Path("/proc/self/mountinfo").read_text())
        sent = time.perf_counter()
        self.proc.send_signal(signum)
        return sent

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM (unless :meth:`send_signal` sent one already), wait, and make sure no process
        of the daemon is left; returns any trouble."""
        trouble = []
        children = list({p.pid: p for p in [*self.orphans, *self.tree()[1:]]}.values())
        if self.alive():
            t0 = time.perf_counter()
            if self.signalled is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                if self.signalled is None:
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
        if self.signalled == signal.SIGKILL and self.cgroup2 is not None:
            # a vestad that gets SIGKILL cannot remove its job processes' cgroups
            for left in Path(self.cgroup2).glob(f"vestad-{self.name}.*"):
                problem = remove_cgroup(left)
                if problem:
                    trouble.append(problem)
        with contextlib.suppress(OSError):
            Path(self.socket).unlink()
        return trouble


def remove_cgroup(path: Path, timeout: float = 10.0) -> str | None:
    """Remove a cgroup and those below it, deepest first, once their processes are gone (within
    ``timeout`` seconds); the trouble if it cannot be."""
    if not path.exists():
        return None
    below = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    deadline = time.monotonic() + timeout
    for each in [*below, path]:
        while True:
            try:
                each.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    return f"the cgroup {each} could not be removed: {exc}"
                time.sleep(0.1)
    return None


def linked(d: Daemon, other: Daemon) -> bool:
    """Whether ``d`` lists ``other`` as an up peer and has heard what it offers."""
    return any(p["name"] == other.name and p["state"] == "up" and "offer_workers" in p
               for p in d.peers())


class Daemons:
    """Every daemon of the run, so that each is stopped whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Daemon] = []
        self.trouble: list[str] = []
        self.stop_seconds: list[float] = []

    def start(self, label: str, cpus: set[int] | None = None, ports: Ports | None = None,
              seeds: Sequence[Ports] = (), extra: Sequence[str] = (),
              cgroup: Path | None = None) -> Daemon:
        d = Daemon(self.workdir, label, cpus, ports, seeds, extra, cgroup)
        self.running.append(d)
        return d

    def pair(self, labels: tuple[str, str], cpus: tuple[set[int] | None, set[int] | None] = (
             None, None), extra: tuple[Sequence[str], Sequence[str]] = ((), ()),
             timeout: float = 20.0) -> tuple[Daemon, Daemon]:
        """Two daemons on loopback that seed each other; returns once both list the other up."""
        pa, pb = Ports.reserve(), Ports.reserve()
        a = self.start(labels[0], cpus[0], pa, [pb], extra[0])
        b = self.start(labels[1], cpus[1], pb, [pa], extra[1])
        a.wait_ready()
        b.wait_ready()
        deadline = time.monotonic() + timeout
        while not (linked(a, b) and linked(b, a)):
            if time.monotonic() > deadline:
                raise BenchError(f"vestad {a.name} and {b.name} did not link in {timeout:g} s:\n"
                                 f"{a.log_tail(5)}\n{b.log_tail(5)}")
            time.sleep(0.05)
        return a, b

    def stop(self, d: Daemon) -> None:
        self.trouble += d.stop()
        if d.stop_seconds is not None:
            self.stop_seconds.append(d.stop_seconds)
        self.running.remove(d)

    def stop_all(self) -> None:
        for d in list(self.running):
            self.stop(d)


# -- memory and CPU of a daemon's tree -----------------------------------------------------------


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
