"""The Autopilot actor: takes jobs, queues them, places them, merges results, answers status.

It is the one actor that books this node's worker slots: a job runs when a slot is free, else it
waits in a first-come, first-served queue. A cpu job is cut into tasks of contiguous units; the
units come back one by one, so a task that fails loses only the units it had not finished, and
those are run again. It samples the machine on a timer, which gives the node's load, power mode
and offer for ``status``.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from vesta import PROTOCOL_VERSION, exits
from vesta.actors.base import VestaActor
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.messages import (
    AnyJob,
    CancelAll,
    CancelRequest,
    CancelTask,
    ClientGone,
    ClientRequest,
    CountRunning,
    CpuJob,
    Drain,
    ExecJob,
    JobAccepted,
    JobDone,
    JobOutput,
    JobProgress,
    JobStarted,
    MemJob,
    Message,
    NodeInfo,
    PeersReply,
    PeersRequest,
    RunTask,
    StatusReply,
    StatusRequest,
    SubmitRequest,
    TaskDone,
    TaskOutput,
    TaskUnits,
    Tick,
    ToClient,
)
from vesta.policy import offer_mem_mb, offer_workers, power_state
from vesta.sysstat import Sysstat
from vesta.workers.jobs import UNITS_PER_MILLION, job_digest

logger = logging.getLogger(__name__)

#: How often a job's progress is sent to its client, at most.
PROGRESS_INTERVAL = 0.2
#: A failed part of a job is run again this many times before the job fails.
MAX_ATTEMPTS = 3
MAX_CPU_N = 10_000
MAX_ARGV = 64 * 1024
MAX_MS = 7 * 86400 * 1000
MAX_TIMEOUT = 7 * 86400.0


class JobRefused(ValueError):
    """A job that cannot run: ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Part:
    """A task of a job: units [start, end) on a node."""

    task_id: str
    node: str
    start: int
    end: int
    workers: int
    done: int = 0


@dataclass
class _Job:
    job_id: str
    job: AnyJob
    client: int
    accepted: float
    total: int
    results: dict[int, bytes] = field(default_factory=dict)
    parts: dict[str, _Part] = field(default_factory=dict)
    placements: dict[str, dict[str, float]] = field(default_factory=dict)
    started: float | None = None
    attempts: int = 0
    retried: int = 0
    cancelled: str = ""  # why, once it is cancelled
    cancel_code: int = exits.CANCELLED  # what the client exits with then
    last_progress: float = 0.0
    failure: tuple[int, str] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def done_units(self) -> int:
        return len(self.results) if isinstance(self.job, CpuJob) else 0

    def missing(self) -> list[tuple[int, int]]:
        """The contiguous ranges of units with no result yet."""
        if not isinstance(self.job, CpuJob):
            return [(0, 1)]
        ranges: list[tuple[int, int]] = []
        for i in range(self.total):
            if i in self.results:
                continue
            if ranges and ranges[-1][1] == i:
                ranges[-1] = (ranges[-1][0], i + 1)
            else:
                ranges.append((i, i + 1))
        return ranges


