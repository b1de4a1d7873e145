"""Several vestad hosts in the network lab: discovery, keys, seeds, spill, exec rights, failures.

Every daemon runs in a host of the lab (its own network namespace, hostname and, where it
matters, its own CPU), on the default ports 7777 and 7778, found by broadcast beacons or
``-seed``; the CLI talks to each through its control socket from this process. The lab tears
every daemon and namespace down after each test, whatever its outcome.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import KEY, python_env, wait_for
from tests.lab.conftest import LabDaemon, start_vestad
from tests.lab.netlab import Lab
from vesta.client import Client
from vesta.messages import CpuJob, JobDone
from vesta.workers import supervisor

pytestmark = pytest.mark.timeout(90)

DPORT = 7778  # the default discovery port: each host has its own network namespace
OTHER_KEY = "another-federation-key-9876543210"
#: SPEC's contract is 5 s; this is the target.
DISCOVERY_TARGET_S = 1.0
#: The heartbeat's verdict (dead after 2 s of silence) and the slack allowed on top.
DEAD_AFTER_S = 2.0
SLACK_S = 1.0
#: A stopping peer's part is placed again within this: it says it leaves, nothing times out.
REPLACED_AFTER_TERM_S = 0.5
#: The cpu job cut off mid-way in the failure tests: 40 units, about 2 s on one idle core here,
#: run on pi4 as one part (desk is busy, so it is not split).
FAILOVER_N = 4
#: How often the daemons of the spill and failure tests sample their load and announce it
#: (``-advertise-spare``; the default is 1 s).
SAMPLE_S = 0.25
SAMPLED = ("-advertise-spare", str(int(SAMPLE_S * 1000)))
#: The default ``spill_cpu_pct``: desk spills above it, and a peer reading above it is busy.
SPILL_PCT = 80
PEER_KEYS = {"name", "address", "fingerprint", "cpu_pct", "mem_available_mb", "power",
             "last_seen_s", "version", "willingness", "cores", "state"}


def two_cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs, one for each pinned host")
    return cpus[0], cpus[-1]


# -- talking to the daemons ------------------------------------------------------------------------


def cli_json(d: LabDaemon, *args: str, timeout: float = 60) -> dict[str, Any]:
    """``vesta --json ARGS`` on ``d``, which must succeed; its document."""
    result = d.cli("--json", *args, timeout=timeout)
    assert result.returncode == 0, f"vesta {' '.join(args)}: {result.stderr}"
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def peers(d: LabDaemon) -> list[dict[str, Any]]:
    """``vesta --json peers`` on ``d``."""
    listed: list[dict[str, Any]] = cli_json(d, "peers")["peers"]
    return listed


# Polling loops send the requests `vesta --json peers` and `vesta --json status` make from this
# process: a round trip of about a millisecond, where a CLI start costs some 70 ms of CPU, which
# on this two-core machine would weigh on the very loads being measured.


def quick_peers(d: LabDaemon) -> list[dict[str, Any]]:
    with Client(d.socket, timeout=5) as client:
        return client.peers()


def quick_status(d: LabDaemon) -> dict[str, Any]:
    with Client(d.socket, timeout=5) as client:
        return client.status()


def state_of(listed: list[dict[str, Any]], name: str) -> str | None:
    """The state of the peer called ``name`` in a peer list, None if it is not listed."""
    return next((p["state"] for p in listed if p["name"] == name), None)


def up(d: LabDaemon, name: str) -> bool:
    return state_of(quick_peers(d), name) == "up"


def fingerprint(d: LabDaemon) -> str:
    fp: str = quick_status(d)["node"]["fingerprint"]
    return fp


def stress(desk: LabDaemon) -> None:
    """Pin every core of desk for 30 s (the seed's ``vesta stress 0 30``) and wait until its load
    reads 80% or more on every poll for two sampling rounds: the reading just after the stress
    starts may still be a high one from before (the daemon's own start-up) or one taken across
    the start, below the line."""
    assert desk.cli("stress", "0", "30").returncode == 0
    since: list[float] = []

    def busy_for_two_rounds() -> bool:
        if quick_status(desk)["node"]["cpu_pct"] < 80:
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= 2 * SAMPLE_S + 0.2

    wait_for(busy_for_two_rounds, timeout=15,
             what=f"{desk.name} to read 80% CPU or more under stress")


def idle_peer(desk: LabDaemon, name: str) -> None:
    """Wait until desk sees its peer ``name`` below the spill line: an idle node to spill to
    (a peer at the line is busy too, and the job waits on desk instead)."""
    wait_for(lambda: any(p["name"] == name and p["state"] == "up" and p["cpu_pct"] < SPILL_PCT
                         for p in quick_peers(desk)), timeout=20,
             what=f"desk to see {name} below the {SPILL_PCT}% spill line (is something else "
                  "on this machine keeping its CPU busy?)")


#: Submissions of a job meant to spill to the idle pi4. Other work on this machine can lift
#: pi4's load across the spill line between desk seeing it idle and desk placing the job, and
#: then the job rightly waits on desk: it is submitted again, at most this many times in all.
SPILL_TRIES = 3


def spill_to_pi4(desk: LabDaemon, submit: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``submit()`` a job on desk (which is busy) once it sees pi4 idle; its result, from the
    first submission that ran on pi4, else the last."""
    for attempt in range(1, SPILL_TRIES + 1):
        idle_peer(desk, "pi4")
        result = submit()
        if [p["node"] for p in result["placements"]] == ["pi4"]:
            break
        print(f"\nattempt {attempt}: ran on {result['placements']}, pi4 busy at placement?")
    return result


@functools.cache
def reference_digest(n: int, seed: int = 0) -> str:
    """The digest of ``cpu N`` computed here from SPEC's definition, independently of vesta."""
    sha = hashlib.sha256
    results = []
    for i in range(10 * n):
        h = sha(b"vesta:%d:%d" % (seed, i)).digest()
        for _ in range(100_000):
            h = sha(h).digest()
        results.append(h)
    return sha(b"".join(results)).hexdigest()


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def pair(lab: Lab, pin_here: Callable[[int], None]) -> Iterator[tuple[LabDaemon, LabDaemon]]:
    """desk and pi4 on subnet 0, each pinned to a CPU of its own, pi4 lending exec; linked."""
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED)
    pi4 = start_vestad(pi4_host, "pi4", KEY, "-allow-exec", *SAMPLED)
    wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10,
             what="desk and pi4 to link")
    yield desk, pi4


