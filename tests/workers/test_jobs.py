"""Tests for the pure parts of vesta.workers.jobs: the cpu job's arithmetic and command lookup.

No job process is started here; ``run_cpu`` is fed a plain pipe in this process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import threading
from multiprocessing import Pipe
from pathlib import Path

import pytest

from vesta.policy import split_units
from vesta.workers.jobs import (
    UNIT_ITERATIONS,
    job_digest,
    resolve_command,
    run_cpu,
    unit_result,
)

SEED = 7
UNITS = 3


def spec_unit(seed: int, index: int) -> bytes:
    """SPEC's "Jobs" section, written out again: 100,000 chained SHA-256 from b"vesta:S:i"."""
    h = hashlib.sha256(f"vesta:{seed}:{index}".encode("ascii")).digest()
    for _ in range(100_000):
        h = hashlib.sha256(h).digest()
    return h


def test_unit_result_follows_the_spec() -> None:
    assert UNIT_ITERATIONS == 100_000
    result = unit_result(0, 0)
    assert result == spec_unit(0, 0)
    assert len(result) == 32


def run_units(start: int, end: int, seed: int) -> dict[int, bytes]:
    """What one cpu task reports for units [start, end), read from the pipe it writes to."""
    reader, writer = Pipe(duplex=False)
    run_cpu(writer, {"seed": seed, "start": start, "end": end})
    writer.close()
    units: dict[int, bytes] = {}
    while True:
        msg = reader.recv()
        if msg[0] == "done":
            assert msg == ("done", 0, "", {})
            break
        kind, batch = msg
        assert kind == "units" and batch and not units.keys() & batch.keys()
        units.update(batch)
    with pytest.raises(EOFError):  # nothing after "done"
        reader.recv()
    reader.close()
    return units


def test_job_digest_does_not_depend_on_the_split() -> None:
    # One task for everything, in order.
    whole = run_units(0, UNITS, SEED)
    # Three tasks, the last one run first, each unit computed afresh.
    pieces: dict[int, bytes] = {}
    for start, end in reversed(split_units(0, UNITS, 3)):
        pieces.update(run_units(start, end, SEED))
    assert sorted(whole) == sorted(pieces) == list(range(UNITS))
    in_order = [pieces[i] for i in sorted(pieces)]
    assert job_digest([whole[i] for i in range(UNITS)]) == job_digest(in_order)
    assert len(set(in_order)) == UNITS
    assert job_digest(in_order) == hashlib.sha256(b"".join(in_order)).hexdigest()


def test_job_digest_is_of_the_results_in_index_order() -> None:
    results = [bytes([i]) * 32 for i in range(5)]
    assert job_digest(results) == hashlib.sha256(b"".join(results)).hexdigest()
    assert job_digest(results) != job_digest(results[::-1])
    assert job_digest([]) == hashlib.sha256(b"").hexdigest()


# -- finding the command ---------------------------------------------------------------------------


def make_program(path: Path, executable: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho hi\n")
    mode = stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if executable else 0)
    path.chmod(mode)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, str]:
    """A job's working directory, and a PATH of two directories with ``tool`` in the second."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    first, second = tmp_path / "bin1", tmp_path / "bin2"
    first.mkdir()
    make_program(second / "tool")
    make_program(first / "only-readable", executable=False)
    return workdir, second, os.pathsep.join([str(first), str(second)])


def test_name_without_a_slash_is_found_on_path(dirs: tuple[Path, Path, str]) -> None:
    workdir, bindir, path = dirs
    make_program(workdir / "tool")  # a file of that name here does not count without ./
    assert resolve_command("tool", str(workdir), path) == str(bindir / "tool")


def test_name_not_on_path_is_none(dirs: tuple[Path, Path, str]) -> None:
    workdir, _, path = dirs
    assert resolve_command("no-such-tool", str(workdir), path) is None
    assert resolve_command("only-readable", str(workdir), path) is None


def test_dot_slash_name_missing_here_is_looked_up_on_path(dirs: tuple[Path, Path, str]) -> None:
    workdir, bindir, path = dirs
    assert resolve_command("./tool", str(workdir), path) == str(bindir / "tool")
    assert resolve_command("./no-such-tool", str(workdir), path) is None


def test_dot_slash_name_present_here_is_that_file(dirs: tuple[Path, Path, str]) -> None:
    workdir, _, path = dirs
    local = make_program(workdir / "tool")
    assert resolve_command("./tool", str(workdir), path) == str(local)


def test_dot_slash_deeper_path_is_not_looked_up(dirs: tuple[Path, Path, str]) -> None:
    workdir, _, path = dirs
    assert resolve_command("./sub/tool", str(workdir), path) is None


def test_absolute_path(dirs: tuple[Path, Path, str], tmp_path: Path) -> None:
    workdir, bindir, path = dirs
    assert resolve_command(str(bindir / "tool"), str(workdir), path) == str(bindir / "tool")
    assert resolve_command(str(tmp_path / "missing" / "tool"), str(workdir), path) is None
    assert resolve_command("/no/such/tool", str(workdir), path) is None


def test_workers_sharing_a_counter_take_each_unit_once() -> None:
    """Two workers pull from one counter: together they do every unit, none twice."""
    counter = multiprocessing.get_context("forkserver").Value("q", 3)
    pipes = [Pipe(duplex=False) for _ in range(2)]
    workers = [
        threading.Thread(target=run_cpu, args=(writer, {"seed": 1, "start": 3, "end": 11,
                                                        "next": counter}))
        for _, writer in pipes
    ]
    for w in workers:
        w.start()
    taken: list[set[int]] = []
    for reader, writer in pipes:
        units: set[int] = set()
        while (msg := reader.recv())[0] != "done":
            units |= msg[1].keys()
        taken.append(units)
        writer.close()
    for w in workers:
        w.join(30)
    assert not taken[0] & taken[1]
    assert taken[0] | taken[1] == set(range(3, 11))
    assert counter.value == 11
