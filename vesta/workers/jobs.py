"""The code that runs inside job processes: cpu units, memory holds, commands and stress.

This module is preloaded into the executor's fork server, so it imports only the standard library
and nothing that starts threads. A job process runs :func:`serve`: it sets itself up once, then
takes tasks from its pipe one at a time, ``("task", kind, params)``, and waits, blocked on the
pipe, for the next (see the supervisor for which processes are kept warm and when they retire).
It reports to its parent over the same pipe with small tuples:

- ``("units", {index: digest, ...})`` cpu units finished, sent in batches (see
  :data:`REPORT_INTERVAL`) so that the daemon wakes seldom while a job runs on its core;
- ``("out", stream, data)`` an exec command wrote output;
- ``("pgid", pgid)`` the process group of an exec command that runs for more than a moment
  (:data:`PGID_AFTER`), so the parent can kill it at once on a cancel (before that, the
  process's own clean-up on SIGTERM does it: a small command costs no report more);
- ``("done", exit_code, error, detail, reusable, cpu_s)`` the task ended (error "" when it ran
  to completion), everything it left is cleaned up, and the process takes another task if
  ``reusable`` (False after an unexpected error: the process then exits); ``cpu_s`` is the CPU
  the task used, its command's included, which the ledger charges.

The parent writes tasks and, for a running exec command, output credits ``("credit", size)``
and, after the task was paused for the node's owner, ``("resumed", seconds)``: its timeout
counts running time only.
The workers of a cpu task share a :class:`UnitCounter`, whose file descriptor follows the task
over the pipe.

How a job process ends when the daemon is killed with ``kill -9``: the fork server ends as soon as
the daemon does (see :func:`release_fork_server`), and every job process has asked the kernel for
SIGTERM when the fork server, its parent, dies. cpu, mem, stress and idle processes keep SIGTERM's
default action and end at once; an exec worker running a command catches it, kills its command's
cgroup and every descendant, and exits. An idle process also sees its pipe close with the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import resource
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

from vesta import exits

UNIT_ITERATIONS = 100_000
#: Bytes of an exec command's output that may be on their way to its reader, not yet taken.
OUTPUT_WINDOW = 1 << 20
#: Seconds an exec command runs before its process group is reported to the supervisor.
PGID_AFTER = 0.02
#: A cpu job process reports its finished units at most this often, in seconds.
REPORT_INTERVAL = 0.25
UNITS_PER_MILLION = 10
PAGE = mmap.PAGESIZE
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


# -- the cpu job's arithmetic, shared with the daemon and the tests --------------------------------


def unit_result(seed: int, index: int) -> bytes:
    """Unit ``index`` of a cpu job with ``seed``: 100,000 chained SHA-256 from its start value."""
    sha = hashlib.sha256
    h = sha(b"vesta:%d:%d" % (seed, index)).digest()
    for _ in range(UNIT_ITERATIONS):
        h = sha(h).digest()
    return h


def job_digest(unit_results: Sequence[bytes]) -> str:
    """The job's digest: SHA-256 of the unit results in order of their index."""
    return hashlib.sha256(b"".join(unit_results)).hexdigest()


# -- child process set-up --------------------------------------------------------------------------


def prepare_child(lend: bool, death_signal: int = signal.SIGKILL) -> None:
    """Set up a job process: ignore Ctrl-C, a session of its own, end with the daemon, and yield
    the CPU when lending.

    ``death_signal`` is what the process gets when its parent, the fork server, ends. Job
    processes ask for SIGTERM: its default action ends them like SIGKILL, and an exec worker,
    which catches it while its command runs, cleans up first.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # out of the daemon's process group: a SIGKILL to the group (kill -9 -PGID) then kills the
    # daemon and its fork server, and this process lives to clean up after its command
    with contextlib.suppress(OSError):
        os.setsid()
    die_with_parent(death_signal)
    release_fork_server()  # after the death signal is set: see there
    if lend:
        lowest_priority()


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent ends (Linux only; best
    effort)."""
    _prctl(_PR_SET_PDEATHSIG, signum)


def release_fork_server() -> None:
    """Close this job process's copy of the fork server's "alive" pipe.

    Why the fork server used to outlive a daemon killed with ``kill -9``: it ends when every
    write end of its "alive" pipe is closed, and multiprocessing hands that write end to every
    process the server forks (so that they could ask the same server for children of their own).
    So each running job process kept the fork server alive, and the fork server, the parent their
    death signal is tied to, kept them alive: neither ever ended, and the resource tracker, whose
    pipe they hold too, stayed with them. Once the job processes drop their copies, the daemon
    holds the only one, and the fork server ends the moment the daemon does, taking every job
    process with it.

    Call it only after the death signal is set: while this process holds the pipe the fork
    server cannot end, so it cannot die unnoticed before the signal is in place.
    """
    server: Any = forkserver._forkserver  # multiprocessing has no public handle on it
    if server.get_inherited_fds() is None:  # this process was not forked by the fork server
        return
    fd, server._forkserver_alive_fd = server._forkserver_alive_fd, None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