class Autopilot(VestaActor):
    """Places and tracks jobs; knows this node's state."""

    def __init__(
        self, counters: Counters, links: Links, config: Any, fingerprint: str,
        sysstat: Sysstat, address: str,
    ) -> None:
        super().__init__(counters)
        self.links = links
        self.config = config
        self.fingerprint = fingerprint
        self.sysstat = sysstat
        self.address = address
        self.capacity = len(sysstat.cpus)
        self.busy = 0
        self.jobs: dict[str, _Job] = {}
        self.queue: deque[str] = deque()
        self.tasks: dict[str, str] = {}  # task id -> job id
        self.draining = False
        self._task_ids = itertools.count(1)
        self.node = self.sample()

    def on_start(self) -> None:
        self.every(self.config.advertise_spare_ms / 1000, "sample")

    def handle(self, message: Message) -> Any:
        match message:
            case Tick(name="sample"):
                self.node = self.sample()
            case ClientRequest(client=client, request=request):
                self.serve(client, request)
            case TaskUnits(task_id=task_id, units=units):
                self.on_units(task_id, units)
            case TaskOutput(task_id=task_id, stream=stream, data=data):
                job = self._job_of(task_id)
                if job is not None:
                    self.to_client(job.client, JobOutput(job.job_id, stream, data))
            case TaskDone():
                self.on_task_done(message)
            case ClientGone(client=client):
                for gone in [j for j in self.jobs.values() if j.client == client]:
                    self.cancel(gone)
            case Drain():
                self.draining = True
                for job_id in list(self.queue):
                    job = self.jobs[job_id]
                    self.finish(job, error="the daemon is stopping",
                                exit_code=exits.not_finished(job.job.kind))
            case CountRunning():
                return len(self.tasks)
            case CancelAll(reason=reason):  # the daemon stops: the job failed, nobody cancelled
                for job in list(self.jobs.values()):
                    self.cancel(job, reason, exits.not_finished(job.job.kind))
            case _:
                return super().handle(message)
        return None

    # -- this node ---------------------------------------------------------------------------------

    def sample(self) -> NodeInfo:
        reading = self.sysstat.read()
        power = power_state(reading.supplies, self.config.power, self.config.battery_min_pct)
        cfg = self.config
        return NodeInfo(
            name=cfg.name, fingerprint=self.fingerprint, address=self.address,
            version=PROTOCOL_VERSION, cores=reading.cores, cpu_pct=reading.cpu_pct,
            mem_available_mb=reading.mem_available_mb, mem_total_mb=reading.mem_total_mb,
            power=power.mode, willingness=round(power.willingness, 3),
            battery_pct=power.battery_pct,
            offer_workers=offer_workers(reading.cores, cfg.cpu_offer_pct, cfg.reserve_pct,
                                        power.willingness),
            offer_mem_mb=offer_mem_mb(reading.mem_available_mb, reading.mem_total_mb,
                                      cfg.mem_offer_mb, cfg.reserve_pct, power.willingness),
            gpu=reading.gpu, allow_exec=cfg.allow_exec, exec_allowlist=list(cfg.exec_allowlist),
            temps_c=reading.temps_c,
        )

    def node_doc(self) -> dict[str, Any]:
        doc = dict(zip(self.node.fields, self.node.values(), strict=True))
        doc.update(last_seen_s=0.0, workers_busy=self.busy, workers=self.capacity,
                   queued=len(self.queue))
        return doc

    def status_doc(self) -> dict[str, Any]:
        return {
            "node": self.node_doc(),
            "peers": [],
            "ledger": {},
            "jobs": [self.job_doc(job) for job in self.jobs.values()],
            "counters": self.counters.snapshot(),
        }

    def job_doc(self, job: _Job) -> dict[str, Any]:
        now = time.monotonic()
        position = list(self.queue).index(job.job_id) + 1 if job.job_id in self.queue else 0
        return {
            "job_id": job.job_id, "kind": job.job.kind, "state": "queued" if position else
            "running", "queue_position": position, "done": job.done_units, "total": job.total,
            "nodes": sorted({p.node for p in job.parts.values()}),
            "seconds": round(now - job.accepted, 1), "spec": _spec(job.job, abbreviate=True),
        }

    # -- requests ----------------------------------------------------------------------------------

    def serve(self, client: int, request: Message) -> None:
        match request:
            case StatusRequest():
                self.to_client(client, StatusReply(self.status_doc()))
            case PeersRequest():
                self.to_client(client, PeersReply([]))
            case SubmitRequest(job=job):
                self.submit(client, job)
            case CancelRequest(job_id=job_id):
                for held in list(self.jobs.values()):
                    if held.job_id == job_id or (not job_id and held.client == client):
                        self.cancel(held)

    def submit(self, client: int, spec: AnyJob) -> None:
        try:
            total = self.check(spec)
        except JobRefused as exc:
            self.counters.add("refused_jobs")
            self.to_client(client, JobDone("", False, {}, str(exc), exc.exit_code))
            return
        job_id = f"{self.config.name}-{secrets.token_hex(3)}"
        job = _Job(job_id, spec, client, time.monotonic(), total)
        self.jobs[job_id] = job
        self.queue.append(job_id)
        queued = self.capacity - self.busy <= 0 or len(self.queue) > 1
        self.to_client(client, JobAccepted(job_id, queued, len(self.queue) if queued else 0))
        self.dispatch()

    def check(self, spec: AnyJob) -> int:
        """Refuse what cannot run; return the job's unit count."""
        if self.draining:
            raise JobRefused("the daemon is stopping; try again once it is back",
                             exits.not_finished(spec.kind))
        match spec:
            case CpuJob(n=n, seed=seed):
                if not 1 <= n <= MAX_CPU_N:
                    raise JobRefused(f"cpu N must be from 1 to {MAX_CPU_N}, not {n}")
                if seed < 0:
                    raise JobRefused(f"the seed must be 0 or more, not {seed}")
                return n * UNITS_PER_MILLION
            case MemJob(mb=mb, ms=ms):
                if mb < 1 or not 0 <= ms <= MAX_MS:
                    raise JobRefused(f"mem takes MB of at least 1 and MS from 0 to {MAX_MS}")
                promised = sum(j.job.mb for j in self.jobs.values() if isinstance(j.job, MemJob))
                available = self.node.mem_available_mb - promised
                if mb > available:
                    raise JobRefused(f"not enough memory: {mb} MiB asked, {available} MiB "
                                     "available on the only node", 1)
                return 1
            case ExecJob(argv=argv, timeout=timeout, gpu=gpu):
                if not argv or not argv[0] or any("\0" in a for a in argv):
                    raise JobRefused("exec needs a command (without NUL bytes)")
                if sum(len(a) + 1 for a in argv) > MAX_ARGV:
                    raise JobRefused(f"the command line is longer than {MAX_ARGV} characters")
                if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
                    raise JobRefused(f"--timeout must be from 0 to {MAX_TIMEOUT:g} seconds")
                if gpu and not self.node.gpu:
                    raise JobRefused(f"no node can take {argv[0]!r}: it asks for a GPU and no "
                                     "node has one", exits.NOT_RUN)
                return 1
        raise JobRefused(f"unknown job kind {spec.tag}")

    # -- placing -----------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start queued jobs, first come first served, while worker slots are free."""
        while self.queue and not self.draining and self.capacity - self.busy > 0:
            job = self.jobs[self.queue.popleft()]
            self.run_local(job)

    def run_local(self, job: _Job) -> None:
        if job.started is None:
            job.started = time.monotonic()
        for start, end in job.missing():
            free = self.capacity - self.busy
            if free <= 0:
                break
            workers = min(free, end - start) if isinstance(job.job, CpuJob) else 1
            task_id = f"{job.job_id}.{next(self._task_ids)}"
            job.parts[task_id] = _Part(task_id, self.config.name, start, end, workers)
            self.tasks[task_id] = job.job_id
            self.busy += workers
            self.links.executor.tell(RunTask(task_id, job.job_id, job.job, start, end, False,
                                             workers))
            self.to_client(job.client, JobStarted(job.job_id, self.config.name, end - start))

    # -- results -----------------------------------------------------------------------------------

    def _job_of(self, task_id: str) -> _Job | None:
        job_id = self.tasks.get(task_id)
        return self.jobs.get(job_id) if job_id else None

    def on_units(self, task_id: str, units: dict[int, bytes]) -> None:
        job = self._job_of(task_id)
        if job is None:
            return
        part = job.parts[task_id]
        fresh = {i: d for i, d in units.items() if part.start <= i < part.end}
        part.done += len(fresh)
        job.results.update(fresh)
        now = time.monotonic()
        if now - job.last_progress >= PROGRESS_INTERVAL:
            job.last_progress = now
            nodes: dict[str, int] = {}
            for p in job.parts.values():
                nodes[p.node] = nodes.get(p.node, 0) + p.done
            self.to_client(job.client, JobProgress(job.job_id, len(job.results), job.total, nodes))

    def on_task_done(self, done: TaskDone) -> None:
        job = self._job_of(done.task_id)
        job_id = self.tasks.pop(done.task_id, None)
        if job is None or job_id is None:
            return
        part = job.parts.pop(done.task_id)
        self.busy -= part.workers
        units = part.done if isinstance(job.job, CpuJob) else (1 if done.ok else 0)
        if units:
            placed = job.placements.setdefault(part.node, {"units": 0, "seconds": 0.0})
            placed["units"] += units
            placed["seconds"] = round(placed["seconds"] + done.seconds, 3)
        job.detail.update(done.detail)
        if not done.ok and not done.cancelled:
            job.failure = (done.exit_code, done.error)
        if not job.parts:
            self.settle(job, done)
        self.dispatch()

    def settle(self, job: _Job, last: TaskDone) -> None:
        """All parts of a job ended: finish it, or run again what is missing."""
        if job.cancelled:
            self.finish(job, error=job.cancelled, exit_code=job.cancel_code)
            return
        if isinstance(job.job, CpuJob):
            if len(job.results) == job.total:
                self.finish(job)
                return
            if self.draining:
                _code, error = job.failure or (1, "units are missing")
                self.finish(job, error=f"the daemon is stopping ({error})", exit_code=1)
                return
            if job.failure is not None:  # a part failed: what it did not finish runs again
                job.attempts += 1
                _code, error = job.failure
                job.failure = None
                if job.attempts >= MAX_ATTEMPTS:
                    self.finish(job, error=f"gave up after {job.attempts} attempts: {error}",
                                exit_code=1)
                    return
                lost = sum(end - start for start, end in job.missing())
                job.retried += lost
                logger.info("job %s: running %d lost units again", job.job_id, lost)
            self.queue.appendleft(job.job_id)
            return
        if isinstance(job.job, ExecJob):
            if last.ok:
                self.finish(job, exit_code=last.exit_code)
            else:
                self.finish(job, error=last.error, exit_code=exits.exec_failure(last.exit_code))
            return
        if last.ok:
            self.finish(job)
        else:
            self.finish(job, error=last.error, exit_code=1)

    def finish(self, job: _Job, error: str = "", exit_code: int | None = None) -> None:
        self.jobs.pop(job.job_id, None)
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)
        now = time.monotonic()
        result: dict[str, Any] = {
            "job_id": job.job_id,
            "kind": job.job.kind,
            **_spec(job.job),
            "seconds": round(now - job.accepted, 3),
            "queued_seconds": round((job.started or now) - job.accepted, 3),
            "placements": [
                {"node": node, "units": int(p["units"]), "seconds": p["seconds"]}
                for node, p in job.placements.items()
            ],
            "retried": job.retried,
        }
        if isinstance(job.job, CpuJob) and len(job.results) == job.total:
            result["digest"] = job_digest([job.results[i] for i in range(job.total)])
        if isinstance(job.job, ExecJob):
            placed = list(job.placements) or [self.config.name]
            result["node"] = placed[-1]
            result["exit_code"] = exit_code if exit_code is not None else 0
        result.update(job.detail)
        ok = not error
        code = exit_code if exit_code is not None else (0 if ok else 1)
        self.to_client(job.client, JobDone(job.job_id, ok, result, error, code))
        logger.info("job %s %s in %.2f s%s", job.job_id, "done" if ok else "failed",
                    result["seconds"], f": {error}" if error else "")

    def cancel(
        self, job: _Job, reason: str = "cancelled", exit_code: int = exits.CANCELLED
    ) -> None:
        """Stop a job everywhere it runs; its client hears ``reason`` and ``exit_code``."""
        if job.job_id in self.queue:
            self.finish(job, error=reason, exit_code=exit_code)
            return
        job.cancelled = reason
        job.cancel_code = exit_code
        for task_id in job.parts:
            self.links.executor.tell(CancelTask(task_id))

    def to_client(self, client: int, msg: Message) -> None:
        self.links.control.tell(ToClient(client, msg))


def _spec(job: AnyJob, abbreviate: bool = False) -> dict[str, Any]:
    spec = dict(zip(job.fields, job.values(), strict=True))
    if abbreviate and isinstance(job, ExecJob):
        line = " ".join(job.argv)
        spec["argv"] = line if len(line) <= 200 else line[:199] + "…"
    return spec