# -- 1. discovery ----------------------------------------------------------------------------------


def test_two_nodes_on_a_subnet_find_each_other_within_a_second(
    lab: Lab, record_property: Callable[[str, object], None]
) -> None:
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    desk = start_vestad(desk_host, "desk", KEY)
    started = time.monotonic()
    pi4 = start_vestad(pi4_host, "pi4", KEY)  # returns once pi4's control socket answers
    answered = time.monotonic() - started

    def both_up() -> bool:
        return (state_of(quick_peers(desk), "pi4") == "up"
                and state_of(quick_peers(pi4), "desk") == "up")

    wait_for(both_up, timeout=10, interval=0.02, what="desk and pi4 to list each other as up")
    elapsed = time.monotonic() - started
    print(f"\ndiscovery: {elapsed:.3f} s from pi4's process start until both list the "
          f"other as up (pi4 answered on its control socket after {answered:.3f} s; "
          f"target {DISCOVERY_TARGET_S} s, contract 5 s)")
    record_property("discovery_s", round(elapsed, 3))
    record_property("pi4_answered_s", round(answered, 3))

    # what the CLI shows, and what each says of the other
    for here, there in ((desk, pi4), (pi4, desk)):
        (peer,) = peers(here)
        assert peer.keys() >= PEER_KEYS, PEER_KEYS - peer.keys()
        assert peer["name"] == there.name and peer["state"] == "up"
        assert peer["address"] == there.host.address
        assert peer["fingerprint"] == fingerprint(there)
        assert peer["cores"] == 1  # pinned: the CPUs of its affinity mask
        assert peer["power"] in ("grid", "solar", "battery", "empty")
        assert 0 <= peer["willingness"] <= 1 and peer["last_seen_s"] >= 0
    assert elapsed <= DISCOVERY_TARGET_S, (
        f"discovery took {elapsed:.3f} s, target {DISCOVERY_TARGET_S} s; pi4's start-up until "
        f"its control socket answered took {answered:.3f} s of it")