_libc: Any = None


def _prctl(option: int, value: int) -> None:
    """prctl(2), with libc looked up once per process: the lookup is a ``dlopen``, too slow
    to repeat between fork and exec for every command."""
    global _libc
    with contextlib.suppress(OSError, AttributeError):
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(option, value, 0, 0, 0)


def lowest_priority() -> None:
    """nice 19 and SCHED_IDLE where the platform has it: the owner's own work comes first.

    Where the kernel groups processes by session for scheduling (``sched_autogroup``, on by
    default on Debian and Raspberry Pi OS), a process that starts a session gets a group of its
    own, which competes with the owner's session as an equal whatever the nice value of the
    processes inside: the group is made nice 19 too.
    """
    with contextlib.suppress(OSError):
        os.nice(19 - os.nice(0))
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    nicest_autogroup("self")


def nicest_autogroup(pid: int | str) -> None:
    """Make the scheduling group of ``pid``'s session nice 19, where the kernel has them."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write("19")


def serve(conn: Connection, lend: bool, cgroup: str | None = None) -> None:
    """Entry point of every job process: run the tasks that come over ``conn``, one at a time,
    until it closes (the daemon retired this process, or is gone).

    Waiting for the next task is a blocking read of the pipe: an idle process uses no CPU.
    A lent process stays at the lowest priority for good (it may not raise it again), which is
    why the supervisor keeps lent and local processes apart. Where the supervisor gives it a
    cgroup of its own, the process moves there first, and its commands start in it.
    """
    global _contained, _lending
    _lending = lend
    prepare_child(lend, signal.SIGTERM)
    if cgroup is not None:
        try:
            move_to_cgroup(cgroup)
            _contained = True
        except OSError:
            pass  # commands then get a death signal of their own
    allowed = os.sched_getaffinity(0)
    while True:
        try:
            message = conn.recv()
            if message[0] != "task":  # a credit for a command that has ended
                continue
            _, kind, params = message
            if params.get("share") is not None:
                params = {**params, "next": UnitCounter(recv_handle(conn))}
        except (EOFError, OSError):
            return
        if not run(conn, kind, params, allowed):
            return


def run(conn: Connection, kind: str, params: dict[str, Any], allowed: set[int]) -> bool:
    """Run one task and report its end; whether this process may take another.

    Each task starts on the CPUs it is given (``params["cpus"]``, a lent command's) within those
    the process was started with, or on all of those.
    """
    runners: dict[str, Callable[[Connection, dict[str, Any]], Result]] = {
        "cpu": run_cpu, "mem": run_mem, "exec": run_exec, "stress": run_stress,
    }
    reusable = True
    used = cpu_seconds()
    try:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(params.get("cpus") or ()) & allowed or allowed)
        code, error, detail = runners[kind](conn, params)
    except MemoryError:
        code, error, detail, reusable = 1, f"not enough memory for this {kind} job", {}, False
    except Exception as exc:  # report, never die silently: the parent sees "done"
        code, error, detail = exits.not_finished(kind), f"{kind} job failed: {exc}", {}
        reusable = False
    finally:
        if params.get("next") is not None:
            params["next"].close()
    try:
        conn.send(("done", code, error, detail, reusable, round(cpu_seconds() - used, 4)))
    except OSError:  # the daemon is gone
        return False
    return reusable


def cpu_seconds() -> float:
    """CPU this process used, and its children it waited for (an exec's command and what the
    command left, reaped here as their subreaper)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


#: How a task ended: exit code, error ("" when it ran to completion), detail for the job's result.
Result = tuple[int, str, dict[str, Any]]


class UnitCounter:
    """The next unit of a cpu task, shared by the workers of the task.

    Eight bytes in an anonymous file (``memfd``), read and advanced under a POSIX record lock.
    The file is handed to running processes as a file descriptor over their pipe, which a
    multiprocessing ``Value`` cannot be (it is shared only when a process starts); and the
    kernel drops the lock of a worker killed while it holds it, so its siblings go on. POSIX
    locks belong to a process: the threads of one process do not exclude each other.
    """

    _VALUE = struct.Struct("q")

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls, start: int) -> UnitCounter:
        """A new counter at ``start``."""
        try:
            fd = os.memfd_create("vesta-units", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # no memfd: an unlinked temporary file does the same
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        os.pwrite(fd, cls._VALUE.pack(start), 0)
        return cls(fd)

    @property
    def value(self) -> int:
        return int(self._VALUE.unpack(os.pread(self.fd, self._VALUE.size, 0))[0])

    def take(self, end: int) -> int | None:
        """The next unit index, or None once it reaches ``end``."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            index = self.value
            if index >= end:
                return None
            os.pwrite(self.fd, self._VALUE.pack(index + 1), 0)
            return index
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- the job kinds ---------------------------------------------------------------------------------


def run_cpu(conn: Connection, params: dict[str, Any]) -> Result:
    """Compute units and report them. With a shared ``next`` counter, the workers of a task take
    units one at a time from it, so a worker on a busier core simply does fewer of them."""
    seed = params["seed"]
    batch: dict[int, bytes] = {}
    last = time.monotonic()
    counter = params.get("next")
    indices = _take(counter, params["end"]) if counter is not None else range(
        params["start"], params["end"])
    for index in indices:
        batch[index] = unit_result(seed, index)
        now = time.monotonic()
        if now - last >= REPORT_INTERVAL:
            conn.send(("units", batch))
            batch, last = {}, now
    if batch:
        conn.send(("units", batch))
    return 0, "", {}


def _take(counter: UnitCounter, end: int) -> Iterator[int]:
    """Unit indices from a shared counter, until it reaches ``end``."""
    while (index := counter.take(end)) is not None:
        yield index


def run_mem(conn: Connection, params: dict[str, Any]) -> Result:
    size = params["mb"] * 1024 * 1024
    started = time.monotonic()
    with mmap.mmap(-1, max(size, PAGE)) as block:
        for offset in range(0, size, PAGE):
            block[offset] = 1
        touched = time.monotonic() - started
        time.sleep(params["ms"] / 1000)
    return 0, "", {"touch_seconds": round(touched, 3)}


def run_stress(conn: Connection, params: dict[str, Any]) -> Result:
    """Spin on one core until the deadline."""
    os.sched_setaffinity(0, {params["cpu"]})
    deadline = time.monotonic() + params["seconds"]
    while time.monotonic() < deadline:
        for _ in range(10_000):
            pass
    return 0, "", {}


def run_exec(conn: Connection, params: dict[str, Any]) -> Result:
    """Run a command in a fresh directory and session, streaming its output to the parent.

    This process is a child subreaper, so whatever the command starts, even in a session of
    its own, stays below it and is killed when the command ends: the next command of a warm
    process starts with nothing of the last one left, in a new directory. SIGTERM (a cancel,
    or the death of the fork server after the daemon's) does the same clean-up, working
    directory included, before the process exits; the supervisor then kills what is left in
    the process's cgroup, where there is one, and removes it.
    """
    workdir = tempfile.mkdtemp(prefix="vesta-job-", dir=params.get("tmpdir"))

    def cancelled(_signum: int, _frame: Any) -> None:
        _clean_up(workdir)
        os._exit(exits.killed_by(signal.SIGTERM))

    signal.signal(signal.SIGTERM, cancelled)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    try:
        return _exec_in(conn, params, workdir)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up runs to its end
        _clean_up(workdir)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # idle again: a death signal ends it


def _clean_up(workdir: str) -> None:
    """Kill every process the command left (below this one); remove the working directory."""
    kill_descendants()
    try:
        os.rmdir(workdir)  # most commands leave nothing there
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)


def move_to_cgroup(path: str) -> None:
    """Move the calling process into cgroup ``path``; OSError if it cannot."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, b"0")  # 0 is the writer itself
    finally:
        os.close(fd)


def kill_cgroup(path: str, wait: float = 1.0) -> bool:
    """SIGKILL every process in cgroup ``path`` at once, wait up to ``wait`` seconds for them to
    end, and remove the cgroup. True once it is gone (or was never there).

    ``cgroup.kill`` (Linux 5.14) reaches every process in the cgroup and below, in whatever
    session, including ones forked while it acts; the processes stay zombies until their parent
    reaps them, which does not keep the cgroup from being removed. An empty cgroup (its command
    has ended) is simply removed.
    """
    if _removed(path):
        return True
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except FileNotFoundError:
        return not os.path.exists(path)
    except OSError:
        pass  # no cgroup.kill, or not ours: removing it below says whether it is empty
    deadline = time.monotonic() + wait
    while not _removed(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)  # the kernel ends the killed processes in a moment
    return True


def _removed(cgroup: str) -> bool:
    """Remove a cgroup; whether it is gone (False: it still holds a process, most likely)."""
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def kill_descendants() -> None:
    """SIGKILL every descendant (as a subreaper, orphans are re-parented here) and reap them."""
    me = os.getpid()
    for _ in range(20):  # descendants may fork while we look; a few rounds catch them
        children = _children_of(me)
        if not children:
            return
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _children_of(parent: int) -> list[int]:
    """The children of process ``parent``: from its threads' ``children`` files where the
    kernel has them, else by reading the parent of every process in /proc (far slower)."""
    try:
        found: list[int] = []
        for tid in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{tid}/children") as f:
                found += map(int, f.read().split())
        return found
    except FileNotFoundError:
        pass
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # the name may hold spaces and parens
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append(int(entry))
    return found


def resolve_command(argv0: str, workdir: str, path: str) -> str | None:
    """Find the program: by PATH without a slash; ``./NAME`` missing here is looked up as NAME."""
    if "/" not in argv0:
        return shutil.which(argv0, path=path)
    if argv0.startswith("./") and "/" not in argv0[2:]:
        local = os.path.join(workdir, argv0[2:])
        return local if os.path.exists(local) else shutil.which(argv0[2:], path=path)
    return argv0 if os.path.exists(argv0) else None


def _exec_in(conn: Connection, params: dict[str, Any], workdir: str) -> Result:
    argv: list[str] = params["argv"]
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": os.environ.get("HOME", workdir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "VESTA_JOB_ID": params["job_id"],
        "VESTA_NODE": params.get("node", ""),  # the node it runs on (a vesta in it talks there)
    }
    # the lender's PATH, then the directory of vesta's own programs (piwork lives beside vestad)
    search = os.pathsep.join(p for p in (env["PATH"], params.get("programs", "")) if p)
    program = resolve_command(argv[0], workdir, search)
    if program is None:
        return exits.NOT_FOUND, f"{argv[0]}: command not found", {}
    if os.path.isdir(program):
        return exits.NOT_EXECUTABLE, f"{argv[0]}: is a directory", {}
    if not os.access(program, os.X_OK):
        return exits.NOT_EXECUTABLE, f"{argv[0]}: not executable", {}

    try:
        proc = start_command([program, *argv[1:]], workdir, env)
        if _lending:  # its session is a scheduling group of its own: as nice as this one's
            nicest_autogroup(proc.pid)
    except PermissionError:
        return exits.NOT_EXECUTABLE, f"{argv[0]}: not executable (permission denied)", {}
    except FileNotFoundError:
        return exits.NOT_FOUND, f"{argv[0]}: command not found", {}
    except OSError as exc:
        if exc.errno in (errno.ENOEXEC, errno.EACCES, errno.EISDIR):
            return exits.NOT_EXECUTABLE, f"{argv[0]}: not executable ({exc.strerror})", {}
        return exits.NOT_RUN, f"{argv[0]}: cannot run: {exc.strerror}", {}
    with proc:  # closes its pipes: this process may run many commands
        timed_out = _pump(conn, proc, params.get("timeout"), params.get("window", OUTPUT_WINDOW))
    if timed_out:
        return exits.TIMED_OUT, f"timed out after {params['timeout']:g} s", {}
    return exits.from_returncode(proc.returncode), "", {}


def start_command(argv: list[str], workdir: str, env: dict[str, str],
                  contained: bool | None = None) -> subprocess.Popen[bytes]:
    """Start a command in a session of its own, with its output on pipes, so that it cannot
    outlive this process.

    Python cannot run between a vfork and an exec, and a fork of this process costs more than
    a small command takes (some 2 ms here, and as much again in copy-on-write faults after).
    Where this process has a cgroup of its own (``contained``; by default, whether it moved to
    one at start), a vfork executes the command, which starts in that cgroup: the supervisor
    kills the cgroup when this process ends, however it ends, and a daemon's next start kills
    what one that was killed left. Without one, the command needs a death signal of its own:
    where util-linux's ``setpriv`` can set it (see :func:`command_launcher`), a vfork executes
    ``setpriv --pdeathsig KILL -- COMMAND`` (an exec more, some 1.2 ms here). Elsewhere, and
    for a program that is neither a ``#!`` script nor an ELF binary (``setpriv`` would hand it
    to /bin/sh where an exec fails), a fork sets it up.
    """
    options: dict[str, Any] = {
        "cwd": workdir, "env": env, "stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE, "start_new_session": True,
    }
    if _contained if contained is None else contained:
        return subprocess.Popen(argv, **options)
    launcher = command_launcher()
    if launcher and _runs_itself(argv[0]):
        return subprocess.Popen([*launcher, *argv], **options)
    return subprocess.Popen(argv, preexec_fn=die_with_parent, **options)


#: Whether this process moved to a cgroup of its own at start (see :func:`serve`).
_contained = False
#: Whether this process runs work for peers (see :func:`serve`).
_lending = False
_launcher: list[str] | None = None


def command_launcher() -> list[str]:
    """``setpriv --pdeathsig KILL --``, or [] where there is no setpriv that knows the option
    (util-linux 2.33 and later do). Found once per process, by trying it."""
    global _launcher
    if _launcher is None:
        _launcher = []
        search = os.pathsep.join((os.environ.get("PATH", os.defpath), "/usr/bin", "/bin"))
        path = shutil.which("setpriv", path=search)
        if path is not None:
            launcher = [path, "--pdeathsig", "KILL", "--"]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                tried = subprocess.run([*launcher, path, "--version"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       timeout=10)
                if tried.returncode == 0:
                    _launcher = launcher
    return _launcher


def _runs_itself(program: str) -> bool:
    """Whether the kernel executes ``program`` as it is: a ``#!`` script or an ELF binary."""
    try:
        with open(program, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] == b"#!" or head == b"\x7fELF"


def _pump(
    conn: Connection, proc: subprocess.Popen[bytes], timeout: float | None, window: int
) -> bool:
    """Relay output until the command exits and its pipes close; kill it at the timeout.

    Every byte is relayed, under a credit window: once ``window`` bytes are out and not yet
    taken by whoever reads the job (credits come back on ``conn``), the command's pipes are left
    unread, so the command waits on a full pipe and nothing piles up on the way, at any size.
    The command's exit wakes the loop through a pidfd where the kernel has them (Linux 5.3).
    Returns whether it timed out.
    """
    pidfd = _pidfd(proc.pid)
    try:
        return _relay(conn, proc, pidfd, timeout, window)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A file descriptor that turns readable when process ``pid`` exits, or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _relay(conn: Connection, proc: subprocess.Popen[bytes], pidfd: int | None,
           timeout: float | None, window: int) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    tell_pgid_at: float | None = time.monotonic() + PGID_AFTER
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    unacked = 0
    timed_out = False
    exited_at: float | None = None
    last_data = time.monotonic()
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline and not timed_out:
            credit, paused_s = _credits(conn)  # a pause for the owner moves the deadline
            unacked -= credit
            deadline += paused_s
            if now >= deadline:
                timed_out = True
                exits.kill_group(proc.pid)
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        quiet = unacked < window and now - max(exited_at or 0.0, last_data) > 1.0
        if exited_at is not None and (not streams or quiet or timed_out):
            break  # exited, and its pipes are closed or held by something it left behind
        if tell_pgid_at is not None and exited_at is None and now >= tell_pgid_at:
            conn.send(("pgid", proc.pid))
            tell_pgid_at = None
        wait = 0.2 if deadline is None or timed_out else max(0.0, min(0.2, deadline - now))
        if tell_pgid_at is not None:
            wait = max(0.0, min(wait, tell_pgid_at - now))
        watched = [*(streams if unacked < window else ()), conn.fileno()]
        if exited_at is None and pidfd is not None:
            watched.append(pidfd)
        ready, _, _ = select.select(watched, [], [], wait)
        for fd in ready:
            if fd == pidfd:
                continue  # the next round reaps it
            if fd == conn.fileno():
                credit, paused_s = _credits(conn)
                unacked -= credit
                if deadline is not None:  # a timeout counts running time, not time paused
                    deadline += paused_s
                continue
            data = os.read(fd, 65536)
            if not data:
                del streams[fd]
                continue
            conn.send(("out", streams[fd], data))
            unacked += len(data)
            last_data = time.monotonic()
        if not streams and exited_at is None and pidfd is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
    return timed_out


def _credits(conn: Connection) -> tuple[int, float]:
    """The output credits waiting on the pipe, and the seconds the task was paused for its
    owner since the last call; an EOF means the parent is gone."""
    total, paused = 0, 0.0
    try:
        while conn.poll():
            message = conn.recv()
            if isinstance(message, tuple) and message[:1] == ("credit",):
                total += int(message[1])
            elif isinstance(message, tuple) and message[:1] == ("resumed",):
                paused += float(message[1])
    except (EOFError, OSError):
        total += 1 << 40  # nobody to wait for: let the command finish
    return total, paused

