"""The Autopilot actor: takes jobs, queues and places them, merges results, answers status.

It books workers on every node it uses: this node's worker slots (one per core it may use) and,
on each peer, as many as that peer offers. A job is placed by :func:`vesta.policy.place` (here
unless this node is busy, else the peer with the most spare capacity); when no node has room it
waits in a first-come, first-served queue. A large cpu job with two or more viable nodes goes
out in chunks, one per node at a time, sized by the rate each node showed
(:func:`vesta.policy.chunk_size`). Which units of a job are done, leased to a node or
missing is kept by a :class:`~vesta.jobbook.JobBook`: a part that fails loses only its unfinished
units, which run again (a failure of the part itself counts as one of the job's attempts; a node
that went away or refused does not, and that node is not asked again for this job). A peer is
just another executor: a part for it goes to the Transport as ``ForPeer``, and its results come
back through its PeerLink as the local Executor's do. Every placement is recorded as decided, for
``vesta why``. This node's readings arrive from the sampler; the peers' from Discovery.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from vesta import exits
from vesta.actors.base import VestaActor, tell_quietly
from vesta.actors.ledger import TOTALS
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.jobbook import JobBook
from vesta.messages import (
    AnyJob,
    CancelAll,
    CancelRequest,
    CancelTask,
    Charge,
    ClientGone,
    ClientRequest,
    CountRunning,
    CpuJob,
    Drain,
    ErrorReply,
    ExecJob,
    JobAccepted,
    JobDone,
    JobOutput,
    JobProgress,
    JobStarted,
    LedgerSnapshot,
    LentFlows,
    MemJob,
    Message,
    NodeInfo,
    OutputAck,
    PeersReply,
    PeersRequest,
    PeerTable,
    RunTask,
    StatusReply,
    StatusRequest,
    StressState,
    SubmitRequest,
    TaskCredit,
    TaskDone,
    TaskOutput,
    TaskPaused,
    TaskUnits,
    ToClient,
    WhyReply,
    WhyRequest,
    Woke,
)
from vesta.policy import (
    CHUNK_SECONDS,
    SPLIT_MIN_UNITS,
    Candidate,
    Decision,
    Want,
    chunk_size,
    place,
    split_nodes,
    unable,
    want_of,
)
from vesta.sampler import describe
from vesta.workers.jobs import UNITS_PER_MILLION, job_digest

logger = logging.getLogger(__name__)

#: How often a job's progress is sent to its client, at most.
PROGRESS_INTERVAL = 0.2
#: A part of a job that fails on its own account is run again this many times before the job fails.
MAX_ATTEMPTS = 3
#: Straggler insurance: a split job's last part is run a second time where it would end in
#: less than 1/STRAGGLER_FACTOR of the time, if it would take at least STRAGGLER_MIN_S more.
STRAGGLER_FACTOR = 2.0
STRAGGLER_MIN_S = 0.5
#: Seconds a node that refused a chunk of a split job is not asked again for that job.
REFUSAL_REST_S = 2.0
#: Jobs whose placement ``vesta why`` can explain, and events kept for each.
WHYS_KEPT = 50
WHY_EVENTS_KEPT = 200
#: Recent joins, leaves, refusals and failovers shown by ``status``.
EVENTS_KEPT = 100
MAX_CPU_N = 10_000
MAX_ARGV = 64 * 1024
MAX_MS = 7 * 86400 * 1000
MAX_TIMEOUT = 7 * 86400.0
HERE = ""  # the key of this node in the slot books


class JobRefused(ValueError):
    """A job that cannot run: ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = exits.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Part:
    """A lease of a job being run on a node."""

    task_id: str
    key: str  # HERE or the peer's fingerprint
    name: str
    workers: int
    started: float = 0.0  # monotonic
    paused_since: float | None = None  # when its lender paused it for its owner
    insures: str = ""  # the part whose unfinished end it runs again (straggler insurance)


@dataclass
class _Job:
    job_id: str
    job: AnyJob
    client: int
    accepted: float
    book: JobBook
    parts: dict[str, _Part] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # node name -> seconds it ran parts
    units: Counter[str] = field(default_factory=Counter)  # node name -> units it finished
    started: float | None = None
    attempts: int = 0
    retried: int = 0
    excluded: set[str] = field(default_factory=set)  # nodes not to ask again for this job
    resting: dict[str, float] = field(default_factory=dict)  # node -> not asked until then
    lost_waiting: bool = False  # units a lost node held wait to be handed out again
    cancelled: str = ""  # why, once it is cancelled
    cancel_code: int = exits.CANCELLED
    last_progress: float = 0.0
    failure: tuple[int, str] | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    chunked: bool = False  # split across nodes: handed out in chunks as they finish
    rates: dict[str, float] = field(default_factory=dict)  # node key -> units a second
    measured: dict[str, tuple[int, float]] = field(default_factory=dict)  # -> units, seconds
    chunks: Counter[str] = field(default_factory=Counter)  # node name -> chunks handed to it
    why: dict[str, Any] | None = None  # its decisions as they were made (``vesta why``)


