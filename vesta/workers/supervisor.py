"""The process supervisor: one long-lived thread that starts, watches and kills job processes.

Job processes come from a ``forkserver`` preloaded with :mod:`vesta.workers.jobs`: the daemon has
threads, and forking it could hand a child a lock some thread held. The fork server is a fresh
interpreter with one thread, started on the first job (an idle daemon pays nothing for it), and
every job process is forked from it. Each worker is one ``Process`` with a ``Pipe``, watched
through its pipe and its ``sentinel`` with a selector, so any single worker can be killed
without disturbing the others. The thread reports what happens as messages
to its actor.

Workers are kept warm: forking one and setting it up costs tens of milliseconds, more than a
small command takes to run, so a worker that has run a task waits on its pipe for the next one
of its pool (local or lent) and retires after a while idle. What the actor sees does not change:
it starts a piece of a task under a worker id, may kill or credit it, and hears its units, output
and end (:class:`WorkerExited`, sent once the piece is done and cleaned up, whether its process
stays or not).

The daemon claims a :class:`JobSpace` for its node at start: a private temp directory for
multiprocessing's files and the exec working directories (so that nothing piles up in /tmp after
a crash), and, where it has a delegated cgroup v2, one cgroup per job process, in which the
process runs its commands (so that nothing a command starts outlives the process, whatever
session it moves to). A process keeps its cgroup for its whole life: moving a process between
cgroups waits, now and then, for the kernel to let every CPU pass a quiescent state, which on
a machine with a busy core costs 10-20 ms; one move per command was the tail of small jobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import queue
import select
import selectors
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import send_handle
from typing import Any

import psutil

from vesta import exits
from vesta.messages import Message, WorkerExited, WorkerOutput, WorkerUnits
from vesta.workers import jobs

logger = logging.getLogger(__name__)

_context: Any = None
#: The space the daemon claimed with :func:`open_job_space`; supervisors created after it use it.
_space: JobSpace | None = None

#: Where job spaces are made: the same place as the control socket. Unix socket paths are
#: limited to 107 bytes, and the fork server's socket lives in the space:
#: "/tmp/vestad-" + a name of at most 64 + "." + a uid of at most 10 + "/listener-XXXXXXXX"
#: is at most 105.
SPACE_ROOT = "/tmp"


def job_context() -> Any:
    """The multiprocessing context for job processes: a fork server preloaded with the job code.

    multiprocessing re-imports the main module in every child it starts, unless the fork server
    already imported it; so it is preloaded too. ``vestad``'s entry module imports nothing heavy
    at its top, which keeps the fork server small.
    """
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["__main__", "vesta.workers.jobs"])
    return _context


#: Seconds an exec worker gets to clean up after SIGTERM before it is killed.
TERM_GRACE = 2.0
#: Seconds a job process waits for another task before it retires.
IDLE_SECONDS = 30.0
#: Names the job processes' cgroups, uniquely in this process (a test may run supervisors
#: side by side in one space).
_CGROUP_SERIAL = itertools.count(1)
#: Seconds before credit that found a job process's pipe full is tried again.
CREDIT_RETRY = 0.01
#: The kinds of task whose process stays for the next one. Stress pins its process to one core
#: and is rare: each run gets a fresh process.
WARM_KINDS = frozenset({"cpu", "mem", "exec"})


def stop_job_servers() -> None:
    """Stop the fork server and multiprocessing's resource tracker, and reap them.

    Both would end by themselves once the daemon's end of their pipes closes, but only after the
    daemon has exited, as orphans for a moment; stopping them here means no process outlives
    vestad. ``_stop`` is what multiprocessing's own tests use; it is absent on some versions.
    """
    from multiprocessing import forkserver, resource_tracker

    for server in (forkserver._forkserver, resource_tracker._resource_tracker):
        stop = getattr(server, "_stop", None)
        if stop is not None:
            try:
                stop()
            except (OSError, ChildProcessError) as exc:
                logger.debug("stopping %s: %s", type(server).__name__, exc)


def servers_cpu_seconds() -> float:
    """CPU seconds the fork server and multiprocessing's resource tracker have used: the
    daemon's own work (the fork server's start, a job process's fork), neither its owner's nor
    lent. 0.0 for one not running."""
    from multiprocessing import forkserver, resource_tracker

    total = 0.0
    for pid in (getattr(forkserver._forkserver, "_forkserver_pid", None),
                getattr(resource_tracker._resource_tracker, "_pid", None)):
        if not pid:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    return total


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class JobSpace:
    """The places one node's job processes live in: claimed at start, released at a clean exit.

    ``tmpdir`` (``/tmp/vestad-NAME.UID``, mode 0700) holds multiprocessing's files (the fork
    server's socket) and the exec working directories. The daemon holds a lock on it for its
    whole life, so a daemon that starts and gets the lock knows that whatever is inside was left
    by one of this node that died, and removes it.

    ``cgroup``, where the daemon may create a cgroup v2 under its own (root, or a delegated
    subtree such as systemd's ``Delegate=yes``), is the parent of one cgroup per job process,
    created with the first of them; None elsewhere.
    """

    tmpdir: str | None = None
    cgroup: str | None = None
    lock: int | None = None
    replaced: str | None = None  # multiprocessing's temp directory before this one

    def job_cgroup(self, name: str) -> str | None:
        """A new cgroup for one job process, or None where there is none to have."""
        if self.cgroup is None:
            return None
        path = os.path.join(self.cgroup, name)
        try:
            try:
                os.mkdir(path)
            except FileNotFoundError:  # the first command's: its parent first
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.cgroup)
                os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as exc:
            logger.warning("cannot create the cgroup %s: %s", path, exc)
            return None
        return path

    def close(self) -> None:
        """Remove the space: kill what is left in its cgroups, remove them and the directory."""
        global _space
        if self.cgroup is not None:
            _remove_cgroups(self.cgroup)
            self.cgroup = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            config = _multiprocessing_config()
            if config.get("tempdir") == self.tmpdir:
                if self.replaced is None:
                    del config["tempdir"]
                else:
                    config["tempdir"] = self.replaced
            self.tmpdir = None
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        if _space is self:
            _space = None


def open_job_space(name: str, root: str = SPACE_ROOT) -> JobSpace:
    """Claim the job space of node ``name``, clean what a dead daemon of the node left in it,
    and make it multiprocessing's temp directory. Never fails: without a directory of its own,
    multiprocessing makes its usual ``pymp-*`` one; without a cgroup, exec jobs run without."""
    global _space
    space = JobSpace()
    try:
        _claim_tmpdir(space, os.path.join(root, f"vestad-{name}.{os.getuid()}"), root)
    except OSError as exc:
        logger.warning("no private directory for job processes in %s: %s", root, exc)
    if space.tmpdir is not None:
        # multiprocessing has no public setting for its temp directory; get_temp_dir() uses
        # this one when it is set, and neither removes nor replaces it
        config = _multiprocessing_config()
        space.replaced = config.get("tempdir")
        config["tempdir"] = space.tmpdir
        space.cgroup = delegated_cgroup(os.path.basename(space.tmpdir))
        if space.cgroup is not None:
            _remove_cgroups(space.cgroup, "left by a vestad of this node that was killed")
        _sweep_abandoned(space, root)
    logger.info("job processes: files in %s; %s", space.tmpdir or root,
                f"a cgroup each, under {space.cgroup}" if space.cgroup
                else "no cgroups (no delegated cgroup v2 here)")
    _space = space
    return space


def _multiprocessing_config() -> dict[str, Any]:
    process: Any = multiprocessing.current_process()
    config: dict[str, Any] = process._config
    return config


def _claim_tmpdir(space: JobSpace, path: str, root: str) -> None:
    """Make ``path`` this daemon's, locked for its life, emptied of what a dead daemon left; or a
    fresh directory of its own when a live daemon of the same node holds it."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        logger.warning("%s is not a directory of this user; using another one", path)
        path = tempfile.mkdtemp(prefix=os.path.basename(path).rsplit(".", 1)[0] + ".", dir=root)
    os.chmod(path, 0o700)
    lock = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        logger.warning("another vestad of this node uses %s; using another directory", path)
        path = tempfile.mkdtemp(prefix=os.path.basename(path).rsplit(".", 1)[0] + ".", dir=root)
        lock = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    left = [entry for entry in os.scandir(path) if entry.name != ".lock"]
    for entry in left:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    if left:
        logger.info("removed %d files left in %s by a vestad of this node that was killed",
                    len(left), path)
    space.tmpdir, space.lock = path, lock


def _sweep_abandoned(space: JobSpace, root: str) -> None:
    """Remove the job spaces of this user's other nodes whose daemon was killed and has not
    started again (several nodes on one machine, one of them gone for good): each one's
    directory in ``root`` and, beside this daemon's, its cgroups and what runs in them. A space
    is abandoned when nobody holds its lock; it is locked here while it goes, so a daemon of that
    node starting meanwhile takes a directory of its own."""
    assert space.tmpdir is not None
    mine = os.path.basename(space.tmpdir)
    cgroups = None if space.cgroup is None else os.path.dirname(space.cgroup)
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith("vestad-") and e.name != mine]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
            lock = os.open(os.path.join(entry.path, ".lock"), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live daemon's
            os.close(lock)
            continue
        try:
            if cgroups is not None:
                _remove_cgroups(os.path.join(cgroups, entry.name),
                                f"left by a killed vestad ({entry.name})")
            shutil.rmtree(entry.path, ignore_errors=True)
            logger.info("removed %s, left by a vestad that was killed", entry.path)
        finally:
            os.close(lock)


def _remove_cgroups(parent: str, why: str = "") -> None:
    """Kill and remove every cgroup directly below ``parent`` (each holds one job process and
    what it started), then ``parent`` itself."""
    try:
        children = [entry.path for entry in os.scandir(parent) if entry.is_dir()]
    except OSError:
        return
    for path in children:
        if not jobs.kill_cgroup(path):
            logger.warning("cannot remove the cgroup %s", path)
    if children and why:
        logger.info("removed %d job process cgroups %s, and what was in them", len(children), why)
    with contextlib.suppress(OSError):
        os.rmdir(parent)


def delegated_cgroup(name: str, proc: str = "/proc/self") -> str | None:
    """Where this process may create a cgroup v2 ``name`` under its own, or None where it cannot.

    Needs a cgroup v2 hierarchy, the right to create a child of the process's own cgroup and to
    move processes there (root, or a delegated subtree), and ``cgroup.kill`` (Linux 5.14). Tried
    by creating it; one created here is removed again, one that was there is left as it was.
    """
    try:
        with open(os.path.join(proc, "cgroup")) as f:
            cgroups = f.read()
        with open(os.path.join(proc, "mountinfo")) as f:
            mounts = f.read()
    except OSError:
        return None
    own = own_cgroup_dir(cgroups, mounts)
    if own is None:
        return None
    path = os.path.join(own, name)
    created = False
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        pass
    except OSError:  # not ours to create (EACCES, EROFS, ...)
        return None
    usable = os.path.exists(os.path.join(path, "cgroup.kill")) and all(
        os.access(os.path.join(d, "cgroup.procs"), os.W_OK) for d in (own, path))
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(path)
    return path if usable else None


def own_cgroup_dir(cgroups: str, mountinfo: str) -> str | None:
    """The directory of this process's cgroup v2, from /proc/self/cgroup and
    /proc/self/mountinfo; None without a cgroup v2 hierarchy."""
    own = next((line[3:] for line in cgroups.splitlines() if line.startswith("0::")), None)
    if own is None or not own.startswith("/") or own.endswith(" (deleted)"):
        return None
    for line in mountinfo.splitlines():
        mine, sep, theirs = line.partition(" - ")
        fields = mine.split()
        if not sep or len(fields) < 5 or theirs.split()[:1] != ["cgroup2"]:
            continue
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if own == mount_root or own.startswith(mount_root.rstrip("/") + "/"):
            return os.path.join(mount_point, own[len(mount_root):].lstrip("/")).rstrip("/")
    return None


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash come as octal escapes."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


@dataclass
class _Worker:
    """One job process and the daemon's end of its pipe, warm or not."""

    process: Any
    conn: Connection
    lend: bool
    warm: bool  # whether it waits for another task once its task is done
    cgroup: str | None = None  # its own, where its commands run too
    piece: _Piece | None = None  # what it runs now; None while idle
    idle_since: float = 0.0
    ending: bool = False  # killed or retired: it takes no more tasks


@dataclass
class _Piece:
    """One piece of a task, known to the executor by its worker id, running in a worker."""

    worker_id: str
    kind: str
    worker: _Worker
    kill_at: float | None = None  # when an exec piece asked to stop gets SIGKILL
    share: str | None = None  # the group whose unit counter it shares
    pgid: int | None = None
    credit: int = 0  # output credit not yet sent to its process
    paused_at: float | None = None  # when it was paused for the owner; None while it runs
    stopped: set[int] = field(default_factory=set)  # process groups SIGSTOPped to pause it
    resumed_s: float = 0.0  # seconds paused not yet told its process (its deadline moves)


class Supervisor(threading.Thread):
    """Owns every job process. Its methods may be called from any thread; they never block.

    A job process that has run a cpu, mem or exec task stays, blocked on its pipe, and takes the
    next task of its pool: local work and lent work have a pool each, because a process that
    lent its CPU at nice 19 and ``SCHED_IDLE`` may not take normal priority back. A process idle
    for ``idle_seconds`` retires, so a daemon with nothing to do keeps no job process. A process
    whose task was killed, or failed inside the job code, is never reused; stress always gets a
    fresh process.
    """

    def __init__(self, report: Callable[[Message], object], space: JobSpace | None = None,
                 idle_seconds: float = IDLE_SECONDS) -> None:
        super().__init__(name="vesta-supervisor", daemon=True)
        self.report = report
        self.space = space if space is not None else _space
        self.idle_seconds = idle_seconds
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)  # one byte waiting is wake-up enough: never block on it
        # what the thread waits on: the wake-up socket, every job process's sentinel, and the
        # pipe of every process running a piece
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._workers: list[_Worker] = []  # every live job process
        self._idle: dict[bool, list[_Worker]] = {False: [], True: []}  # lend -> idle, last on top
        self._pieces: dict[str, _Piece] = {}  # worker id -> the piece it runs
        self._counters: dict[str, jobs.UnitCounter] = {}  # share group -> its unit counter
        self._closing = False
        # the lent CPU meter, read by the sampler's thread
        self._meter_lock = threading.Lock()
        self._lent_seen: dict[int, float] = {}  # pid of a lent process -> CPU it had used
        self._lent_gone = 0.0  # CPU of lent processes that have ended
        #: Told when a piece for a peer is started (the sampler then reads the load more often).
        self.on_lend: Callable[[], object] | None = None

    # -- called from other threads -----------------------------------------------------------------

    def start_worker(self, worker_id: str, kind: str, params: dict[str, Any], lend: bool) -> None:
        self._command("start", worker_id, kind, params, lend)
        if lend and self.on_lend is not None:
            self.on_lend()

    def kill(self, worker_id: str) -> None:
        self._command("kill", worker_id)

    def credit(self, worker_id: str, size: int) -> None:
        """Let an exec worker send ``size`` more bytes of its command's output."""
        self._command("credit", worker_id, size)

    def pause(self, worker_id: str) -> None:
        """Stop a piece where it is, its command and what that started too: freeze its
        process's cgroup, or SIGSTOP its process group and its command's."""
        self._command("pause", worker_id)

    def resume(self, worker_id: str) -> None:
        """Let a paused piece run again; an exec's deadline moves by the time it was paused."""
        self._command("resume", worker_id)

    def lending(self) -> bool:
        """Whether a piece runs, or is paused, for a peer now."""
        return any(piece.worker.lend for piece in list(self._pieces.values()))

    def lent_cpu_seconds(self) -> float:
        """The CPU the job processes lent to peers have used, their commands and what those
        left included, since this supervisor started: it never goes down, a process that ended
        keeps counting what it had used. Read from their cgroups where they have one."""
        with self._meter_lock:
            live: dict[int, float] = {}
            for worker in list(self._workers):
                if worker.lend and worker.process.pid is not None:
                    pid = worker.process.pid  # never less than before: a process read from /proc
                    # until it is in its cgroup, then from the cgroup, which counts from there
                    live[pid] = max(_cpu_of(worker), self._lent_seen.get(pid, 0.0))
            self._lent_gone += sum(v for pid, v in self._lent_seen.items() if pid not in live)
            self._lent_seen = live
            return self._lent_gone + sum(live.values())

    def shutdown(self, timeout: float = 5.0) -> None:
        """Kill every worker and end the thread."""
        self._command("close")
        self.join(timeout)

    def _command(self, *command: Any) -> None:
        self._commands.put(command)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # -- the thread --------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                try:
                    self._run_commands()
                    if self._closing and not self._workers:
                        break
                    self._send_credits()
                    for key, _ in self._selector.select(self._timers()):
                        self._on_ready(key.data)
                except Exception:  # one bad round must not stop every later job
                    logger.exception("the job supervisor hit an error; it goes on")
                    time.sleep(0.1)  # and does not spin if the error repeats
        finally:
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case ("start", worker_id, kind, params, lend):
                    self._start(worker_id, kind, params, lend)
                case ("kill", worker_id):
                    if worker_id in self._pieces:
                        self._kill(self._pieces[worker_id])
                case ("credit", worker_id, size):
                    if worker_id in self._pieces:
                        self._pieces[worker_id].credit += size
                case ("pause", worker_id):
                    if worker_id in self._pieces:
                        self._pause(self._pieces[worker_id])
                case ("resume", worker_id):
                    if worker_id in self._pieces:
                        self._resume(self._pieces[worker_id])
                case ("close",):
                    self._closing = True
                    for piece in list(self._pieces.values()):
                        self._kill(piece)
                    for idle in self._idle.values():
                        while idle:
                            self._end(idle.pop())

    def _start(self, worker_id: str, kind: str, params: dict[str, Any], lend: bool) -> None:
        if self._closing:
            self.report(WorkerExited(worker_id, 1, "the daemon is stopping"))
            return
        share = params.get("share")
        try:
            if share is not None and share not in self._counters:
                # one counter per group, held until the group has ended
                self._counters[share] = jobs.UnitCounter.create(params["start"])
            if kind == "exec" and self.space is not None:
                params = {**params, "tmpdir": self.space.tmpdir}
            worker = self._take_idle(lend) if kind in WARM_KINDS else None
            if worker is None or not self._assign(worker, worker_id, kind, params):
                worker = self._spawn(kind, lend)
                if not self._assign(worker, worker_id, kind, params):
                    raise OSError("the new job process closed its pipe")
        except Exception as exc:  # out of file descriptors; the fork server cannot fork
            logger.error("cannot start a %s worker: %s", kind, exc)
            self._release(share)
            self.report(WorkerExited(worker_id, 1, f"cannot start a job process: {exc}"))

    def _take_idle(self, lend: bool) -> _Worker | None:
        """The idle process of the pool that ran last, if any is left alive."""
        idle = self._idle[lend]
        while idle:
            worker = idle.pop()
            if not wait([worker.process.sentinel], 0):
                return worker
            self._reap(worker)  # it died while idle
        return None

    def _spawn(self, kind: str, lend: bool) -> _Worker:
        """A new job process from the fork server, waiting for its first task."""
        ctx = job_context()
        conn, theirs = ctx.Pipe(duplex=True)  # a socket pair: it may carry file descriptors
        cgroup = (self.space.job_cgroup(f"job-{next(_CGROUP_SERIAL)}")
                  if self.space is not None else None)
        process = ctx.Process(target=jobs.serve, args=(theirs, lend, cgroup), name="vesta-job",
                              daemon=True)
        try:
            process.start()
        except BaseException:
            conn.close()
            if cgroup is not None:
                jobs.kill_cgroup(cgroup, wait=0.0)
            raise
        finally:
            theirs.close()
        worker = _Worker(process, conn, lend, warm=kind in WARM_KINDS, cgroup=cgroup)
        self._workers.append(worker)
        self._selector.register(process.sentinel, selectors.EVENT_READ, (worker, "ended"))
        return worker

    def _assign(self, worker: _Worker, worker_id: str, kind: str, params: dict[str, Any],
                ) -> bool:
        """Hand a piece to a waiting process; False (and the process ends) if it is gone."""
        share = params.get("share")
        piece = _Piece(worker_id, kind, worker, share=share)
        try:
            worker.conn.send(("task", kind, params))
            if share is not None:
                send_handle(worker.conn, self._counters[share].fd, worker.process.pid)
        except (OSError, ValueError):
            self._end(worker)
            return False
        worker.piece = piece
        self._pieces[worker_id] = piece
        self._selector.register(worker.conn, selectors.EVENT_READ, (worker, "report"))
        return True

    def _on_ready(self, what: tuple[_Worker, str] | None) -> None:
        if what is None:  # the wake-up socket: commands are waiting
            self._wake_r.recv(4096)
            return
        worker, event = what
        if worker not in self._workers:  # reaped earlier in this round
            return
        if event == "report":
            if not self._read(worker, ready=True):
                # its pipe closed: the process is ending, and its sentinel says when it has.
                # Watched on, the closed pipe would be ready at every round, and this thread
                # spin at full speed until then, starving an ending process that lent at
                # SCHED_IDLE on the same core: it might never end.
                self._unwatch(worker.conn)
        else:  # it ended: what it sent before goes first
            while worker.piece is not None and self._read(worker):
                pass
            self._reap(worker)

    def _read(self, worker: _Worker, ready: bool = False) -> bool:
        """Take one report from the worker's pipe (known to be readable if ``ready``); False
        when there is none (or it closed)."""
        piece = worker.piece
        try:
            if piece is None or not (ready or worker.conn.poll()):
                return False
            event = worker.conn.recv()
        except (EOFError, OSError):
            return False
        match event:
            case ("units", dict(units)):
                self.report(WorkerUnits(piece.worker_id, units))
            case ("out", str(stream), bytes(data)):
                self.report(WorkerOutput(piece.worker_id, stream, data))
            case ("pgid", int(pgid)):
                piece.pgid = pgid
            case ("done", int(code), str(error), dict(detail), bool(reusable), float(cpu_s)):
                self._done(worker, piece,
                           WorkerExited(piece.worker_id, code, error, detail, cpu_s), reusable)
            case _:
                logger.warning("worker %s sent an unknown report %r", piece.worker_id, event)
        return True

    def _done(self, worker: _Worker, piece: _Piece, exited: WorkerExited,
              reusable: bool) -> None:
        """A piece ended and its process cleaned up after it: report it, and keep the process
        for the next task of its pool or end it."""
        worker.piece = None
        self._unwatch(worker.conn)
        del self._pieces[piece.worker_id]
        self._release(piece.share)
        self.report(exited)
        if worker.warm and reusable and not worker.ending and not self._closing:
            worker.idle_since = time.monotonic()
            self._idle[worker.lend].append(worker)
        else:
            self._end(worker)

    def _unwatch(self, conn: Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)

    def _release(self, share: str | None) -> None:
        """Drop a group's unit counter once no piece of it runs."""
        if share is not None and not any(p.share == share for p in self._pieces.values()):
            counter = self._counters.pop(share, None)
            if counter is not None:
                counter.close()

    def _reap(self, worker: _Worker) -> None:
        """A job process ended: forget it, and report its piece if it died running one."""
        worker.process.join(1.0)
        self._selector.unregister(worker.process.sentinel)
        piece, worker.piece = worker.piece, None
        if piece is not None:
            self._unwatch(worker.conn)
        worker.conn.close()
        self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle[worker.lend].remove(worker)
        if piece is not None and piece.pgid is not None:  # it died before cleaning up
            exits.kill_group(piece.pgid)
        if worker.cgroup is not None and not jobs.kill_cgroup(worker.cgroup, wait=0.2):
            logger.warning("cannot remove the cgroup %s; it goes when the daemon stops",
                           worker.cgroup)
        if piece is not None:
            del self._pieces[piece.worker_id]
            self._release(piece.share)
            status = worker.process.exitcode
            code = exits.from_returncode(status) if status is not None and status < 0 else 1
            killed = status is not None and status < 0
            how = f"was killed by signal {-status}" if killed else f"exited with status {status}"
            self.report(WorkerExited(piece.worker_id, code,
                                     f"the job process {how} before it finished", {}))
        with contextlib.suppress(ValueError):
            worker.process.close()

    def _pause(self, piece: _Piece) -> None:
        if piece.paused_at is not None or piece.worker.ending:  # a killed one is let die
            return
        piece.paused_at = time.monotonic()
        worker = piece.worker
        if worker.cgroup is not None and _freeze(worker.cgroup, True) and _populated(
                worker.cgroup):
            return
        # no cgroup, or not in it yet: a process that is still starting leads no group yet
        # either (the freeze above holds it once it moves in)
        piece.stopped = _groups_below(worker.process.pid) | (
            {piece.pgid} if piece.pgid is not None else set())
        _signal(worker.process.pid, signal.SIGSTOP)
        for group in piece.stopped:
            exits.kill_group(group, signal.SIGSTOP)

    def _resume(self, piece: _Piece) -> None:
        """Thaw and SIGCONT a paused piece (both: harmless where it was not stopped so)."""
        if piece.paused_at is None:
            return
        worker = piece.worker
        if piece.kind == "exec":  # its deadline counts running time only: told before it runs
            piece.resumed_s += time.monotonic() - piece.paused_at
            if _writable(worker.conn):
                with contextlib.suppress(OSError, ValueError):
                    worker.conn.send(("resumed", piece.resumed_s))
                    piece.resumed_s = 0.0
        if worker.cgroup is not None:
            _freeze(worker.cgroup, False)
        if piece.stopped:
            _signal(worker.process.pid, signal.SIGCONT)
        for group in piece.stopped:
            exits.kill_group(group, signal.SIGCONT)
        piece.stopped = set()
        piece.paused_at = None

    def _kill(self, piece: _Piece) -> None:
        """Stop a piece, and its process with it: an exec worker first gets SIGTERM to clean up
        after its command (a paused one is let run first, so that it can)."""
        self._resume(piece)
        worker = piece.worker
        worker.ending = True
        if piece.pgid is not None:  # the command runs: its session goes now, the rest with the
            exits.kill_group(piece.pgid)  # worker's clean-up and its cgroup once it ended
        if piece.kind == "exec" and piece.kill_at is None:
            piece.kill_at = time.monotonic() + TERM_GRACE
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.kill(worker.process.pid, signal.SIGTERM)
            return
        self._end(worker)

    def _end(self, worker: _Worker) -> None:
        """SIGKILL a process that is to take no more tasks; it is reaped when its sentinel
        fires."""
        worker.ending = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            worker.process.kill()

    def _send_credits(self) -> None:
        """Send each piece the output credit it was given, summed, where its pipe has room.

        The supervisor never blocks on a job process: one that writes its output in small pieces
        gets a credit for each, and a process blocked on sending its output does not read them;
        a blocking send here would then wait for it while it waits for this thread to read.
        A Unix socket polls writable only with room for far more than one small message.
        """
        for piece in self._pieces.values():
            if piece.credit and _writable(piece.worker.conn):
                with contextlib.suppress(OSError, ValueError):
                    piece.worker.conn.send(("credit", piece.credit))
                piece.credit = 0
            if piece.resumed_s and piece.paused_at is None and _writable(piece.worker.conn):
                with contextlib.suppress(OSError, ValueError):
                    piece.worker.conn.send(("resumed", piece.resumed_s))
                piece.resumed_s = 0.0

    def _timers(self) -> float | None:
        """SIGKILL pieces whose grace is over and retire processes idle for too long; return the
        seconds until the next of either is due."""
        now = time.monotonic()
        pending = []
        for piece in self._pieces.values():
            if piece.credit or (piece.resumed_s and piece.paused_at is None):
                pending.append(CREDIT_RETRY)  # its pipe was full: try again soon
            if piece.kill_at is None:
                continue
            if piece.kill_at <= now:
                self._end(piece.worker)
            else:
                pending.append(piece.kill_at - now)
        for idle in self._idle.values():
            for worker in list(idle):
                retire_at = worker.idle_since + self.idle_seconds
                if retire_at <= now:
                    idle.remove(worker)
                    self._end(worker)
                else:
                    pending.append(retire_at - now)
        return min(pending) if pending else None


