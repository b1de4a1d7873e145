"""Tests for the pure parts of vesta.workers.jobs: the cpu job's arithmetic and command lookup.

No job process is started here; ``run_cpu`` is fed a plain pipe in this process.
"""

from __future__ import annotations

import hashlib
import os
import stat
from multiprocessing import Pipe
from pathlib import Path

import pytest

from vesta.workers.jobs import (
    UNIT_ITERATIONS,
    UnitCounter,
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
    assert run_cpu(writer, {"seed": seed, "start": start, "end": end}) == (0, "", {})
    writer.close()
    units: dict[int, bytes] = {}
    while True:
        try:
            kind, batch = reader.recv()
        except EOFError:
            break
        assert kind == "units" and batch and not units.keys() & batch.keys()
        units.update(batch)
    reader.close()
    return units


def test_job_digest_does_not_depend_on_the_split() -> None:
    # One task for everything, in order.
    whole = run_units(0, UNITS, SEED)
    # Three tasks, the last one run first, each unit computed afresh.
    pieces: dict[int, bytes] = {}
    for start, end in reversed([(i, i + 1) for i in range(UNITS)]):
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


def test_a_unit_counter_hands_out_each_unit_once() -> None:
    counter = UnitCounter.create(3)
    try:
        assert counter.value == 3
        assert [counter.take(5), counter.take(5), counter.take(5), counter.take(5)] == [
            3, 4, None, None]
        assert counter.value == 5
    finally:
        counter.close()


def test_a_unit_counter_is_the_same_through_another_descriptor() -> None:
    """What a worker holds is a copy of the descriptor, passed over its pipe."""
    counter = UnitCounter.create(0)
    copy = UnitCounter(os.dup(counter.fd))
    try:
        assert copy.take(10) == 0
        assert counter.take(10) == 1
        assert copy.value == counter.value == 2
    finally:
        copy.close()
        counter.close()