class Autopilot(VestaActor):
    """Places and tracks jobs; knows this node's state and its peers'."""

    def __init__(
        self, counters: Counters, links: Links, config: Any, node: NodeInfo, capacity: int,
    ) -> None:
        super().__init__(counters)
        self.links = links
        self.config = config
        self.node = node
        self.capacity = capacity
        self.peers: dict[str, dict[str, Any]] = {}  # fingerprint -> what Discovery says
        self.booked: Counter[str] = Counter()  # node key -> workers we run there
        self.jobs: dict[str, _Job] = {}
        self.queue: deque[str] = deque()
        self.tasks: dict[str, str] = {}  # task id -> job id
        self.dropped: dict[str, tuple[str, str]] = {}  # parts no longer waited for -> node
        self.whys: OrderedDict[str, dict[str, Any]] = OrderedDict()  # job id -> ``vesta why``
        self.last_job = ""  # the id of the last job submitted here
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.draining = False
        self.stress = StressState(0)
        self.ledger: dict[str, dict[str, Any]] = {}  # the Ledger's latest snapshot
        self.lent_flows: list[dict[str, Any]] = []  # what this node runs for peers (Executor)
        self._task_ids = itertools.count(1)

    @staticmethod
    def avoided(job: _Job) -> set[str]:
        """The nodes not to ask for this job now: those excluded for good, and those resting
        after a refusal."""
        now = time.monotonic()
        return job.excluded | {key for key, until in job.resting.items() if until > now}

    @property
    def busy(self) -> int:
        return self.booked[HERE]

    def handle(self, message: Message) -> Any:
        with self.links.clients.batch():  # what one message makes us tell a client goes at once
            return self.react(message)

    def react(self, message: Message) -> Any:
        match message:
            case NodeInfo():
                self.node = message
                self.move_paused()
                self.dispatch()
            case StressState():
                self.stress = message
            case LedgerSnapshot(book=book):
                self.ledger = book
            case LentFlows(flows=flows):
                self.lent_flows = flows
            case Woke(slept_s=slept):
                self.event("suspend", self.config.name, f"this node was suspended for "
                           f"{slept:.0f} s; its lent work ended, its links are checked afresh")
            case PeerTable(peers=peers):
                self.peer_events({p["fingerprint"]: p for p in peers})
                self.peers = {p["fingerprint"]: p for p in peers}
                self.dispatch()
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
            case TaskPaused(task_id=task_id, why=why):
                self.on_paused(task_id, why)
            case ClientGone(client=client):
                for gone in [j for j in self.jobs.values() if j.client == client]:
                    self.cancel(gone)
            case Drain():
                self.draining = True
                for job_id in list(self.queue):
                    job = self.jobs[job_id]
                    if not job.parts:
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

    # -- status ------------------------------------------------------------------------------------

    def node_doc(self) -> dict[str, Any]:
        doc = describe(self.node)
        stress = self.stress
        left = stress.until - time.time()
        doc.update(last_seen_s=0.0, workers_busy=self.busy, workers=self.capacity,
                   queued=len(self.queue), state="up",
                   stress={"cores": stress.cores, "seconds_left": round(left, 1)}
                   if stress.cores and left > 0 else None)
        return doc

    def peer_docs(self) -> list[dict[str, Any]]:
        """The peers as Discovery describes them, with the core-seconds this node lent each and
        borrowed from it."""
        docs = []
        for peer in sorted(self.peers.values(),
                           key=lambda p: (p.get("name", ""), p["fingerprint"])):
            balance = self.ledger.get(peer["fingerprint"], {})
            docs.append({**peer, "lent": round(balance.get("lent", 0.0), 1),
                         "borrowed": round(balance.get("borrowed", 0.0), 1)})
        return docs

    def ledger_doc(self) -> dict[str, dict[str, Any]]:
        """The ledger as SPEC shows it, with each peer's cap here: how much it may have used of
        this node before its work is refused (SPEC's fairness rule)."""
        ratio, goodwill = self.config.max_borrow_ratio, self.config.goodwill_core_s
        return {fp: {"name": entry.get("name", ""),
                     **{total: round(entry.get(total, 0.0), 1) for total in TOTALS},
                     "cap": round(ratio * (goodwill + entry.get("borrowed", 0.0)), 1)}
                for fp, entry in self.ledger.items()}

    def status_doc(self) -> dict[str, Any]:
        return {
            "node": self.node_doc(),
            "peers": self.peer_docs(),
            "ledger": self.ledger_doc(),
            "jobs": [self.job_doc(job) for job in self.jobs.values()],
            "flows": self.flows(),
            "events": list(self.events),
            "counters": self.counters.snapshot(),
        }

    def job_doc(self, job: _Job) -> dict[str, Any]:
        now = time.monotonic()
        position = list(self.queue).index(job.job_id) + 1 if job.job_id in self.queue else 0
        return {
            "job_id": job.job_id, "kind": job.job.kind,
            "state": "queued" if position and not job.parts else "running",
            "queue_position": position, "done": job.book.done if _is_cpu(job) else 0,
            "total": job.book.total, "nodes": sorted({p.name for p in job.parts.values()}),
            "seconds": round(now - (job.started or now), 1),
            "queued_seconds": round((job.started or now) - job.accepted, 1),
            "spec": _spec(job.job, abbreviate=True),
        }

    def flows(self) -> list[dict[str, Any]]:
        """The parts running now between this node and others, both ways: this node's jobs on
        peers, and what it runs for peers (as its Executor last told); units done of how many,
        and the rate so far in units a second (0 while paused for the lender's owner)."""
        flows = []
        now = time.monotonic()
        for job in self.jobs.values():
            for part in job.parts.values():
                if part.key == HERE:
                    continue
                lease = job.book.leases.get(part.task_id)
                if lease is not None:
                    ran = now - part.started
                    rate = lease.done / ran if ran > 0 and part.paused_since is None else 0.0
                    flows.append({"job_id": job.job_id, "from": self.config.name,
                                  "to": part.name, "units_done": lease.done,
                                  "units": lease.size, "rate": round(rate, 2),
                                  "paused": part.paused_since is not None})
        return flows + self.lent_flows

    def event(self, kind: str, node: str, detail: str, job: _Job | None = None) -> None:
        """Something ``status`` lists among the recent events; with ``job``, ``vesta why``
        lists it for that job too (``job_event``)."""
        self.events.append({"at": round(time.time(), 3), "kind": kind, "node": node,
                            "detail": detail})
        if job is not None:
            self.job_event(job, kind, node, detail)

    @staticmethod
    def job_event(job: _Job, kind: str, node: str, detail: str) -> None:
        """Something ``vesta why`` lists for the job alone (a chunk handed out)."""
        if job.why is not None and len(job.why["events"]) < WHY_EVENTS_KEPT:
            job.why["events"].append({"at": round(time.time(), 3), "kind": kind, "node": node,
                                      "detail": detail})

    def peer_events(self, table: dict[str, dict[str, Any]]) -> None:
        """Joins and leaves, from the difference between the old peer table and the new."""
        for fp, peer in table.items():
            old = self.peers.get(fp, {})
            if peer.get("state") != old.get("state") and peer.get("state") in (
                    "up", "leaving", "incompatible"):
                kind = {"up": "join", "leaving": "leave", "incompatible": "incompatible"}
                self.event(kind[peer["state"]], peer.get("name", fp[:8]),
                           peer.get("reason", "") or f"at {peer.get('address', '?')}")
        for fp, old in self.peers.items():
            if fp not in table and old.get("state") == "up":
                self.event("leave", old.get("name", fp[:8]), "its link went down")

    # -- requests ----------------------------------------------------------------------------------

    def serve(self, client: int, request: Message) -> None:
        match request:
            case StatusRequest():
                self.to_client(client, StatusReply(self.status_doc()))
            case PeersRequest():
                self.to_client(client, PeersReply(self.peer_docs()))
            case WhyRequest(job_id=job_id):
                why = self.whys.get(job_id or self.last_job)
                if why is None and (job_id or self.last_job) in self.jobs:
                    self.to_client(client, ErrorReply("not_placed", (
                        f"job {job_id or self.last_job} waits in the queue: no node has been "
                        "chosen for it yet")))
                elif why is None:
                    self.to_client(client, ErrorReply("unknown_job", (
                        f"no job {job_id} is known here" if job_id else
                        "no job was submitted to this node since it started")
                        + f" (it remembers the last {WHYS_KEPT})"))
                else:
                    self.to_client(client, WhyReply(_public(why)))
            case SubmitRequest(job=job):
                self.submit(client, job)
            case OutputAck(job_id=job_id, size=size):
                acked = self.jobs.get(job_id)
                if acked is not None and acked.client == client:
                    for task_id, part in acked.parts.items():
                        self.to_node(part, TaskCredit(task_id, size))
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
        node, decisions = self.plan(spec, set())
        if node is None:
            self.counters.add("refused_jobs")
            self.to_client(client, JobDone("", False, {}, _nowhere(spec, decisions),
                                           exits.not_finished(spec.kind)))
            return
        job_id = f"{self.config.name}-{secrets.token_hex(3)}"
        job = _Job(job_id, spec, client, time.monotonic(), JobBook(total))
        self.jobs[job_id] = job
        self.last_job = job_id
        self.queue.append(job_id)
        waits = len(self.queue) > 1 or node.free <= 0  # what dispatch is about to find
        self.to_client(client, JobAccepted(job_id, waits, len(self.queue) if waits else 0))
        self.dispatch()

    def check(self, spec: AnyJob) -> int:
        """Refuse what cannot run anywhere; return the job's unit count."""
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
                return 1
            case ExecJob(argv=argv, timeout=timeout):
                if not argv or not argv[0] or any("\0" in a for a in argv):
                    raise JobRefused("exec needs a command (without NUL bytes)")
                if sum(len(a) + 1 for a in argv) > MAX_ARGV:
                    raise JobRefused(f"the command line is longer than {MAX_ARGV} characters")
                if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
                    raise JobRefused(f"--timeout must be from 0 to {MAX_TIMEOUT:g} seconds")
                return 1
        raise JobRefused(f"unknown job kind {spec.tag}")

    # -- placing -----------------------------------------------------------------------------------

    def here(self) -> Candidate:
        node = self.node
        promised = sum(j.job.mb for j in self.jobs.values() if isinstance(j.job, MemJob)
                       and any(p.key == HERE for p in j.parts.values()))
        return Candidate(
            HERE, node.name, node.cores, node.cpu_pct, node.mem_available_mb - promised,
            node.offer_mem_mb, self.capacity - self.booked[HERE], node.willingness, node.power,
            node.gpu, True, tuple(node.exec_allowlist),
        )

    def plan(self, spec: AnyJob, excluded: set[str]) -> tuple[Candidate | None, list[Decision]]:
        """Where a job would go now, and why (see :func:`vesta.policy.place`)."""
        return place(want_of(spec), self.here(), self.candidates(excluded),
                     self.config.spill_cpu_pct)

    def candidates(self, excluded: set[str]) -> list[Candidate]:
        found = []
        for fp, peer in self.peers.items():
            if fp in excluded or peer.get("state") != "up" or "offer_workers" not in peer:
                continue
            found.append(Candidate(
                fp, peer["name"], peer["cores"], peer["cpu_pct"], peer["mem_available_mb"],
                peer["offer_mem_mb"], peer["offer_workers"] - self.booked[fp],
                peer["willingness"], peer["power"], peer["gpu"], peer["allow_exec"],
                tuple(peer["exec_allowlist"]), peer["state"], peer["offer_workers"],
                peer.get("paused") or "",
            ))
        return found

    def dispatch(self) -> None:
        """Start queued jobs, first come first served, while some node has room."""
        while self.queue and not self.draining:
            job_id = self.queue[0]
            if not self.place(self.jobs[job_id]):
                return
            if self.queue and self.queue[0] == job_id:  # it may have finished, failing
                self.queue.popleft()
        if not self.queue and not self.draining:  # room for no other job: a split may grow,
            for job in list(self.jobs.values()):  # or insure its last part
                if job.chunked and job.parts:
                    self.feed(job)

    def place(self, job: _Job) -> bool:
        """Place the job's missing units; False if some must wait for room."""
        while job.book.missing_units():
            if job.chunked and job.parts:
                self.feed(job)  # the rest goes out in chunks as its nodes finish theirs
                return True
            node, decisions = self.plan(job.job, self.avoided(job))
            if node is not None and node.free <= 0:
                return False  # it waits; the placement is recorded once it is made
            self.remember(job, decisions)
            if node is None:
                self.fail_now(job, (exits.not_finished(job.job.kind),
                                    _nowhere(job.job, decisions)))
                return True
            if not self.split(job):
                span = job.book.next_range(job.book.total)
                assert span is not None
                self.start_part(job, node, span)
        return True

    def split(self, job: _Job) -> bool:
        """A large cpu job with two or more viable nodes runs on all of them at once, handed out
        in chunks from its first missing unit on: each node gets its next chunk when it has
        finished the last (see :func:`vesta.policy.chunk_size`)."""
        if not _is_cpu(job) or (not job.chunked
                                and job.book.missing_units() < SPLIT_MIN_UNITS):
            return False
        if len(self.split_nodes(job)) < 2:
            return False
        job.chunked = True
        self.remember_split(job, self.split_nodes(job))
        self.feed(job)
        return bool(job.parts)

    def split_nodes(self, job: _Job) -> list[Candidate]:
        return split_nodes(want_of(job.job), self.here(), self.candidates(self.avoided(job)),
                           self.config.spill_cpu_pct, here_committed=HERE in job.rates)

    def feed(self, job: _Job) -> None:
        """Hand the next chunk of a split job to each of its nodes that holds none of it now:
        the fastest first, so that the last units go where they finish soonest."""
        nodes = self.split_nodes(job)
        holding = {part.key: part for part in job.parts.values()}
        known = [job.rates[key] for key in job.rates if key not in job.excluded]
        guess = sum(known) / len(known) if known else 1.0
        pool = {node.key for node in nodes} | holding.keys()
        for node in sorted(nodes, key=lambda n: -job.rates.get(n.key, guess)):
            if node.key in holding or node.free <= 0:
                continue
            others = [(job.rates.get(key, guess), self.in_hand(job, holding.get(key)))
                      for key in pool if key != node.key]
            size = chunk_size(job.book.missing_units(), node.free, job.rates.get(node.key),
                              others)
            span = job.book.next_range(size)
            if span is None:
                continue
            self.start_part(job, node, span)
            job.chunks[node.name] += 1
            holding[node.key] = job.parts[next(reversed(job.parts))]
        if job.lost_waiting:
            self.take_back(job, nodes)
        self.insure(job, self.split_nodes(job), guess)

    def take_back(self, job: _Job, nodes: list[Candidate]) -> None:
        """Units a lost node held, still waiting while every node of the split holds a chunk,
        start at once here, beside this node's chunk, if this node is in the split: they would
        otherwise wait up to a chunk's time for a node to finish."""
        job.lost_waiting = False
        part_here = any(part.key == HERE for part in job.parts.values())
        if not job.book.missing_units() or not (part_here or any(n.local for n in nodes)):
            return
        rate = job.rates.get(HERE)
        size = (min(job.book.missing_units(), max(1, math.floor(rate * CHUNK_SECONDS)))
                if rate else job.book.missing_units())
        span = job.book.next_range(size)
        if span is not None:
            self.start_part(job, self.here(), span)
            job.chunks[self.config.name] += 1

    @staticmethod
    def in_hand(job: _Job, part: _Part | None) -> int:
        """Units a node holds of the job and has not finished."""
        lease = job.book.leases.get(part.task_id) if part is not None else None
        return job.book.unfinished(lease) if lease is not None else 0

    def start_part(self, job: _Job, node: Candidate, span: tuple[int, int],
                   insures: str = "") -> None:
        """Lease units [start, end) to ``node`` and send it the task; with ``insures``, the
        unfinished end of that part's lease instead, run a second time there."""
        task_id = f"{job.job_id}.{next(self._task_ids)}"
        if insures:
            lease = job.book.duplicate(task_id, node.key, insures)
            if lease is None:
                return
            start, end = lease.start, lease.end
        else:
            start, end = span
            job.book.lease(task_id, node.key, start, end)
        workers = max(1, min(node.free, end - start)) if _is_cpu(job) else 1
        job.parts[task_id] = _Part(task_id, node.key, node.name, workers, time.monotonic(),
                                   insures=insures)
        if job.started is None:
            job.started = time.monotonic()
        self.tasks[task_id] = job.job_id
        self.booked[node.key] += workers
        run = RunTask(task_id, job.job_id, job.job, start, end, False, workers)
        if insures:
            what = f"runs units {start}-{end - 1} again (insurance)"
        elif _is_cpu(job):
            what = f"units {start}-{end - 1} ({end - start}) on {workers} worker(s)"
        else:
            what = "runs it"
        self.job_event(job, "part", node.name, what)
        if node.local:
            self.links.executor.tell(run)
        else:
            self.links.to_peer(node.key, run)
        self.to_client(job.client, JobStarted(job.job_id, node.name, end - start))

    def insure(self, job: _Job, nodes: list[Candidate], guess: float) -> None:
        """Straggler insurance: once every unit of a split job is handed out, a node with a free
        worker and no part of the job runs again the unfinished end of the part that would end
        last, if that part's node would take more than ``STRAGGLER_FACTOR`` times as long for
        it. Whichever finishes a unit first has it counted; the other copy is cancelled."""
        holding = {part.key for part in job.parts.values()}
        free = [n for n in nodes if n.key not in holding and n.free > 0]
        if not free or job.book.missing_units():
            return
        node = max(free, key=lambda n: job.rates.get(n.key, guess))
        rate = job.rates.get(node.key, guess)
        insured = {part.insures for part in job.parts.values() if part.insures}
        worst, worst_left = None, 0.0
        now = time.monotonic()
        for part in job.parts.values():
            lease = job.book.leases.get(part.task_id)
            if part.insures or part.task_id in insured or lease is None:
                continue
            # the node's measured rate, or what this part shows once it has run a second, if
            # that is slower: a first chunk dragging, a node slowed down since it was measured
            ran = now - part.started
            rates = [r for r in (job.rates.get(part.key),
                                 max(lease.done, 0.5) / ran if ran >= 1.0 else None) if r]
            left = job.book.unfinished(lease) / (min(rates) if rates else guess)
            if left > worst_left:
                worst, worst_left = part, left
        if worst is None or worst_left < STRAGGLER_MIN_S:
            return
        lease = job.book.leases[worst.task_id]
        here = job.book.unfinished(lease) / rate
        if worst_left > STRAGGLER_FACTOR * here:
            self.event("straggler", worst.name, f"job {job.job_id}: its last "
                       f"{job.book.unfinished(lease)} units (about {worst_left:.1f} s there) "
                       f"run on {node.name} too (about {here:.1f} s); the first result counts",
                       job)
            self.start_part(job, node, (0, 0), insures=worst.task_id)
            job.chunks[node.name] += 1

    def cancel_overtaken(self, job: _Job) -> None:
        """A part whose units were all finished by another (its straggler insurance, or the part
        it insured) is cancelled there and not waited for."""
        overtaken = False
        for task_id, part in list(job.parts.items()):
            lease = job.book.leases.get(task_id)
            if lease is not None and lease.done < lease.size and not job.book.unfinished(lease):
                self.cancel_part(task_id, part)
                self.drop_part(job, task_id)
                overtaken = True
        if overtaken and not job.parts:  # the part that would have ended the job was dropped
            self.settle(job, TaskDone("", True, 0.0))

    def remember(self, job: _Job, decisions: list[Decision]) -> None:
        """A placement as it is made, for ``vesta why``: the first one's decision on every node
        known now (those placement did not consider too, with the reason); a later one (what a
        lost node held, placed again) as an event."""
        if job.why is not None:
            chosen = next((d for d in decisions if d.chosen), None)
            if chosen is not None:
                self.event("placed", chosen.name, f"job {job.job_id}: placed again: "
                           f"{chosen.reason}", job)
            return
        nodes = [{"node": d.name, "score": d.score,
                  "decision": "chosen" if d.chosen else "skipped", "reason": d.reason,
                  "units": 0, "key": d.key} for d in decisions]
        considered = {d.key for d in decisions}
        now = time.monotonic()
        for fp, peer in self.peers.items():
            if fp in considered:
                continue
            name = peer.get("name", fp[:8])
            if fp in job.excluded:
                reason = f"{name} was dropped for this job earlier"
            elif job.resting.get(fp, 0.0) > now:
                reason = f"{name} refused a chunk of this job a moment ago: it rests"
            elif peer.get("state") == "incompatible":
                reason = f"{name} is incompatible: {peer.get('reason') or 'another version'}"
            elif peer.get("state") != "up":
                reason = f"{name} is {peer.get('state', 'not linked')}"
            else:
                reason = f"{name} has not said what it offers yet"
            nodes.append({"node": name, "score": 0.0, "decision": "skipped", "reason": reason,
                          "units": 0, "key": fp})
        job.why = {"job_id": job.job_id, "kind": job.job.kind, "at": round(time.time(), 3),
                   "nodes": nodes, "events": []}
        self.whys[job.job_id] = job.why
        while len(self.whys) > WHYS_KEPT:
            self.whys.popitem(last=False)

    def remember_split(self, job: _Job, nodes: list[Candidate]) -> None:
        """A split's nodes are all chosen; why each other node is not among them."""
        if job.why is None:
            return
        split = {node.key: node for node in nodes}
        want = want_of(job.job)
        for entry in job.why["nodes"]:
            node = split.get(entry["key"])
            if node is not None:
                entry["decision"] = "chosen"
                entry["reason"] = (f"{node.name} takes part in the split: at "
                                   f"{node.cpu_pct:.0f}% CPU with {node.free} worker(s) free")
            elif entry["decision"] == "chosen" or entry["reason"].endswith(
                    "the node it was submitted to") or "less spare capacity" in entry["reason"]:
                entry["decision"] = "skipped"
                entry["reason"] = self.not_in_split(entry, want)

    def not_in_split(self, entry: dict[str, Any], want: Want) -> str:
        """Why a node that could take the job is not among a split's nodes."""
        if entry["key"] == HERE:
            here = self.here()
            return unable(here, want) or (
                f"{here.name} (this node) is at {here.cpu_pct:.0f}% CPU, at or above the "
                f"{self.config.spill_cpu_pct:.0f}% spill line")
        found = [c for c in self.candidates(set()) if c.key == entry["key"]]
        if not found:
            return f"{entry['node']} is not up"
        node = found[0]
        return unable(node, want) or (
            f"{node.name} is at {node.cpu_pct:.0f}% CPU, at or above the "
            f"{self.config.spill_cpu_pct:.0f}% spill line")

    def remember_end(self, job: _Job, result: dict[str, Any], error: str) -> None:
        """What each node ran of the job, in the end."""
        if job.why is None:
            return
        for entry in job.why["nodes"]:
            name = entry["node"]
            entry["units"] = job.units.get(name, 0)
            if job.chunked:
                entry["chunks"] = job.chunks.get(name, 0)
            if name in job.seconds:
                entry["seconds"] = round(job.seconds[name], 3)
        job.why["result"] = {"ok": not error, "error": error, "seconds": result["seconds"],
                             "retried": job.retried}

    # -- results -----------------------------------------------------------------------------------

    def _job_of(self, task_id: str) -> _Job | None:
        job_id = self.tasks.get(task_id)
        return self.jobs.get(job_id) if job_id else None

    def on_units(self, task_id: str, units: dict[int, bytes]) -> None:
        job = self._job_of(task_id)
        if job is None:
            return
        part = job.parts[task_id]
        job.units[part.name] += job.book.record(task_id, units)
        self.cancel_overtaken(job)
        now = time.monotonic()
        if now - job.last_progress >= PROGRESS_INTERVAL:
            job.last_progress = now
            self.to_client(job.client, JobProgress(job.job_id, job.book.done, job.book.total,
                                                   dict(job.units)))

    def on_task_done(self, done: TaskDone) -> None:
        dropped = self.dropped.pop(done.task_id, None)
        if dropped is not None and (done.cpu_s or done.mib_s):  # what it used is owed anyway
            tell_quietly(self.links.ledger, Charge(*dropped, False, done.cpu_s, done.mib_s))
        job = self._job_of(done.task_id)
        if job is None:
            return
        del self.tasks[done.task_id]
        part = job.parts.pop(done.task_id)
        self.booked[part.key] -= part.workers
        lease = job.book.release(done.task_id)
        unfinished = job.book.unfinished(lease) if lease is not None else 0
        if not _is_cpu(job) and done.ok:
            job.book.results[0] = b""
            job.units[part.name] += 1
        if job.units[part.name] or done.ok:
            job.seconds[part.name] = job.seconds.get(part.name, 0.0) + done.seconds
        if job.chunked and done.ok and lease is not None and lease.done and done.seconds > 0:
            # units over seconds of all its chunks so far: a first chunk of two units that ran
            # in a burst (a node held to half a core by a quota can run a moment at full speed)
            # weighs two units' worth, not half
            units, seconds = job.measured.get(part.key, (0, 0.0))
            units, seconds = units + lease.done, seconds + done.seconds
            job.measured[part.key] = (units, seconds)
            job.rates[part.key] = units / seconds
        job.detail.update(done.detail)
        if part.key != HERE and (done.cpu_s or done.mib_s):  # the lender's measure, booked here
            tell_quietly(self.links.ledger,
                         Charge(part.key, part.name, False, done.cpu_s, done.mib_s))
        if done.refused or done.lost:
            self.lost_part(job, part, done, unfinished)
        elif not done.ok and not done.cancelled:
            job.failure = (done.exit_code, done.error)
        if job.job_id in self.jobs:
            if not job.parts:
                self.settle(job, done)
            elif job.book.missing_units() and job.job_id not in self.queue:
                self.queue.appendleft(job.job_id)  # what a lost node ran goes elsewhere now
        self.dispatch()

    def on_paused(self, task_id: str, why: str) -> None:
        job = self._job_of(task_id)
        part = job.parts.get(task_id) if job is not None else None
        if job is None or part is None:
            return
        if why and part.paused_since is None:
            part.paused_since = time.monotonic()
            self.event("pause", part.name, f"job {job.job_id}: paused for its owner: {why}",
                       job)
        elif not why and part.paused_since is not None:
            part.paused_since = None
            self.event("resume", part.name, f"job {job.job_id}: runs again", job)

    def move_paused(self) -> None:
        """Parts paused for their lender's owner longer than ``pause_replace_s`` go where another
        node can take them now; that lender is not asked again for the job. An exec without
        ``--retry`` waits for its lender instead: a command may have side effects."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.cancelled or (isinstance(job.job, ExecJob) and not job.job.retry):
                continue
            for task_id, part in list(job.parts.items()):
                if part.paused_since is None or (
                        now - part.paused_since < self.config.pause_replace_s):
                    continue
                elsewhere, _ = self.plan(job.job, self.avoided(job) | {part.key})
                if elsewhere is None or elsewhere.free <= 0 or elsewhere.key == part.key:
                    continue
                job.excluded.add(part.key)
                self.event("failover", part.name, f"job {job.job_id}: paused for its owner for "
                           f"{now - part.paused_since:.1f} s; its units go to {elsewhere.name}",
                           job)
                self.cancel_part(task_id, part)
                self.drop_part(job, task_id)

    def drop_part(self, job: _Job, task_id: str) -> None:
        """Stop waiting for a part: its lease is released at once and its unfinished units are
        placed again, without waiting for its node, which may take long to stop it (a process
        lent at SCHED_IDLE and starved by the owner's work ends only when it gets the CPU). What
        the node still sends for it is dropped: its lease is no longer held."""
        del self.tasks[task_id]
        part = job.parts.pop(task_id)
        self.booked[part.key] -= part.workers
        lease = job.book.release(task_id)
        job.retried += job.book.unfinished(lease) if lease is not None else 0
        self.dropped[task_id] = (part.key, part.name)  # its lender's charge is still booked
        job.lost_waiting = True
        if job.book.missing_units() and job.job_id not in self.queue and not job.cancelled:
            self.queue.appendleft(job.job_id)

    def lost_part(self, job: _Job, part: _Part, done: TaskDone, unfinished: int) -> None:
        """A node refused the part or went away: not the job's fault. A node that went away is
        not asked again for the job; one that refused a chunk of a split job rests for
        :data:`REFUSAL_REST_S` (its owner may be busy for a moment), else it is not asked again."""
        logger.info("job %s: %s", job.job_id, done.error)
        if done.refused:
            if job.chunked:
                job.resting[part.key] = time.monotonic() + REFUSAL_REST_S
            else:
                job.excluded.add(part.key)
            self.counters.add("refused_by_peers")
            self.event("refusal", part.name, done.error, job)
            self.remember_refusal(job, part, done.error)
            return
        job.excluded.add(part.key)
        job.lost_waiting = True
        self.event("failover", part.name, f"job {job.job_id}: {done.error}; {unfinished} "
                   "unit(s) it had not finished are placed again", job)
        if isinstance(job.job, ExecJob) and not job.job.retry:
            job.failure = (exits.NOT_RUN, f"{done.error}; the command did not finish there "
                           "(with --retry it would run again elsewhere)")
            self.fail_now(job)
            return
        job.retried += unfinished

    @staticmethod
    def remember_refusal(job: _Job, part: _Part, error: str) -> None:
        """A node chosen for the job said no (its owner, its fairness cap): skipped, and why."""
        if job.why is None:
            return
        for entry in job.why["nodes"]:
            if entry["key"] == part.key and not job.units.get(part.name):
                entry["decision"] = "skipped"
                entry["reason"] = f"chosen, then it refused: {error}"

    def fail_now(self, job: _Job, failure: tuple[int, str] | None = None) -> None:
        """End a job whose failure is final, stopping its other parts."""
        code, error = failure or job.failure or (exits.FAILED, "failed")
        job.cancelled, job.cancel_code = error, code
        for task_id, part in job.parts.items():
            self.cancel_part(task_id, part)
        if not job.parts:
            self.finish(job, error=error, exit_code=code)

    def settle(self, job: _Job, last: TaskDone) -> None:
        """Every part of a job ended: finish it, or place again what is missing."""
        if job.cancelled:
            self.finish(job, error=job.cancelled, exit_code=job.cancel_code)
            return
        if job.book.complete:
            code = last.exit_code if isinstance(job.job, ExecJob) else exits.OK
            self.finish(job, exit_code=code)
            return
        if job.failure is not None and not _is_cpu(job):
            code, error = job.failure
            if isinstance(job.job, ExecJob):
                self.finish(job, error=error, exit_code=exits.exec_failure(code))
            else:
                self.finish(job, error=error, exit_code=exits.FAILED)
            return
        if self.draining:
            _code, error = job.failure or (exits.FAILED, "units are missing")
            self.finish(job, error=f"the daemon is stopping ({error})",
                        exit_code=exits.not_finished(job.job.kind))
            return
        if job.failure is not None:  # a part failed on its own: what it did not finish runs again
            job.attempts += 1
            _code, error = job.failure
            job.failure = None
            if job.attempts >= MAX_ATTEMPTS:
                self.finish(job, error=f"gave up after {job.attempts} attempts: {error}",
                            exit_code=exits.FAILED)
                return
            lost = job.book.missing_units()
            job.retried += lost
            logger.info("job %s: running %d lost units again", job.job_id, lost)
        if job.job_id not in self.queue:
            self.queue.appendleft(job.job_id)

    def finish(self, job: _Job, error: str = "", exit_code: int | None = None) -> None:
        self.jobs.pop(job.job_id, None)
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)
        now = time.monotonic()
        started = job.started or now
        result: dict[str, Any] = {
            "job_id": job.job_id,
            "kind": job.job.kind,
            **_spec(job.job),
            "seconds": round(now - started, 3),
            "queued_seconds": round(started - job.accepted, 3),
            "placements": [
                {"node": name, "units": units, "seconds": round(job.seconds.get(name, 0.0), 3),
                 **({"chunks": job.chunks[name]} if job.chunked else {})}
                for name, units in job.units.items() if units
            ],
            "retried": job.retried,
        }
        if _is_cpu(job) and job.book.complete:
            result["digest"] = job_digest([job.book.results[i] for i in range(job.book.total)])
        if isinstance(job.job, ExecJob):
            ran = [name for name, units in job.units.items() if units]
            result["node"] = ran[-1] if ran else self.config.name
            result["exit_code"] = exit_code if exit_code is not None else 0
        result.update(job.detail)
        self.remember_end(job, result, error)
        ok = not error
        code = exit_code if exit_code is not None else (exits.OK if ok else exits.FAILED)
        self.to_client(job.client, JobDone(job.job_id, ok, result, error, code))
        logger.info("job %s %s in %.2f s%s", job.job_id, "done" if ok else "failed",
                    result["seconds"], f": {error}" if error else "")

    def cancel(
        self, job: _Job, reason: str = "cancelled", exit_code: int = exits.CANCELLED
    ) -> None:
        """Stop a job everywhere it runs; its client hears ``reason`` and ``exit_code`` once
        this node's own part has stopped. Peers are told and not waited for: a lent process
        that its owner's work starves stops only when it next gets the CPU."""
        job.cancelled = reason
        job.cancel_code = exit_code
        for task_id, part in list(job.parts.items()):
            self.cancel_part(task_id, part)
            if part.key != HERE:
                self.drop_part(job, task_id)
        if not job.parts:
            self.finish(job, error=reason, exit_code=exit_code)

    def cancel_part(self, task_id: str, part: _Part) -> None:
        self.to_node(part, CancelTask(task_id))

    def to_node(self, part: _Part, msg: Message) -> None:
        """Tell the executor that runs a part: this node's, or a peer's through its link."""
        if part.key == HERE:
            self.links.executor.tell(msg)
        else:
            self.links.to_peer(part.key, msg)

    def to_client(self, client: int, msg: Message) -> None:
        self.links.clients.tell(ToClient(client, msg))


def _nowhere(spec: AnyJob, decisions: list[Decision]) -> str:
    """The sentence for a job no node can take: the command, and why each node cannot."""
    reasons = "; ".join(d.reason for d in decisions)
    if isinstance(spec, MemJob):
        return f"not enough memory on any node for {spec.mb} MiB: {reasons}"
    what = f"{spec.argv[0]!r}" if isinstance(spec, ExecJob) else f"this {spec.kind} job"
    return f"no node can take {what}: {reasons}"


def _is_cpu(job: _Job) -> bool:
    return isinstance(job.job, CpuJob)


def _spec(job: AnyJob, abbreviate: bool = False) -> dict[str, Any]:
    spec = dict(zip(job.fields, job.values(), strict=True))
    if abbreviate and isinstance(job, ExecJob):
        line = " ".join(job.argv)
        spec["argv"] = line if len(line) <= 200 else line[:199] + "…"
    return spec


def _public(why: dict[str, Any]) -> dict[str, Any]:
    """A job's ``vesta why`` record as the client gets it (without the slot book's keys)."""
    return {**why, "nodes": [{k: v for k, v in node.items() if k != "key"}
                             for node in why["nodes"]]}