# -- 2. keys ---------------------------------------------------------------------------------------


def test_a_node_with_another_key_is_invisible_both_ways(lab: Lab) -> None:
    cpu_desk, cpu_pi4 = two_cpus()
    fast = ("-advertise-spare", "200")
    desk = start_vestad(lab.add_host("desk", cpu=cpu_desk), "desk", KEY, *fast)
    pi4 = start_vestad(lab.add_host("pi4", cpu=cpu_pi4), "pi4", KEY, *fast)
    stranger = start_vestad(lab.add_host("stranger"), "stranger", OTHER_KEY, *fast)
    wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10,
             what="desk and pi4 to link")
    members = {fingerprint(desk), fingerprint(pi4)}
    outsider = fingerprint(stranger)

    def invisible_until_many_beacons_dropped() -> bool:
        for d in (desk, pi4):  # checked on every round: never listed, not even for a moment
            listed = quick_peers(d)
            assert outsider not in {p["fingerprint"] for p in listed}, f"{d.name} lists it"
            assert "stranger" not in {p["name"] for p in listed}
        assert not members & {p["fingerprint"] for p in quick_peers(stranger)}, "it lists one"
        counts = [quick_status(d)["counters"].get("beacons_other_key", 0)
                  for d in (desk, pi4, stranger)]
        return min(counts) >= 5  # each has turned away several beacons of the other key

    wait_for(invisible_until_many_beacons_dropped, timeout=15, interval=0.1,
             what="each node to drop several beacons of the other key")
    counters = desk.status()["counters"]
    assert counters["dropped_beacons"] > 0 and counters["beacons_other_key"] > 0
    assert peers(stranger) == []
    assert [p["name"] for p in peers(desk)] == ["pi4"]
    assert [p["name"] for p in peers(pi4)] == ["desk"]
    for d in (desk, pi4, stranger):
        assert d.proc.poll() is None, f"{d.name} exited:\n{d.log_text()}"


# -- 3. seeds across subnets -----------------------------------------------------------------------


def stays(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Check ``predicate`` on every poll for ``seconds``: an observation window, not a wait."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), what


def test_seeds_link_across_subnets_and_only_where_given(lab: Lab) -> None:
    fast = ("-advertise-spare", "200")
    desk_host = lab.add_host("desk", subnet_index=0)
    far_host = lab.add_host("far", subnet_index=1)
    lone_host = lab.add_host("lone", subnet_index=1)
    desk = start_vestad(desk_host, "desk", KEY, "-seed", f"{far_host.address}:{DPORT}", *fast)
    far = start_vestad(far_host, "far", KEY, "-seed", f"{desk_host.address}:{DPORT}", *fast)
    lone = start_vestad(lone_host, "lone", KEY, *fast)  # no seeds, and nobody seeds it

    wait_for(lambda: up(desk, "far") and up(far, "desk"), timeout=10,
             what="desk and far to link through their seeds")
    (shown,) = [p for p in peers(desk) if p["name"] == "far"]
    assert shown["address"] == far_host.address
    # lone works: it finds far, which shares its subnet, by broadcast
    wait_for(lambda: up(lone, "far") and up(far, "lone"), timeout=10,
             what="lone and far, on one subnet, to link")

    def apart() -> bool:
        return ("lone" not in {p["name"] for p in quick_peers(desk)}
                and "desk" not in {p["name"] for p in quick_peers(lone)})

    # about ten beacon rounds at 200 ms: broadcasts do not cross, and nothing else tells of lone
    stays(apart, 2.0, "lone and desk found each other without a seed")
    assert desk.status()["counters"].get("beacons_other_key", 0) == 0


# -- 4. spill, and the seed's quick start ----------------------------------------------------------


def test_work_spills_to_the_idle_peer_as_in_the_quick_start(
    lab: Lab, pin_here: Callable[[int], None]
) -> None:
    expected = reference_digest(2)  # before the daemons start: it takes a CPU for a second
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    pi4 = start_vestad(pi4_host, "pi4", KEY, "-allow-exec", *SAMPLED)
    # the same job on an idle node: pi4 itself, alone for now, so it runs there whatever else
    # loads this machine (in a pair, a pi4 at the spill line would send it to desk)
    idle = cli_json(pi4, "cpu", "2")
    assert [p["node"] for p in idle["placements"]] == ["pi4"]
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED)
    wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10,
             what="desk and pi4 to link")
    stress(desk)
    try:
        spilled = spill_to_pi4(desk, lambda: cli_json(desk, "cpu", "2"))
        assert [(p["node"], p["units"]) for p in spilled["placements"]] == [("pi4", 20)]
        assert spilled["digest"] == idle["digest"] == expected

        there = spill_to_pi4(desk, lambda: exec_json(desk, "hostname"))
        assert (there["node"], there["stdout"]) == ("pi4", "pi4\n")
        idle_peer(desk, "pi4")
        shown = desk.cli("exec", "--", "hostname")  # as people see it
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout in ("pi4\n", "desk\n")  # desk only if pi4 turned busy meanwhile
        assert shown.stdout.strip() in shown.stderr  # the CLI names the node that ran it

        # the seed's `vesta exec -- ./piwork 100`, smaller: ./piwork is not in the fresh working
        # directory, so it is looked up as piwork on pi4's PATH and beside its vestad
        pi = spill_to_pi4(desk, lambda: exec_json(desk, "./piwork", "2"))
        assert pi["exit_code"] == 0, pi["stderr"]
        rows = dict(line.split(None, 1) for line in pi["stdout"].splitlines())
        assert rows["host"] == "pi4", pi["stdout"]
        assert rows["samples"] == "2,000,000"
        assert rows["cores"] == "1"  # lent: confined to the CPUs pi4 offers
        assert 3.1 < float(rows["pi"]) < 3.2
    finally:
        stopped = desk.cli("stop-stress")
    assert stopped.returncode == 0, stopped.stderr


