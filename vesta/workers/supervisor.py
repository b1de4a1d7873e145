"""The process supervisor: one long-lived thread that starts, watches and kills job processes.

Job processes come from a ``forkserver`` preloaded with :mod:`vesta.workers.jobs`: the daemon has
threads, and forking it could hand a child a lock some thread held. The fork server is a fresh
interpreter with one thread, started on the first job (an idle daemon pays nothing for it), and
every job process is forked from it. Each worker is one ``Process`` with a one-way ``Pipe``,
watched through its pipe and its ``sentinel`` with ``multiprocessing.connection.wait``, so any
single worker can be killed without disturbing the others. The thread reports what happens as
messages to its actor.

The daemon claims a :class:`JobSpace` for its node at start: a private temp directory for
multiprocessing's files and the exec working directories (so that nothing piles up in /tmp after
a crash), and, where it has a delegated cgroup v2, one cgroup per exec command (so that nothing a
command starts outlives its job, whatever session it moves to).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import queue
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
from typing import Any

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


@dataclass
class JobSpace:
    """The places one node's job processes live in: claimed at start, released at a clean exit.

    ``tmpdir`` (``/tmp/vestad-NAME.UID``, mode 0700) holds multiprocessing's files (the fork
    server's socket) and the exec working directories. The daemon holds a lock on it for its
    whole life, so a daemon that starts and gets the lock knows that whatever is inside was left
    by one of this node that died, and removes it.

    ``cgroup``, where the daemon may create a cgroup v2 under its own (root, or a delegated
    subtree such as systemd's ``Delegate=yes``), is the parent of one cgroup per exec command,
    created with the first of them; None elsewhere.
    """

    tmpdir: str | None = None
    cgroup: str | None = None
    lock: int | None = None
    replaced: str | None = None  # multiprocessing's temp directory before this one

    def job_cgroup(self, worker_id: str) -> str | None:
        """A new cgroup for one exec command, or None where there is none to have."""
        if self.cgroup is None:
            return None
        path = os.path.join(self.cgroup, worker_id)
        for directory in (self.cgroup, path):
            try:
                os.mkdir(directory)
            except FileExistsError:
                pass
            except OSError as exc:
                logger.warning("cannot create the cgroup %s: %s", directory, exc)
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
    logger.info("job processes: files in %s; exec commands in %s", space.tmpdir or root,
                f"a cgroup each, under {space.cgroup}" if space.cgroup
                else "no cgroup (no delegated cgroup v2 here)")
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


def _remove_cgroups(parent: str, why: str = "") -> None:
    """Kill and remove every cgroup directly below ``parent`` (each holds one exec command), then
    ``parent`` itself."""
    try:
        children = [entry.path for entry in os.scandir(parent) if entry.is_dir()]
    except OSError:
        return
    for path in children:
        if not jobs.kill_cgroup(path):
            logger.warning("cannot remove the cgroup %s", path)
    if children and why:
        logger.info("killed %d exec jobs %s", len(children), why)
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
    worker_id: str
    kind: str
    process: Any
    reader: Connection
    kill_at: float | None = None  # when a worker asked to stop gets SIGKILL
    share: str | None = None  # the group whose unit counter it shares
    cgroup: str | None = None  # an exec command's own cgroup
    pgid: int | None = None
    done: tuple[int, str, dict[str, Any]] | None = None
    units: dict[int, bytes] = field(default_factory=dict)


class Supervisor(threading.Thread):
    """Owns every job process. Its methods may be called from any thread; they never block."""

    def __init__(self, report: Callable[[Message], object], space: JobSpace | None = None) -> None:
        super().__init__(name="vesta-supervisor", daemon=True)
        self.report = report
        self.space = space if space is not None else _space
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._workers: dict[str, _Worker] = {}
        self._counters: dict[str, Any] = {}  # share group -> shared unit counter
        self._closing = False

    # -- called from other threads -----------------------------------------------------------------

    def start_worker(self, worker_id: str, kind: str, params: dict[str, Any], lend: bool) -> None:
        self._command("start", worker_id, kind, params, lend)

    def kill(self, worker_id: str) -> None:
        self._command("kill", worker_id)

    def credit(self, worker_id: str, size: int) -> None:
        """Let an exec worker send ``size`` more bytes of its command's output."""
        self._command("credit", worker_id, size)

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
                    watched: list[Any] = [self._wake_r]
                    for w in self._workers.values():
                        watched += [w.reader, w.process.sentinel]
                    for ready in wait(watched, timeout=self._kill_overdue()):
                        self._on_ready(ready)
                except Exception:  # one bad round must not stop every later job
                    logger.exception("the job supervisor hit an error; it goes on")
                    time.sleep(0.1)  # and does not spin if the error repeats
        finally:
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
                    if worker_id in self._workers:
                        self._kill(self._workers[worker_id])
                case ("credit", worker_id, size):
                    if worker_id in self._workers:
                        with contextlib.suppress(OSError, ValueError):
                            self._workers[worker_id].reader.send(("credit", size))
                case ("close",):
                    self._closing = True
                    for worker in self._workers.values():
                        self._kill(worker)

    def _start(self, worker_id: str, kind: str, params: dict[str, Any], lend: bool) -> None:
        if self._closing:
            self.report(WorkerExited(worker_id, 1, "the daemon is stopping"))
            return
        ctx = job_context()
        share = params.get("share")
        try:
            if share is not None:
                # one counter per group, created here rather than in an actor (the first one
                # starts multiprocessing's resource tracker) and held until the group has ended:
                # dropping it early would unlink its lock before the workers open it
                if share not in self._counters:
                    self._counters[share] = ctx.Value("q", params["start"])
                params = {**params, "next": self._counters[share]}
            # exec workers hear their output credits back over the same pipe
            reader, writer = ctx.Pipe(duplex=kind == "exec")
        except OSError as exc:  # out of file descriptors, say
            self.report(WorkerExited(worker_id, 1, f"cannot start a job process: {exc}"))
            return
        cgroup = None
        if kind == "exec" and self.space is not None:
            cgroup = self.space.job_cgroup(worker_id)
            params = {**params, "tmpdir": self.space.tmpdir, "cgroup": cgroup}
        process = ctx.Process(
            target=jobs.run, args=(writer, kind, params, lend), name=f"vesta-{kind}", daemon=True
        )
        try:
            process.start()
        except Exception as exc:  # the fork server could not start or fork
            logger.error("cannot start a %s worker: %s", kind, exc)
            reader.close()
            if cgroup is not None:
                jobs.kill_cgroup(cgroup)
            self.report(WorkerExited(worker_id, 1, f"cannot start a job process: {exc}"))
            return
        finally:
            writer.close()
        self._workers[worker_id] = _Worker(worker_id, kind, process, reader, share=share,
                                           cgroup=cgroup)

    def _on_ready(self, ready: Any) -> None:
        if ready is self._wake_r:
            self._wake_r.recv(4096)
            return
        for worker in list(self._workers.values()):
            if ready is worker.reader:
                self._read(worker)
                self._flush_units(worker)
            elif ready == worker.process.sentinel:
                while self._read(worker):
                    pass
                self._flush_units(worker)
                self._reap(worker)

    def _read(self, worker: _Worker) -> bool:
        """Take one report from the worker's pipe; False when there is none (or it closed)."""
        try:
            if not worker.reader.poll():
                return False
            event = worker.reader.recv()
        except (EOFError, OSError):
            return False
        match event:
            case ("units", dict(units)):
                worker.units.update(units)
            case ("out", str(stream), bytes(data)):
                self.report(WorkerOutput(worker.worker_id, stream, data))
            case ("pgid", int(pgid)):
                worker.pgid = pgid
            case ("done", int(code), str(error), dict(detail)):
                worker.done = (code, error, detail)
            case _:
                logger.warning("worker %s sent an unknown report %r", worker.worker_id, event)
        return True

    def _flush_units(self, worker: _Worker) -> None:
        if worker.units:
            self.report(WorkerUnits(worker.worker_id, worker.units))
            worker.units = {}

    def _reap(self, worker: _Worker) -> None:
        worker.process.join(1.0)
        worker.reader.close()
        del self._workers[worker.worker_id]
        if worker.share is not None and not any(
            w.share == worker.share for w in self._workers.values()
        ):
            self._counters.pop(worker.share, None)
        if worker.pgid is not None and worker.done is None:  # it died before cleaning up
            exits.kill_group(worker.pgid)
        if worker.cgroup is not None and not jobs.kill_cgroup(worker.cgroup, wait=0.2):
            logger.warning("cannot remove the cgroup %s; it goes when the daemon stops",
                           worker.cgroup)
        if worker.done is not None:
            code, error, detail = worker.done
        else:
            status = worker.process.exitcode
            code = exits.from_returncode(status) if status is not None and status < 0 else 1
            killed = status is not None and status < 0
            how = f"was killed by signal {-status}" if killed else f"exited with status {status}"
            error = f"the job process {how} before it finished"
            detail = {}
        with contextlib.suppress(ValueError):
            worker.process.close()
        self.report(WorkerExited(worker.worker_id, code, error, detail))

    def _kill(self, worker: _Worker) -> None:
        """Stop a worker: an exec worker first gets SIGTERM to clean up after its command."""
        if worker.pgid is not None:
            exits.kill_group(worker.pgid)
        if worker.cgroup is not None:
            jobs.kill_cgroup(worker.cgroup, wait=0.0)
        if worker.kind == "exec" and worker.kill_at is None:
            worker.kill_at = time.monotonic() + TERM_GRACE
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.kill(worker.process.pid, signal.SIGTERM)
            return
        with contextlib.suppress(OSError, ValueError, AttributeError):
            worker.process.kill()

    def _kill_overdue(self) -> float | None:
        """SIGKILL workers whose grace is over; return the seconds until the next one's is."""
        now = time.monotonic()
        pending = []
        for worker in self._workers.values():
            if worker.kill_at is None:
                continue
            if worker.kill_at <= now:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    worker.process.kill()
            else:
                pending.append(worker.kill_at - now)
        return min(pending) if pending else None

