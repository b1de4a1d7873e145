"""The process supervisor: one long-lived thread that starts, watches and kills job processes.

Job processes come from a ``forkserver`` preloaded with :mod:`vesta.workers.jobs`: the daemon has
threads, and forking it could hand a child a lock some thread held. The fork server is a fresh
interpreter with one thread, started on the first job (an idle daemon pays nothing for it), and
every job process is forked from it. Each worker is one ``Process`` with a one-way ``Pipe``,
watched through its pipe and its ``sentinel`` with ``multiprocessing.connection.wait``, so any
single worker can be killed without disturbing the others. The thread reports what happens as
messages to its actor.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
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
class _Worker:
    worker_id: str
    kind: str
    process: Any
    reader: Connection
    kill_at: float | None = None  # when a worker asked to stop gets SIGKILL
    share: str | None = None  # the group whose unit counter it shares
    pgid: int | None = None
    done: tuple[int, str, dict[str, Any]] | None = None
    units: dict[int, bytes] = field(default_factory=dict)


class Supervisor(threading.Thread):
    """Owns every job process. Its methods may be called from any thread; they never block."""

    def __init__(self, report: Callable[[Message], object]) -> None:
        super().__init__(name="vesta-supervisor", daemon=True)
        self.report = report
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
            reader, writer = ctx.Pipe(duplex=False)
        except OSError as exc:  # out of file descriptors, say
            self.report(WorkerExited(worker_id, 1, f"cannot start a job process: {exc}"))
            return
        process = ctx.Process(
            target=jobs.run, args=(writer, kind, params, lend), name=f"vesta-{kind}", daemon=True
        )
        try:
            process.start()
        except Exception as exc:  # the fork server could not start or fork
            logger.error("cannot start a %s worker: %s", kind, exc)
            reader.close()
            self.report(WorkerExited(worker_id, 1, f"cannot start a job process: {exc}"))
            return
        finally:
            writer.close()
        self._workers[worker_id] = _Worker(worker_id, kind, process, reader, share=share)

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