@contextlib.contextmanager
def throttled(pid: int, share: float) -> Iterator[Callable[[float], None]]:
    """Hold a process, and every process it starts afterwards, to ``share`` of a CPU: a cgroup
    v1 cpu quota per 100 ms (this machine's cgroup v2 has no cpu controller). Yields what sets
    another share. Skips the test where there is no such controller."""
    base = Path("/sys/fs/cgroup/cpu")
    if not (base / "cpu.cfs_quota_us").exists():
        pytest.skip("no cgroup v1 cpu controller to slow a node down with")
    group = base / f"vesta-lab-slow-{os.getpid()}-{pid}"
    group.mkdir()

    def set_share(now: float) -> None:
        (group / "cpu.cfs_quota_us").write_text(str(round(now * 100_000)))

    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        set_share(share)
        (group / "cgroup.procs").write_text(str(pid))
        yield set_share
    finally:
        left = [int(x) for x in (group / "cgroup.procs").read_text().split()]
        for other in left:  # back to the root, so that the group can go
            with contextlib.suppress(OSError):
                (base / "cgroup.procs").write_text(str(other))
        group.rmdir()


def test_a_split_job_gives_a_half_speed_node_about_a_third_and_the_one_node_digest(
    lab: Lab, pin_here: Callable[[int], None],
) -> None:
    """desk and pi4 idle, pi4 held to half its CPU: a split job goes out in chunks sized by each
    node's measured rate, so pi4 does about a third of the units, and the digest is one node's."""
    n, seed = 8, 3
    expected = reference_digest(n, seed)
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    pi4 = start_vestad(pi4_host, "pi4", KEY, *SAMPLED, "-spill-cpu-pct", "95")
    with throttled(pi4.proc.pid, 0.5):
        desk = start_vestad(desk_host, "desk", KEY, *SAMPLED, "-spill-cpu-pct", "95")
        wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10, what="the link")
        idle_peer(desk, "pi4")
        wait_for(lambda: quick_status(desk)["node"]["cpu_pct"] < 50, what="desk to be idle")
        # submitted from this process: a CLI's start would load desk's one CPU at that moment
        with Client(desk.socket, timeout=60) as client:
            done = next(e for e in client.submit(CpuJob(n, seed)) if isinstance(e, JobDone))
        assert done.ok, done.error
        result = done.result
        units = {p["node"]: p["units"] for p in result["placements"]}
        print(f"\nhalf-speed pi4: {result['placements']} in {result['seconds']} s")
        desk.stop()
        pi4.stop()
    assert result["digest"] == expected
    assert sum(units.values()) == 10 * n
    assert 0.15 <= units.get("pi4", 0) / (10 * n) <= 0.45, result["placements"]
    assert all(p["chunks"] >= 2 for p in result["placements"]), result["placements"]


