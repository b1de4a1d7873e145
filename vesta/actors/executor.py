"""The Executor actor: runs tasks and stress in job processes and reports what they produce.

A task is a slice of a job given to this node: units [start, end) of a cpu job, or the single unit
of a mem or exec job. The executor spreads a cpu task over the worker processes the autopilot
booked for it (the autopilot owns the slot count: one slot per core this daemon may use), which
take its units one at a time from a counter the supervisor shares among them, so a slower core
does fewer; it passes on
finished units as the job processes report them (in batches, at most four times a second each),
relays exec output as it comes, and says when the task is done. It
holds no processes itself: its :class:`Supervisor` thread does, and tells it what happened.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vesta import exits
from vesta.actors.base import VestaActor, tell_quietly
from vesta.actors.links import Links
from vesta.actors.peerlink import lent_task_id
from vesta.counters import Counters
from vesta.messages import (
    CancelTask,
    Charge,
    CpuJob,
    Drain,
    ExecJob,
    LedgerSnapshot,
    LendTask,
    LentFlows,
    MemJob,
    Message,
    NodeInfo,
    RunTask,
    StartStress,
    StopStress,
    StressReply,
    StressState,
    TaskCredit,
    TaskDone,
    TaskOutput,
    TaskPaused,
    TaskUnits,
    ToClient,
    Woke,
    WorkerExited,
    WorkerOutput,
    WorkerUnits,
)
from vesta.policy import admit, leech_refusal, owner_busy, want_of
from vesta.workers.supervisor import Supervisor

logger = logging.getLogger(__name__)

#: Seconds at least between two reports of the lent flows while only units finish.
FLOWS_EVERY_S = 0.5

#: Where this installation's programs are: exec looks there after PATH, so that
#: ``vesta exec -- ./piwork`` finds the piwork installed beside vestad.
PROGRAMS_DIR = os.path.dirname(sys.executable)


@dataclass
class _Task:
    run: RunTask
    workers: set[str]
    started: float
    errors: list[tuple[int, str]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    peer: str = ""  # the fingerprint of the peer it runs for; "" for this node's own work
    peer_name: str = ""
    peer_task: str = ""  # the id that peer gave it
    booked: int = 0  # lent workers it holds
    cpu_s: float = 0.0  # what its finished pieces used
    units_done: int = 0  # units of a cpu task finished so far


class Executor(VestaActor):
    """Runs :class:`RunTask` in worker processes and stress on pinned cores."""

    def __init__(
        self, counters: Counters, links: Links, cores: list[int] | None = None,
        max_borrow_ratio: float = 5.0, goodwill_core_s: float = 120.0,
        spill_cpu_pct: float = 80.0,
    ) -> None:
        super().__init__(counters)
        self.links = links
        self.spill_cpu_pct = spill_cpu_pct
        self.max_borrow_ratio = max_borrow_ratio
        self.goodwill_core_s = goodwill_core_s
        self.ledger: dict[str, dict[str, Any]] = {}  # the Ledger's latest snapshot
        self.paused = ""  # why work lent here is paused for the owner now; "" while it runs
        self.flows_told = 0.0  # when the Autopilot was last told the lent flows
        self.cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        self.tasks: dict[str, _Task] = {}
        self.owner: dict[str, str] = {}  # worker id -> task id
        self.stress_workers: set[str] = set()
        self.draining = False
        self.node: NodeInfo | None = None  # the latest sample: the offer to peers
        self._ids = itertools.count(1)
        self.supervisor = Supervisor(report=partial(tell_quietly, self.actor_ref))

    def on_start(self) -> None:
        self.supervisor.start()

    def stopping(self) -> None:
        self.supervisor.shutdown()

    def handle(self, message: Message) -> Any:
        match message:
            case RunTask():
                self.run_task(message)
            case LendTask():
                self.lend(message)
            case NodeInfo(paused=paused):
                self.node = message
                if bool(paused) != bool(self.paused):
                    self.pause_lent(paused)
                self.paused = paused  # the latest figures, for refusals
            case LedgerSnapshot(book=book):
                self.ledger = book
            case CancelTask(task_id=task_id):
                self.cancel(task_id)
            case TaskCredit(task_id=task_id, size=size):
                credited = self.tasks.get(task_id)
                for worker in credited.workers if credited else ():
                    self.supervisor.credit(worker, size)
            case WorkerUnits(worker=worker, units=units):
                self.on_units(worker, units)
            case WorkerOutput(worker=worker, stream=stream, data=data):
                owner = self.owner.get(worker)
                if owner is not None and owner in self.tasks:
                    task = self.tasks[owner]
                    self.report(task, TaskOutput(task.peer_task or owner, stream, data))
            case WorkerExited():
                self.on_exit(message)
            case StartStress(client=client, cores=cores, seconds=seconds):
                self.start_stress(client, cores, seconds)
            case StopStress(client=client):
                stopped = self.stop_stress()
                self.links.clients.tell(ToClient(client, StressReply(0, 0.0, stopped)))
            case Woke(slept_s=slept):  # its submitters have placed what it lent elsewhere
                lent = [task_id for task_id, task in self.tasks.items() if task.peer]
                for task_id in lent:
                    self.cancel(task_id)
                if lent:
                    logger.info("ended %d lent task(s) after %.0f s asleep", len(lent), slept)
            case Drain():  # what runs for peers is handed back at once: they place it elsewhere
                self.draining = True
                for task_id, task in list(self.tasks.items()):
                    if task.peer:
                        self.cancel(task_id)
            case _:
                return super().handle(message)
        return None

    # -- lending ---------------------------------------------------------------------------------

    def lend(self, lend: LendTask) -> None:
        """A peer asks for a task: admit it against the offer and the exec rules, or refuse it
        with the rule, in a sentence that names this node."""
        run = lend.run
        lent = [t for t in self.tasks.values() if t.peer]
        busy = sum(t.booked for t in lent)
        mem = sum(t.run.job.mb for t in lent if isinstance(t.run.job, MemJob))
        node = self.node
        name = node.name if node else "this node"
        balance = self.ledger.get(lend.fingerprint, {})
        owner = (f"it is paused for its owner: {self.paused}" if self.paused else owner_busy(
            node.owner_cpu_pct, self.spill_cpu_pct)) if node is not None else ""
        why = "it is stopping" if self.draining or node is None else admit(
            want_of(run.job), node.offer_workers, busy, node.offer_mem_mb, mem,
            node.allow_exec, node.exec_allowlist, node.gpu, owner) or leech_refusal(
            lend.name, balance.get("lent", 0.0), balance.get("borrowed", 0.0),
            self.max_borrow_ratio, self.goodwill_core_s)
        if why:
            self.counters.add("refused_jobs")
            what = f"{run.job.argv[0]!r}" if isinstance(run.job, ExecJob) else run.job.kind
            logger.info("refused %s for %s: %s", what, lend.name, why)
            self.links.to_peer(lend.fingerprint, TaskDone(
                run.task_id, False, 0.0, exits.NOT_RUN, f"{name} refused {what}: {why}",
                refused=True))
            return
        assert node is not None
        workers = max(1, min(run.workers, node.offer_workers - busy))
        local = run.replace(task_id=lent_task_id(lend.fingerprint, run.task_id), lend=True,
                            workers=workers)
        assert isinstance(local, RunTask)
        self.run_task(local, peer=lend.fingerprint, peer_task=run.task_id, peer_name=lend.name)

    def pause_lent(self, why: str) -> None:
        """Pause every task lent here (``why`` says for what) or let them all run again (""),
        and tell each submitter, which places elsewhere what stays paused too long."""
        self.paused = why
        for task in self.tasks.values():
            if not task.peer or task.cancelled:
                continue
            for worker in task.workers:
                if why:
                    self.supervisor.pause(worker)
                else:
                    self.supervisor.resume(worker)
            self.links.to_peer(task.peer, TaskPaused(task.peer_task, why))
        lent = sum(1 for task in self.tasks.values() if task.peer)
        if lent:
            self.tell_flows()
        if why:
            logger.info("lent work paused for the owner (%d task(s) now): %s", lent, why)
        else:
            logger.info("lent work may run again (%d task(s) resumed)", lent)

    def lent_cpus(self) -> list[int]:
        """The CPUs a command run for a peer may use: as many as this node offers (SPEC), the
        last ones of its mask, so the owner's own work keeps the first."""
        offered = self.node.offer_workers if self.node is not None else 1
        return self.cores[-max(1, min(offered, len(self.cores))):]

    def report(self, task: _Task, msg: Message) -> None:
        """What a task produced goes to the Autopilot, or to the peer it runs for."""
        if task.peer:
            self.links.to_peer(task.peer, msg)
        else:
            self.links.autopilot.tell(msg)

    # -- tasks -------------------------------------------------------------------------------------

    def run_task(self, run: RunTask, peer: str = "", peer_task: str = "",
                 peer_name: str = "") -> None:
        if run.task_id in self.tasks:
            logger.warning("task %s is already running", run.task_id)
            return
        if self.draining:
            stopping = TaskDone(peer_task or run.task_id, False, 0.0, 1, "the daemon is stopping")
            self.report(_Task(run, set(), 0.0, peer=peer), stopping)
            return
        job = run.job
        pieces: list[dict[str, Any]]
        if isinstance(job, CpuJob):
            workers = max(1, min(run.workers, run.end - run.start))
            piece: dict[str, Any] = {"seed": job.seed, "start": run.start, "end": run.end}
            if workers > 1:  # they take units one by one from a counter the supervisor shares
                piece["share"] = run.task_id
            pieces = [piece] * workers
        elif isinstance(job, MemJob):
            pieces = [{"mb": job.mb, "ms": job.ms}]
        elif isinstance(job, ExecJob):
            pieces = [{"argv": job.argv, "timeout": job.timeout, "job_id": run.job_id,
                       "node": self.node.name if self.node is not None else "",
                       "programs": PROGRAMS_DIR,
                       "cpus": self.lent_cpus() if peer else None}]
        else:
            raise TypeError(f"no executor for {job.tag}")
        task = _Task(run, set(), time.monotonic(), peer=peer, peer_name=peer_name,
                     peer_task=peer_task, booked=len(pieces) if peer else 0)
        self.tasks[run.task_id] = task
        if peer:
            self.tell_flows()
        for params in pieces:
            worker = f"w{next(self._ids)}"
            task.workers.add(worker)
            self.owner[worker] = run.task_id
            self.supervisor.start_worker(worker, job.kind, params, run.lend)

    def cancel(self, task_id: str) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        task.cancelled = True
        for worker in task.workers:
            self.supervisor.kill(worker)

    def on_units(self, worker: str, units: dict[int, bytes]) -> None:
        task_id = self.owner.get(worker)
        task = self.tasks.get(task_id) if task_id else None
        if task is None:
            return
        self.report(task, TaskUnits(task.peer_task or task.run.task_id, units))
        task.units_done += len(units)
        if task.peer and time.monotonic() - self.flows_told >= FLOWS_EVERY_S:
            self.tell_flows()

    def on_exit(self, exited: WorkerExited) -> None:
        if exited.worker in self.stress_workers:
            self.stress_workers.discard(exited.worker)
            if not self.stress_workers:
                self.links.autopilot.tell(StressState(0))
            return
        task_id = self.owner.pop(exited.worker, None)
        task = self.tasks.get(task_id) if task_id else None
        if task is None:
            return
        task.workers.discard(exited.worker)
        task.detail.update(exited.detail)
        task.cpu_s += exited.cpu_s
        if exited.error or exited.exit_code:
            task.errors.append((exited.exit_code, exited.error))
            if isinstance(task.run.job, CpuJob | MemJob) and not task.cancelled:
                logger.warning("task %s: %s", task.run.task_id, exited.error)
        if not task.workers:
            self.finish(task)

    def tell_flows(self) -> None:
        """Tell the Autopilot what this node runs for peers now, for ``status``."""
        now = self.flows_told = time.monotonic()
        name = self.node.name if self.node is not None else ""
        flows = []
        for task in self.tasks.values():
            if not task.peer:
                continue
            run, ran = task.run, now - task.started
            units = run.end - run.start if isinstance(run.job, CpuJob) else 1
            flows.append({"job_id": run.job_id, "from": task.peer_name, "to": name,
                          "units_done": task.units_done, "units": units,
                          "rate": round(task.units_done / ran, 2) if ran > 0 else 0.0,
                          "paused": bool(self.paused)})
        tell_quietly(self.links.autopilot, LentFlows(flows))

    def finish(self, task: _Task) -> None:
        del self.tasks[task.run.task_id]
        if task.peer:
            self.tell_flows()
        seconds = round(time.monotonic() - task.started, 3)
        code, error = task.errors[0] if task.errors else (0, "")
        # an exec command's own status is its result: only an error text means it did not run
        ok = not task.cancelled and not any(text for _, text in task.errors)
        if task.cancelled:
            error = error or "cancelled"
        job = task.run.job
        mib_s = job.mb * seconds if isinstance(job, MemJob) and ok else 0.0
        cpu_s = round(task.cpu_s, 4)
        if task.peer and (cpu_s or mib_s):
            tell_quietly(self.links.ledger, Charge(task.peer, task.peer_name, True, cpu_s, mib_s))
        self.report(task, TaskDone(task.peer_task or task.run.task_id, ok, seconds, code, error,
                                   task.cancelled, task.detail, cpu_s=cpu_s, mib_s=mib_s))

    # -- stress ------------------------------------------------------------------------------------

    def start_stress(self, client: int, cores: int, seconds: float) -> None:
        self.stop_stress()
        chosen = self.cores if cores <= 0 else self.cores[:cores]
        for cpu in chosen:
            worker = f"s{next(self._ids)}"
            self.stress_workers.add(worker)
            self.supervisor.start_worker(worker, "stress", {"cpu": cpu, "seconds": seconds}, False)
        logger.info("stressing cores %s for %g s", chosen, seconds)
        self.links.clients.tell(ToClient(client, StressReply(len(chosen), seconds)))
        self.links.autopilot.tell(StressState(len(chosen), time.time() + seconds))

    def stop_stress(self) -> int:
        stopped = len(self.stress_workers)
        for worker in self.stress_workers:
            self.supervisor.kill(worker)
        return stopped
