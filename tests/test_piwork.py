"""Tests for the piwork example workload.

Most tests run the real program as ``python -m piwork`` in a subprocess, because what
matters is the behaviour people and vesta see: worker processes started with "spawn",
the affinity mask honoured, output format, exit codes and Ctrl-C handling. A few pure
helpers are also checked in-process, where that is cheaper and more precise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest

from piwork import Estimate, split_samples
from piwork.__main__ import format_report, main, parse_millions
from tests.conftest import wait_for

PROJECT = "/work/main"
SMALL_N = "0.2"  # 200,000 samples: a fraction of a second, yet a stable estimate.
# Standard deviation of the estimate at 200,000 samples is about 0.0037, so 0.025 is
# roughly seven sigma: a correct program essentially never fails, a broken one does.
TOLERANCE = 0.025
JSON_KEYS = {"pi", "samples", "seconds", "cores", "host"}


def run_piwork(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``python -m piwork ARGS`` (optionally under a wrapper like taskset) to completion."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "piwork", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def run_json(*args: str, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run piwork with ``--json``, check it succeeded, and return the decoded object."""
    proc = run_piwork("--json", *args, prefix=prefix)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


@pytest.mark.timeout(60)
def test_json_estimate_is_close_to_pi_and_complete() -> None:
    result = run_json(SMALL_N)
    assert set(result) == JSON_KEYS
    assert abs(result["pi"] - math.pi) < TOLERANCE
    assert result["samples"] == 200_000
    assert isinstance(result["seconds"], float) and result["seconds"] > 0
    assert result["host"] == socket.gethostname()


@pytest.mark.timeout(60)
def test_cores_match_affinity() -> None:
    result = run_json(SMALL_N)
    assert result["cores"] == len(os.sched_getaffinity(0))


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset binary not installed")
def test_taskset_single_core_reports_one_core() -> None:
    # Pin to a CPU we are actually allowed on; CPU 0 may be outside a container's cpuset.
    cpu = min(os.sched_getaffinity(0))
    result = run_json("--seed", "1", SMALL_N, prefix=("taskset", "-c", str(cpu)))
    assert result["cores"] == 1
    assert result["samples"] == 200_000
    assert abs(result["pi"] - math.pi) < TOLERANCE


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("n", "samples"),
    [("0.2", 200_000), ("0.000003", 3), ("0.100001", 100_001), ("1", 1_000_000)],
)
def test_sample_count_is_exact(n: str, samples: int) -> None:
    # Odd counts check that the remainder after splitting across cores is not lost.
    assert run_json("--seed", "3", n)["samples"] == samples


@pytest.mark.timeout(60)
def test_seed_is_reproducible_and_matters() -> None:
    first = run_json("--seed", "42", SMALL_N)
    second = run_json("--seed", "42", SMALL_N)
    other = run_json("--seed", "43", SMALL_N)
    assert first["pi"] == second["pi"]
    # Deterministic: these two seeds are known to give different hit counts.
    assert other["pi"] != first["pi"]
    assert abs(first["pi"] - math.pi) < TOLERANCE