def _freeze(cgroup: str, frozen: bool) -> bool:
    """Freeze or thaw a cgroup v2 and what is in it; False where it cannot be done."""
    try:
        with open(os.path.join(cgroup, "cgroup.freeze"), "w") as f:
            f.write("1" if frozen else "0")
    except OSError:
        return False
    return True


def held(pid: int) -> bool:
    """Whether a process is stopped, or will be at its next instant on the CPU: stopped or
    gone, a SIGSTOP pending, or its cgroup told to freeze. A process at SCHED_IDLE that its
    owner's work starves may get that instant only every second or two, and no CPU between."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/cgroup") as f:
            cgroups = f.read()
        with open("/proc/self/mountinfo") as f:
            mounts = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    if state in ("T", "t", "Z", "X"):
        return True
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    if pending & (1 << (signal.SIGSTOP - 1)):
        return True
    cgroup = own_cgroup_dir(cgroups, mounts)
    try:
        with open(os.path.join(cgroup or "/nonexistent", "cgroup.freeze")) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _signal(pid: int | None, signum: int) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _populated(cgroup: str) -> bool:
    """Whether a process is in the cgroup (a job process that could not move there is not)."""
    try:
        with open(os.path.join(cgroup, "cgroup.events")) as f:
            return "populated 1" in f.read()
    except OSError:
        return False


def _groups_below(pid: int) -> set[int]:
    """The process groups of a job process (it leads its own) and of everything below it: an
    exec's command stands in a session of its own, and may have started others."""
    groups = {pid}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(child.pid))
    return groups


def _cpu_of(worker: _Worker) -> float:
    """CPU seconds a job process and everything below it used: its cgroup's, where it is in one,
    else what /proc says of it and of its live descendants, each with its waited-for children."""
    if worker.cgroup is not None:
        try:
            with open(os.path.join(worker.cgroup, "cpu.stat")) as f:
                usage = next((int(line.split()[1]) for line in f
                              if line.startswith("usage_usec ")), 0)
            if usage:  # else the process is not in it: it could not move there
                return usage / 1e6
        except (OSError, ValueError, IndexError):
            pass
    try:
        root = psutil.Process(worker.process.pid)
        total = 0.0
        for proc in (root, *root.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total
    except (psutil.Error, ValueError, TypeError):
        return 0.0


def _writable(conn: Connection) -> bool:
    """Whether a send on ``conn`` would not block now."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLOUT)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False
