"""vesta's benchmarks: the figures of docs/performance.md, measured side by side in one run.

Run it with ``tox -e bench`` (or ``python bench/run.py`` from an environment where vesta is
installed): it starts the ``vestad`` and ``vesta`` programs installed next to the interpreter that
runs it. Every comparison is interleaved (A, B, A, B, ...) over at least five rounds and reported
as median and spread, because this machine's absolute figures move 20-40 % between runs. Every
daemon it starts binds 127.0.0.1 and finds its peers through ``-seed``; broadcast discovery is
measured only inside the network-namespace lab.

The measurements, by the name ``--only`` takes:

- ``cpu``: throughput per core, ``vesta --json cpu N`` on a vestad pinned to core 0 against a
  plain hashlib loop over the same units on the same core; and the speed-up on 2 cores beside
  the same-run ceiling of a plain ``multiprocessing`` split.
- ``status``: the ``vesta status`` round trip, interpreter start included, against a lone daemon
  and against one linked to a peer, beside a bare ``python -c pass``.
- ``idle``: idle vestads over one window: PSS of the whole process tree, main process RSS and
  CPU, for a fresh daemon, one that has run a job, and one linked to a peer.
- ``transport`` (bench/transport.py): sealed frames through vestad's IoLoop against raw loopback
  TCP with the same framing, 64 KiB and 1 MiB frames.
- ``remote`` (bench/federation.py): ``exec -- true`` placed on a peer against the same job kept
  local, daemon to daemon, median and p99.
- ``many``: 1,000 ``exec -- true`` submitted at once, jobs per second, against GNU parallel.
- ``pool`` (bench/pool.py): a cpu job split over two daemons of one core each, against one
  daemon and beside the same-run ceiling of a plain ``multiprocessing`` split; over a pool
  whose second node a cgroup holds to half a core, against the sum of the nodes' rates; and,
  when one node gets SIGKILL or SIGTERM mid-job, how soon its units go to the other; and,
  when a busy loop starts on a lender's core mid-job, how soon its lent work stops.
- ``discovery``: in the lab (root, ``ip netns``), the second daemon's start until both list each
  other.

Results go to a table on stdout and to bench/results/latest.json with the machine's facts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from federation import (
    MANY_JOBS,
    QUICK_MANY_JOBS,
    QUICK_REMOTE_JOBS,
    REMOTE_JOBS,
    bench_discovery,
    bench_many,
    bench_remote,
)
from harness import (
    BIN,
    MIB,
    ROOT,
    UNITS_PER_MILLION,
    VESTA,
    VESTAD,
    BenchError,
    Daemon,
    Daemons,
    Load,
    Row,
    calibrate,
    clean_env,
    cpu_pct,
    paired,
    percentile,
    plain_cpu,
    print_table,
    ratios,
    role,
    say,
    snapshot,
    tree_cpu,
)
from pool import bench_pool
from transport import bench_transport

from vesta import __version__

#: Targets: (comparison, value). A ratio must reach its target; a cost must stay within it.
TARGET_CPU_RATIO = 0.95
TARGET_SPEEDUP = 1.8
TARGET_STATUS_MS = 80.0
TARGET_STATUS_LINKED_BEYOND_PYTHON_MS = 35.0
TARGET_IDLE_PSS_MIB = 45.0
TARGET_IDLE_CPU_PCT = 0.5

#: The idle window is sampled at the end of each of this many equal slices.
IDLE_SLICES = 5

#: Seconds to wait for a job's processes to end before the idle window starts.
JOB_PROCESSES_TIMEOUT = 90.0

#: Other programs' load, in cores, above which the run is flagged as not reliable.
QUIET_CORES = 0.25

#: Seconds a 1-core cpu job should take (``--quick``: less).
CPU_JOB_SECONDS = 4.0
QUICK_CPU_JOB_SECONDS = 1.5

MEASUREMENTS = ("cpu", "status", "idle", "transport", "remote", "many", "pool", "discovery")


# -- the measurements ----------------------------------------------------------------------------


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


def bench_cpu(daemons: Daemons, load: Load, n: int, rounds: int, details: dict[str, Any],
              ) -> list[Row]:
    """Throughput per core and speed-up in one interleaved loop: V2, V1, P1, P2, then P2, P1,
    V1, V2, and so on, where V is vestad, P the plain loop, 1 core {0} and 2 cores {0, 1}. Each
    pair compared (V1-P1, V1-V2, P1-P2) runs back to back, since this machine's speed drifts
    within seconds."""
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

    vestad_speedup = ratios(s("vestad_1"), s("vestad_2"))
    plain_speedup = ratios(s("plain_1"), s("plain_2"))
    return [
        Row(f"cpu {n}, 1 core: vestad job seconds", "s", s("vestad_1")),
        Row(f"cpu {n}, 1 core: plain hashlib loop", "s", s("plain_1")),
        Row("throughput per core, plain/vestad (job seconds)", "", ratios(s("plain_1"),
            s("vestad_1")), TARGET_CPU_RATIO, digits=3),
        Row("  same, with CLI wall time for vestad", "", ratios(s("plain_1"),
            s("vestad_1", "wall")), digits=3, note="includes the CLI's start and connect"),
        Row("  same, CPU seconds: plain process / job processes", "", ratios(s("plain_1", "cpu"),
            s("vestad_1", "job_cpu")), digits=3),
        Row("  vestad's own CPU during the 1-core job, % of it", "%",
            [100 * c / t for c, t in zip(s("vestad_1", "daemon_cpu"), s("vestad_1"),
                                         strict=True)], digits=2),
        Row(f"cpu {n}, 2 cores: vestad job seconds", "s", s("vestad_2")),
        Row(f"cpu {n}, 2 cores: plain multiprocessing split", "s", s("plain_2")),
        Row("speed-up 2 cores vs 1, vestad", "x", vestad_speedup, TARGET_SPEEDUP),
        Row("  ceiling: plain split 2 processes vs 1", "x", plain_speedup),
        Row("  vestad speed-up / plain speed-up", "", ratios(vestad_speedup, plain_speedup),
            digits=3),
    ]


def bench_status(daemons: Daemons, load: Load, samples: int, details: dict[str, Any],
                 ) -> list[Row]:
    """The ``vesta status`` console script against a lone idle daemon and against one linked to
    a peer, interleaved with a bare interpreter start and one that only imports the CLI."""
    d = daemons.start("status")
    linked, peer = daemons.pair(("status-linked", "status-peer"))
    d.wait_ready()
    python = [sys.executable]
    argvs = {
        "status": [str(VESTA), "--socket", d.socket, "status"],
        "linked": [str(VESTA), "--socket", linked.socket, "status"],
        "pass": [*python, "-c", "pass"],
        "import": [*python, "-c", "import vesta.apps.cli"],
    }
    for argv in (argvs["status"], argvs["linked"]):  # the first calls warm the page cache
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(),
                       check=False)
    times: dict[str, list[float]] = {k: [] for k in argvs}
    keys = list(argvs)
    with load.watch():
        for i in range(samples):
            shift = i % len(keys)
            for key in keys[shift:] + keys[:shift]:
                t0 = time.perf_counter()
                done = subprocess.run(argvs[key], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=clean_env(), check=False)
                times[key].append((time.perf_counter() - t0) * 1000)
                if done.returncode != 0:
                    raise BenchError(f"{argvs[key]} exited with {done.returncode}: "
                                     f"{done.stderr.decode(errors='replace').strip()}")
    peers = [p["name"] for p in linked.peers() if p["state"] == "up"]
    if peers != [peer.name]:
        raise BenchError(f"vestad {linked.name} lost its peer during the status runs: {peers}")
    for each in (d, linked, peer):
        daemons.stop(each)
    details["status_ms"] = {k: [round(v, 3) for v in vs] for k, vs in times.items()}
    p90 = {k: percentile(times[k], 90) for k in ("status", "linked")}
    details["status_p90_ms"] = {k: round(v, 3) for k, v in p90.items()}
    return [
        Row("vesta status round trip (wall)", "ms", times["status"], TARGET_STATUS_MS,
            higher_is_better=False, digits=1, note=f"p90 {p90['status']:.1f} ms"),
        Row("  p90 of the same", "ms", [p90["status"]], digits=1),
        Row("  python -c 'import vesta.apps.cli'", "ms", times["import"], digits=1),
        Row("  python -c pass (bare interpreter start)", "ms", times["pass"], digits=1),
        Row("  CLI imports (import - bare start, paired)", "ms",
            paired(times["import"], times["pass"]), digits=1),
        Row("  the rest: parse, connect, ask, print (status - import)", "ms",
            paired(times["status"], times["import"]), digits=1),
        Row("vesta status, daemon linked to a peer (wall)", "ms", times["linked"], digits=1,
            note=f"p90 {p90['linked']:.1f} ms"),
        Row("  linked status - bare interpreter start (paired)", "ms",
            paired(times["linked"], times["pass"]), TARGET_STATUS_LINKED_BEYOND_PYTHON_MS,
            higher_is_better=False, digits=1),
        Row("  linked status - lone status (paired)", "ms",
            paired(times["linked"], times["status"]), digits=1),
    ]


def bench_idle(daemons: Daemons, load: Load, window: float, slices: int, details: dict[str, Any],
               ) -> list[Row]:
    """Daemons idle side by side over the same window: one fresh, one that has run a small job,
    and one linked to a peer on loopback (heartbeats every 0.5 s, beacons every second); sampled
    at the end of each of ``slices`` equal slices of the window."""
    fresh = daemons.start("idle-fresh")
    used = daemons.start("idle-job")
    linked, peer = daemons.pair(("idle-linked", "idle-peer"))
    fresh.wait_ready()
    used.wait_ready()
    _, done = used.cli("--json", "cpu", "1")
    details["idle_small_job"] = json.loads(done.stdout)
    # The window starts once the job's processes are gone (a warm worker waits a while for
    # another task before it retires): vestad, its fork server and the resource tracker stay.
    t0 = time.monotonic()
    while len(used.tree()) > 3 and time.monotonic() < t0 + JOB_PROCESSES_TIMEOUT:
        time.sleep(0.1)
    details["idle_job_processes_gone_after_s"] = round(time.monotonic() - t0, 1)
    if len(used.tree()) > 3:
        say(f"  the job's processes still run after {JOB_PROCESSES_TIMEOUT:g} s; measuring anyway")
    time.sleep(1.0)
    pair = {"fresh": fresh, "after_job": used, "linked": linked, "peer": peer}
    series: dict[str, list[dict[str, Any]]] = {k: [snapshot(d)] for k, d in pair.items()}
    t0 = time.monotonic()
    with load.watch():
        for i in range(1, slices + 1):
            time.sleep(max(0.0, t0 + window * i / slices - time.monotonic()))
            for key, d in pair.items():
                if not d.alive():
                    raise BenchError(f"vestad {d.name} died while idle:\n{d.log_tail()}")
                series[key].append(snapshot(d))
    peers = [p["name"] for p in linked.peers() if p["state"] == "up"]
    if peers != [peer.name]:
        raise BenchError(f"vestad {linked.name} lost its peer while idle: {peers}")
    for d in pair.values():
        daemons.stop(d)

    rows = []
    labels = {"fresh": "idle, fresh", "after_job": "idle, after one job",
              "linked": "idle, linked to a peer"}
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
        if key not in labels:  # the peer: in the JSON only, it is the linked daemon's twin
            continue
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
                        help="a shorter run to try the script: 10 s idle window, smaller cpu "
                        "job, fewer jobs and bytes")
    parser.add_argument("--only", metavar="NAME[,NAME]", default=",".join(MEASUREMENTS),
                        help=f"run only these measurements, of: {', '.join(MEASUREMENTS)} "
                        "(default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json",
                        help="where to write the JSON results (default bench/results/latest.json)")
    parser.add_argument("--cpu-n", type=int, default=None,
                        help="the N of `vesta cpu N` (default: chosen for a ~4 s run on one core)")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in MEASUREMENTS]
    if unknown or not only:
        parser.error(f"--only takes names of: {', '.join(MEASUREMENTS)}; not {args.only!r}")
    args.only = [name for name in MEASUREMENTS if name in only]
    return args


def compile_vesta() -> bool:
    """Write vesta's bytecode where it is imported from, as ``pip install`` does, so that the
    programs measured do not compile their modules at every start: an editable install, or an
    environment with PYTHONDONTWRITEBYTECODE, would otherwise count the compiler in every
    ``vesta status``. Whether every module compiled."""
    import compileall

    import vesta

    return bool(compileall.compile_dir(os.path.dirname(vesta.__file__), quiet=1, force=False))


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
    compiled = compile_vesta()
    facts = machine_facts()
    window = 10.0 if args.quick else 60.0
    status_samples = max(30, 8 * args.rounds)
    remote_jobs = QUICK_REMOTE_JOBS if args.quick else REMOTE_JOBS
    many_jobs = QUICK_MANY_JOBS if args.quick else MANY_JOBS
    n: int | None = None
    unit = None
    if "cpu" in args.only:
        if args.cpu_n:
            n = args.cpu_n
        else:
            n, unit = calibrate(QUICK_CPU_JOB_SECONDS if args.quick else CPU_JOB_SECONDS)
    settings = {"rounds": args.rounds, "quick": args.quick, "only": args.only, "cpu_n": n,
                "unit_seconds_at_calibration": unit and round(unit, 4),
                "status_samples": status_samples, "idle_window_seconds": window,
                "remote_jobs": remote_jobs, "many_jobs": many_jobs, "bytecode_compiled": compiled,
                "vestad": str(VESTAD), "vesta": str(VESTA)}
    say(f"bench: vesta {__version__} from {BIN}; {facts['nproc']} x {facts['cpu_model']}; "
        f"{args.rounds} rounds; {', '.join(args.only)}")

    failed: dict[str, str] = {}
    details: dict[str, Any] = {"foreign_cores": {}, "failed": failed}
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vesta-bench-") as tmp:
        daemons = Daemons(Path(tmp))
        load = Load(daemons.running)
        runs: dict[str, tuple[str, Callable[[], list[Row]]]] = {
            "cpu": (f"cpu throughput and speed-up, cpu {n}",
                    lambda: bench_cpu(daemons, load, n or 1, args.rounds, details)),
            "status": ("vesta status round trip, lone and linked",
                       lambda: bench_status(daemons, load, status_samples, details)),
            "idle": (f"idle daemons over {window:g} s, lone and linked",
                     lambda: bench_idle(daemons, load, window, IDLE_SLICES, details)),
            "transport": ("sealed transport against raw TCP",
                          lambda: bench_transport(load, args.rounds, args.quick, details)),
            "remote": (f"exec true on a peer against local, {remote_jobs} jobs each",
                       lambda: bench_remote(daemons, load, remote_jobs, details)),
            "many": (f"{many_jobs} small jobs at once against GNU parallel",
                     lambda: bench_many(daemons, load, many_jobs, args.rounds, details)),
            "pool": ("a cpu job split over a pool: two nodes, an uneven pair, a node lost, "
                     "an owner back",
                     lambda: bench_pool(daemons, load, args.rounds, args.quick, details)),
            "discovery": ("discovery in the network-namespace lab",
                          lambda: bench_discovery(load, args.rounds, details)),
        }
        try:
            for name in args.only:
                what, run = runs[name]
                say(f"bench: {what}")
                mark = len(load.foreign_cores)
                try:
                    rows += run()
                except BenchError as exc:  # the other measurements still count
                    say(f"bench: {name} failed: {exc}")
                    failed[name] = str(exc)
                    for d in list(daemons.running):
                        daemons.stop(d)
                if len(load.foreign_cores) > mark:
                    details["foreign_cores"][name] = round(load.since(mark), 3)
        except (KeyboardInterrupt, SystemExit):
            say("bench: interrupted; stopping the daemons")
            raise
        finally:
            daemons.stop_all()
            for trouble in daemons.trouble:
                say(f"bench: {trouble}")
    facts["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    details["vestad_stop_seconds"] = [round(s, 3) for s in daemons.stop_seconds]
    details["process_trouble"] = daemons.trouble
    settings["run_seconds"] = round(time.monotonic() - started, 1)

    print()
    print_table(rows)
    print()
    if "cpu_digest" in details:
        print(f"cpu {n} digest {details['cpu_digest'][:16]}... equal in all "
              f"{4 * args.rounds} runs (vestad and plain)")
    pool = details.get("pool", {})
    if "failover" in pool:
        split, small = pool["split"], pool["uneven"]
        small_runs = sum(len(runs) for part in ("uneven", "failover", "reclaim")
                         for runs in pool.get(part, {}).get("runs", {}).values())
        print(f"pool: cpu {split['n']} digest {split['digest'][:16]}... equal in all "
              f"{sum(map(len, split['runs'].values()))} runs (one node, split, plain); cpu "
              f"{small['n']} digest {small['digest'][:16]}... in all "
              f"{small_runs} "
              "(one node, split, uneven, a node stopped mid-job, an owner busy mid-job)")
    foreign = details["foreign_cores"]
    print("other programs on the machine used a median of " + ", ".join(
        f"{cores:.2f} cores during {name}" for name, cores in foreign.items())
        + f"; load average {facts['loadavg_at_start']} -> {facts['loadavg_at_end']}")
    busiest = max(foreign.values(), default=0.0)
    details["quiet_machine"] = busiest <= QUIET_CORES
    if busiest > QUIET_CORES:
        print(f"WARNING: other programs kept {busiest:.2f} cores busy: these figures are not "
              "reliable; run again on a quiet machine")
    for key in ("fresh", "after_job", "linked"):
        if f"idle_{key}" in details:
            procs = details[f"idle_{key}"]["processes_at_end"]
            print(f"idle {key}: " + "; ".join(
                f"{role(p['cmdline'])} PSS {p['pss_mib']:.1f} MiB (RSS {p['rss_mib']:.1f}, "
                f"USS {p['uss_mib']:.1f})" for p in procs))
    if "remote" in details and details["remote"]["misplaced"]:
        print(f"remote: {len(details['remote']['misplaced'])} jobs ran on another node than "
              "asked and were left out")
    for name, error in failed.items():
        print(f"FAILED: {name}: {error.splitlines()[0]}")
    print(f"run took {settings['run_seconds']:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": facts, "settings": settings, "results": [r.to_json() for r in rows],
           "details": details}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 1 if daemons.trouble or failed else 0


if __name__ == "__main__":
    sys.exit(main())