@pytest.mark.timeout(60)
def test_human_report_format() -> None:
    proc = run_piwork("--seed", "5", SMALL_N)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["pi", "samples", "seconds", "cores", "host"]
    # Values start in one column, so the report reads as a table.
    columns = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}
    assert len(columns) == 1
    fields = dict(line.split(maxsplit=1) for line in lines)
    assert abs(float(fields["pi"]) - math.pi) < TOLERANCE
    assert fields["samples"] == "200,000"
    assert float(fields["seconds"]) >= 0
    assert int(fields["cores"]) == len(os.sched_getaffinity(0))
    assert fields["host"] == socket.gethostname()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="missing-N"),
        pytest.param(["abc"], id="not-a-number"),
        pytest.param(["0"], id="zero"),
        pytest.param(["-1"], id="negative"),
        pytest.param(["-0.5"], id="negative-decimal"),
        pytest.param(["nan"], id="nan"),
        pytest.param(["inf"], id="inf"),
        pytest.param(["0.0000001"], id="fraction-of-a-sample"),
        pytest.param(["--bogus", "1"], id="unknown-flag"),
        pytest.param(["--seed", "x", "1"], id="bad-seed"),
        pytest.param(["1", "2"], id="extra-argument"),
    ],
)
def test_bad_input_exits_2_with_one_line_error(args: list[str]) -> None:
    proc = run_piwork(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "usage: piwork" in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_help_exits_0() -> None:
    proc = run_piwork("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: piwork")
    assert "--seed" in proc.stdout and "--json" in proc.stdout


def _proc_status(pid: int) -> dict[str, str]:
    """Fields of ``/proc/PID/status``, or an empty dict if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _worker_pids(parent_pid: int) -> set[int]:
    """PIDs of spawned multiprocessing workers (not the resource tracker) under a parent."""
    pids: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _proc_status(int(entry)).get("PPid") != str(parent_pid):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    pids.add(int(entry))
        except OSError:
            continue  # the process went away while we looked
    return pids


def _ignores_sigint(pid: int) -> bool:
    """True if the process has SIGINT set to ignored (bit 1 of the SigIgn mask)."""
    ignored = _proc_status(pid).get("SigIgn")
    return ignored is not None and bool(int(ignored, 16) & (1 << (signal.SIGINT - 1)))


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    state = _proc_status(pid).get("State", "")
    return bool(state) and not state.startswith("Z")


def _restore_sigint() -> None:
    """Child pre-exec hook: undo an inherited SIG_IGN (e.g. from a background shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("phase", ["starting", "running"])
def test_ctrl_c_stops_workers_and_exits_130(phase: str) -> None:
    """Ctrl-C, whether it lands while workers boot or while they compute, exits 130 cleanly.

    "starting" interrupts as soon as the first worker process exists, which is the racy
    case: a worker that has not yet ignored SIGINT would die with a traceback. "running"
    waits until every worker has SIGINT ignored, i.e. is past its initializer.
    """
    cores = len(os.sched_getaffinity(0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "piwork", "1000"],  # far longer than the test may run
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group, so we can Ctrl-C it like a terminal
        preexec_fn=_restore_sigint,
    )
    try:
        # Poll (bounded) for the phase we want, then send SIGINT to the whole process
        # group, as a terminal does on Ctrl-C.
        workers: set[int] = set()

        def reached() -> bool:
            assert proc.poll() is None, "piwork exited before it was interrupted"
            workers.update(_worker_pids(proc.pid))
            if phase == "starting":
                return bool(workers)
            return len(workers) == cores and all(_ignores_sigint(pid) for pid in workers)

        wait_for(reached, timeout=30, interval=0.005, what=f"workers in phase {phase!r}")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    workers |= _worker_pids(proc.pid)

    assert proc.returncode == 130, err
    assert out == ""
    assert err == "piwork: interrupted, workers stopped\n"  # no worker tracebacks
    assert not [pid for pid in workers if _alive(pid)]


@pytest.mark.parametrize(("total", "parts"), [(0, 1), (7, 1), (7, 2), (10, 3), (1_000_001, 4)])
def test_split_samples_is_exact_and_even(total: int, parts: int) -> None:
    shares = split_samples(total, parts)
    assert len(shares) == parts
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


@pytest.mark.parametrize(
    ("text", "samples"), [("0.2", 200_000), ("0.5", 500_000), ("3", 3_000_000), ("1e-6", 1)]
)
def test_parse_millions_is_exact(text: str, samples: int) -> None:
    assert parse_millions(text) == samples


def test_main_returns_exit_code_instead_of_raising(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["0"]) == 2
    assert "must be greater than 0" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "usage: piwork" in capsys.readouterr().out


def test_format_report_matches_documented_layout() -> None:
    report = format_report(
        Estimate(pi=3.14157133, samples=100_000_000, seconds=14.213, cores=2, host="desk")
    )
    assert report.splitlines() == [
        "pi        3.1415713",
        "samples   100,000,000",
        "seconds   14.21",
        "cores     2",
        "host      desk",
    ]