# -- 5. exec rights --------------------------------------------------------------------------------


def exec_json(desk: LabDaemon, *argv: str) -> dict[str, Any]:
    return cli_json(desk, "exec", "--", *argv)


def test_exec_goes_only_where_it_is_allowed(lab: Lab, pin_here: Callable[[int], None]) -> None:
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED)
    closed = start_vestad(pi4_host, "pi4", KEY, *SAMPLED)  # without -allow-exec
    wait_for(lambda: up(desk, "pi4"), timeout=10, what="desk and pi4 to link")
    stress(desk)
    try:
        idle_peer(desk, "pi4")  # idle, and still not asked: it does not lend exec
        here = exec_json(desk, "hostname")  # the local node always may
        assert (here["node"], here["stdout"], here["exit_code"]) == ("desk", "desk\n", 0)
        assert [p["node"] for p in here["placements"]] == ["desk"]

        # pi4 again, now lending `hostname` and nothing else
        assert closed.stop() == 0
        wait_for(lambda: state_of(quick_peers(desk), "pi4") != "up", timeout=10,
                 what="desk to see pi4 leave")
        pi4 = start_vestad(pi4_host, "pi4", KEY, "-allow-exec", "-exec-allowlist", "hostname",
                           *SAMPLED)
        new = fingerprint(pi4)
        wait_for(lambda: any(p["fingerprint"] == new and p["state"] == "up"
                             for p in quick_peers(desk)), timeout=10,
                 what="desk to link the new pi4")
        (seen,) = [p for p in peers(desk) if p["fingerprint"] == new]
        assert seen["allow_exec"] is True and seen["exec_allowlist"] == ["hostname"]

        there = spill_to_pi4(desk, lambda: exec_json(desk, "hostname"))
        assert (there["node"], there["stdout"]) == ("pi4", "pi4\n"), (
            json.dumps([there, quick_status(desk), quick_status(pi4)]))
        idle_peer(desk, "pi4")
        other = exec_json(desk, "uname")
        assert other["node"] == "desk" and other["stdout"] == "Linux\n"
        assert other["exit_code"] == 0
    finally:
        desk.cli("stop-stress")


# -- 6, 7, 8. a peer lost mid-job ------------------------------------------------------------------


def placed_on(desk: LabDaemon, job: subprocess.Popen[str]) -> list[str]:
    """The nodes running parts of desk's one job; empty until it is placed."""
    assert job.poll() is None, job.communicate()
    jobs = quick_status(desk)["jobs"]
    nodes: list[str] = jobs[0]["nodes"] if jobs else []
    return nodes


def start_spilled_job(desk: LabDaemon, pi4: LabDaemon) -> subprocess.Popen[str]:
    """With desk stressed, ``vesta --json cpu FAILOVER_N`` on desk, running on pi4 and past
    its first units. A submission that stays on desk (pi4 turned busy at the moment of
    placement) is cancelled with Ctrl-C and made again, at most SPILL_TRIES times in all."""
    stress(desk)
    for _attempt in range(SPILL_TRIES):
        idle_peer(desk, "pi4")
        job = subprocess.Popen(
            [sys.executable, "-m", "vesta.apps.cli", "--socket", desk.socket, "--json", "cpu",
             str(FAILOVER_N)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=python_env())

        nodes = wait_for(functools.partial(placed_on, desk, job), timeout=10,
                         what="the job to be placed")
        if "pi4" in nodes:
            break
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=20)
    else:
        pytest.fail(f"the job stayed on desk in {SPILL_TRIES} submissions")

    def running_on_pi4() -> bool:
        assert job.poll() is None, job.communicate()
        flows = quick_status(desk)["flows"]
        return any(f["to"] == "pi4" and f["units_done"] > 0 for f in flows)

    wait_for(running_on_pi4, timeout=10, what="the job to run on pi4")
    return job


