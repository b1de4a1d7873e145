"""The job space (a node's private temp directory and cgroups), cgroup kills, and the fork
server's "alive" pipe that job processes must not hold."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
from collections.abc import Iterator
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import wait_for
from vesta.messages import Message, WorkerExited
from vesta.workers import jobs, supervisor
from vesta.workers.supervisor import JobSpace, Supervisor, open_job_space, own_cgroup_dir

pytestmark = pytest.mark.timeout(30)

PURE_V2 = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
HYBRID = (
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V1_ONLY = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
ESCAPED = "41 31 0:38 / /mnt/cg\\040two rw,relatime - cgroup2 none rw\n"
BIND_MOUNTED = "41 31 0:38 /user.slice /cg rw,relatime - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(
    ("cgroups", "mountinfo", "expected"),
    [
        ("0::/user.slice/vestad.service\n", PURE_V2, "/sys/fs/cgroup/user.slice/vestad.service"),
        ("0::/\n", PURE_V2, "/sys/fs/cgroup"),
        ("4:memory:/x\n1:cpu:/\n0::/\n", HYBRID, "/sys/fs/cgroup/unified"),
        ("0::/a\n", ESCAPED, "/mnt/cg two/a"),
        ("0::/user.slice/u1\n", BIND_MOUNTED, "/cg/u1"),
        ("0::/system.slice/x\n", BIND_MOUNTED, None),  # outside what the mount shows
        ("4:memory:/x\n1:cpu:/\n", V1_ONLY, None),  # no cgroup v2 at all
        ("0::/\n", V1_ONLY, None),
        ("0::/gone (deleted)\n", PURE_V2, None),
    ],
)
def test_own_cgroup_dir(cgroups: str, mountinfo: str, expected: str | None) -> None:
    assert own_cgroup_dir(cgroups, mountinfo) == expected


@pytest.fixture
def spaces() -> Iterator[list[JobSpace]]:
    """Job spaces a test opened; each is closed after it, so no later test inherits one (last
    opened first: each gives multiprocessing back the temp directory it replaced)."""
    opened: list[JobSpace] = []
    yield opened
    for space in reversed(opened):
        space.close()
    assert supervisor._space is None


def mp_tempdir() -> Any:
    return supervisor._multiprocessing_config().get("tempdir")


def test_a_space_is_claimed_cleaned_and_released(tmp_path: Path,
                                                 spaces: list[JobSpace]) -> None:
    name = f"n{secrets.token_hex(3)}"
    path = tmp_path / f"vestad-{name}.{os.getuid()}"
    path.mkdir()  # as a daemon of this node killed with kill -9 left it
    (path / "listener-old").write_text("")
    (path / "vesta-job-old").mkdir()
    (path / "vesta-job-old" / "out").write_text("x")
    before = mp_tempdir()

    space = open_job_space(name, root=str(tmp_path))
    spaces.append(space)
    assert space.tmpdir == str(path)
    assert sorted(p.name for p in path.iterdir()) == [".lock"]
    assert (path.stat().st_mode & 0o777) == 0o700
    assert mp_tempdir() == str(path) and supervisor._space is space

    space.close()
    assert not path.exists()
    assert mp_tempdir() == before
    assert supervisor._space is None


def test_a_live_daemons_space_is_left_alone(tmp_path: Path, spaces: list[JobSpace]) -> None:
    name = f"n{secrets.token_hex(3)}"
    first = open_job_space(name, root=str(tmp_path))
    spaces.append(first)
    assert first.tmpdir is not None
    (Path(first.tmpdir) / "listener-live").write_text("")
    second = open_job_space(name, root=str(tmp_path))
    spaces.append(second)
    assert second.tmpdir not in (None, first.tmpdir)
    assert (Path(first.tmpdir) / "listener-live").exists()
    assert Path(second.tmpdir or "").name.startswith(f"vestad-{name}.")


def test_a_space_planted_by_someone_else_is_not_used(tmp_path: Path,
                                                     spaces: list[JobSpace]) -> None:
    name = f"n{secrets.token_hex(3)}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"vestad-{name}.{os.getuid()}").symlink_to(elsewhere)
    space = open_job_space(name, root=str(tmp_path))
    spaces.append(space)
    assert space.tmpdir is not None and not os.path.islink(space.tmpdir)
    assert not list(elsewhere.iterdir())


def test_the_space_path_fits_a_unix_socket() -> None:
    longest = f"{supervisor.SPACE_ROOT}/vestad-{'n' * 64}.{2**32 - 2}/listener-abcdefgh"
    assert len(longest) <= 107


def delegated_or_skip() -> str:
    path = supervisor.delegated_cgroup(f"vesta-test-{secrets.token_hex(3)}")
    assert path is None or not os.path.exists(path)  # a probe leaves nothing behind
    if path is None:
        pytest.skip("no delegated cgroup v2 here: this process cannot create a child of its own "
                    "cgroup with cgroup.kill")
    return path


def test_kill_cgroup_kills_a_double_forked_setsid_descendant() -> None:
    parent = delegated_or_skip()
    job = os.path.join(parent, "w1")
    os.makedirs(job)
    proc = subprocess.Popen(["sh", "-c", "(setsid sleep 60 &); sleep 60"],
                            preexec_fn=lambda: jobs.move_to_cgroup(job))
    try:
        def members() -> list[int]:
            return [int(pid) for pid in Path(job, "cgroup.procs").read_text().split()]

        pids = wait_for(lambda: len(members()) >= 3 and members(), what="the command")
        escapee = [p for p in pids if psutil.Process(p).ppid() != proc.pid and p != proc.pid]
        assert escapee, "the setsid'd sleep left the command's tree"
        assert jobs.kill_cgroup(job)
        assert not os.path.exists(job)
        assert proc.wait(5) == -signal.SIGKILL
        wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                                 != psutil.STATUS_ZOMBIE for p in pids), timeout=2,
                 what="every process of the cgroup to end")
    finally:
        proc.kill()
        proc.wait()
        jobs.kill_cgroup(job)
        os.rmdir(parent)


def test_kill_cgroup_of_a_cgroup_that_is_gone_is_done(tmp_path: Path) -> None:
    assert jobs.kill_cgroup(str(tmp_path / "gone"))


def test_a_job_process_does_not_hold_the_fork_servers_alive_pipe() -> None:
    """Else the fork server never sees the daemon die, and the job processes whose death signal
    is tied to the fork server live on."""
    exited: list[WorkerExited] = []
    done = threading.Event()

    def report(message: Message) -> None:
        if isinstance(message, WorkerExited):
            exited.append(message)
            done.set()

    sup = Supervisor(report)
    sup.start()
    try:
        sup.start_worker("s1", "stress", {"cpu": min(os.sched_getaffinity(0)), "seconds": 20},
                         False)
        server: Any = forkserver._forkserver
        wait_for(lambda: server._forkserver_pid is not None, what="the fork server")
        alive_w = os.fstat(server._forkserver_alive_fd).st_ino

        def worker() -> psutil.Process | None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(server._forkserver_pid).children():
                    if child.status() != psutil.STATUS_ZOMBIE:
                        return child
            return None

        proc = wait_for(worker, what="the stress worker")

        def pipes() -> set[str]:
            found = set()
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    found.add(os.readlink(f"/proc/{proc.pid}/fd/{fd}"))
            return found

        # once its set-up has run (its death signal is set before the pipe is closed)
        wait_for(lambda: f"pipe:[{alive_w}]" not in pipes(), timeout=5,
                 what="the job process to close its copy of the fork server's alive pipe")
        sup.kill("s1")
        assert done.wait(10)
    finally:
        sup.shutdown()