def finished(job: subprocess.Popen[str], timeout: float = 40) -> dict[str, Any]:
    out, err = job.communicate(timeout=timeout)
    assert job.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def assert_completed_on_desk(result: dict[str, Any]) -> None:
    """The whole job done once, what pi4 did not hand back run again on desk: same digest."""
    units = {p["node"]: p["units"] for p in result["placements"]}
    assert sum(units.values()) == 10 * FAILOVER_N, result["placements"]
    assert units.get("desk", 0) > 0, result["placements"]
    assert result["retried"] > 0
    assert result["digest"] == reference_digest(FAILOVER_N)


def job_processes(pi4: LabDaemon) -> list[psutil.Process]:
    """pi4's children that run work: every descendant of its vestad."""
    children = pi4.descendants()
    assert children, "pi4's vestad has no child process while it runs a job"
    return children


@pytest.fixture
def expected_digest() -> str:
    """Computed before the daemons start, so it does not compete with them for the CPUs."""
    return reference_digest(FAILOVER_N)


def test_a_peer_cut_off_mid_job_is_dropped_and_its_part_runs_here(
    expected_digest: str, pair: tuple[LabDaemon, LabDaemon]
) -> None:
    desk, pi4 = pair
    try:
        job = start_spilled_job(desk, pi4)
        cut = time.monotonic()
        pi4.host.link_down()
        wait_for(lambda: state_of(quick_peers(desk), "pi4") != "up",
                 timeout=DEAD_AFTER_S + SLACK_S, interval=0.02,
                 what="desk to stop listing pi4 as up after its link went down")
        noticed = time.monotonic() - cut
        print(f"\nlink down: desk dropped pi4 after {noticed:.2f} s")
        assert state_of(peers(desk), "pi4") is None  # gone, not just another state
        assert_completed_on_desk(finished(job))
        kinds = {(e["kind"], e["node"]) for e in desk.status()["events"]}
        assert {("failover", "pi4"), ("leave", "pi4")} <= kinds
    finally:
        desk.cli("stop-stress")


def test_a_peer_killed_mid_job_loses_nothing_and_leaves_no_process(
    expected_digest: str, pair: tuple[LabDaemon, LabDaemon]
) -> None:
    desk, pi4 = pair
    try:
        job = start_spilled_job(desk, pi4)
        children = job_processes(pi4)
        pi4.proc.kill()
        assert pi4.proc.wait(10) == -signal.SIGKILL
        assert_completed_on_desk(finished(job))
        psutil.wait_procs(children, timeout=10)
        left = [p for p in children if not gone(p)]
        assert not left, f"pi4's job processes outlived its vestad: {left}"
        assert state_of(peers(desk), "pi4") is None
    finally:
        desk.cli("stop-stress")


def test_a_peer_stopped_mid_job_says_so_and_its_part_is_placed_again_at_once(
    expected_digest: str, pair: tuple[LabDaemon, LabDaemon]
) -> None:
    desk, pi4 = pair
    try:
        job = start_spilled_job(desk, pi4)
        children = job_processes(pi4)
        stopped = time.monotonic()
        pi4.proc.send_signal(signal.SIGTERM)

        def placed_again() -> bool:
            events = quick_status(desk)["events"]
            return any(e["kind"] == "failover" and e["node"] == "pi4" for e in events)

        wait_for(placed_again, timeout=DEAD_AFTER_S, interval=0.02,
                 what="desk to place pi4's part again")
        replaced = time.monotonic() - stopped
        print(f"\nSIGTERM: desk placed pi4's part again after {replaced:.2f} s")
        assert replaced <= REPLACED_AFTER_TERM_S  # it was told, it did not wait for silence
        assert pi4.proc.wait(15) == 0
        assert_completed_on_desk(finished(job))
        events = desk.status()["events"]
        assert any(e["kind"] == "leave" and e["node"] == "pi4" for e in events), events
        assert state_of(peers(desk), "pi4") is None
        psutil.wait_procs(children, timeout=10)
        assert not [p for p in children if not gone(p)]
    finally:
        desk.cli("stop-stress")


#: SPEC: lent work pauses within a second of the owner's load reaching the line.
PAUSE_WITHIN_S = 1.0


def lent_processes(pi4: LabDaemon) -> list[psutil.Process]:
    """pi4's job processes that run work for a peer (at nice 19), and what they started."""
    lent = []
    for proc in pi4.descendants():
        with contextlib.suppress(psutil.Error):
            if proc.nice() == 19:
                lent.append(proc)
    return lent


def test_an_owners_busy_loop_pauses_lent_work_within_a_second_and_the_job_ends_elsewhere(
    expected_digest: str, lab: Lab, pin_here: Callable[[int], None],
) -> None:
    cpu_desk, cpu_pi4 = two_cpus()
    desk_host, pi4_host = lab.add_host("desk", cpu=cpu_desk), lab.add_host("pi4", cpu=cpu_pi4)
    pin_here(cpu_desk)
    desk = start_vestad(desk_host, "desk", KEY, *SAMPLED)
    pi4 = start_vestad(pi4_host, "pi4", KEY, *SAMPLED, "-pause-replace-s", "1")
    wait_for(lambda: up(desk, "pi4") and up(pi4, "desk"), timeout=10, what="the link")
    owner = None
    try:
        job = start_spilled_job(desk, pi4)
        lent = wait_for(lambda: lent_processes(pi4), what="pi4's lent job process")
        owner = pi4_host.run([sys.executable, "-c", "while True: pass"])  # on pi4's CPU
        began = time.monotonic()
        wait_for(lambda: all(supervisor.held(p.pid) for p in lent),
                 timeout=PAUSE_WITHIN_S + SLACK_S, interval=0.01,
                 what="every lent process on pi4 to stop for its owner")
        paused = time.monotonic() - began
        print(f"\nowner's loop on pi4: lent work stopped after {paused:.2f} s")
        assert paused <= PAUSE_WITHIN_S + SLACK_S
        assert quick_status(pi4)["node"]["paused"].startswith("its owner's load is")

        result = finished(job)  # placed on desk once paused for pause_replace_s (1 s)
        assert_completed_on_desk(result)
        kinds = {(e["kind"], e["node"]) for e in desk.status()["events"]}
        assert {("pause", "pi4"), ("failover", "pi4")} <= kinds
        # cancelled on pi4 once placed elsewhere: killed there, it ends when it next gets the
        # CPU, which the owner's loop keeps (it is starved, and uses nothing meanwhile)
        owner.kill()
        owner.wait(10)
        psutil.wait_procs(lent, timeout=10)
        assert not [p for p in lent if not gone(p)]
    finally:
        if owner is not None and owner.poll() is None:
            owner.kill()
            owner.wait(10)
        desk.cli("stop-stress")


STOP_TRIALS = 6


def test_a_stopping_peer_is_heard_leaving_before_its_link_closes(lab: Lab) -> None:
    """SPEC: a node that stops says so to its peers first. Each trial starts pi4, links it, and
    stops it with SIGTERM; desk must record the leave with pi4's own reason every time, not
    just notice the connection close."""
    cpu_desk, cpu_pi4 = two_cpus()
    desk = start_vestad(lab.add_host("desk", cpu=cpu_desk), "desk", KEY)
    pi4_host = lab.add_host("pi4", cpu=cpu_pi4)
    heard = []
    for _ in range(STOP_TRIALS):
        pi4 = start_vestad(pi4_host, "pi4", KEY)
        wait_for(lambda: up(desk, "pi4"), timeout=10, what="desk and pi4 to link")
        before = len(quick_status(desk)["events"])
        assert pi4.stop() == 0
        wait_for(lambda: state_of(quick_peers(desk), "pi4") is None, timeout=10,
                 what="desk to drop pi4")
        leaves = [e["detail"] for e in quick_status(desk)["events"][before:]
                  if e["kind"] == "leave" and e["node"] == "pi4"]
        heard.append(leaves[0] if leaves else "no leave recorded")
    assert heard == ["the node is stopping"] * STOP_TRIALS, heard
