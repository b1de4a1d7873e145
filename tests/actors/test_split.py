"""A cpu job split across nodes, handed out in chunks: the Autopilot's part, run step by step.

The Autopilot here is not started: the test calls its ``react`` itself, one message at a time, and
plays every node: it reads the RunTasks the Autopilot hands this node's executor and its peers,
and answers each as it chooses: finished, finished in part by a node that then died, or finished
with its results delivered twice. Whatever the order, the job must end with the digest of the
same job run on one node, and every unit counted once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.actors.conftest import node_info
from vesta import exits
from vesta.actors.autopilot import HERE, Autopilot
from vesta.actors.links import Links
from vesta.config import build_config
from vesta.counters import Counters
from vesta.messages import (
    CancelTask,
    ClientRequest,
    CpuJob,
    ExecJob,
    ForPeer,
    JobDone,
    JobStarted,
    Message,
    PeerTable,
    RunTask,
    SubmitRequest,
    TaskDone,
    TaskPaused,
    TaskUnits,
    ToClient,
)
from vesta.policy import CHUNK_SECONDS, FIRST_CHUNK_PER_WORKER
from vesta.workers.jobs import UNITS_PER_MILLION, job_digest

pytestmark = pytest.mark.timeout(60)

CLIENT = 7


def result_of(index: int) -> bytes:
    """A unit's result: any bytes do, as long as each unit's differ."""
    return index.to_bytes(4, "big") * 8


def one_node_digest(total: int) -> str:
    return job_digest([result_of(i) for i in range(total)])


class Told:
    """Stands for an actor (or the client outbox): keeps what it is told."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def tell(self, message: Any) -> None:
        self.messages.append(message)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield


def peer_doc(name: str, workers: int = 1) -> dict[str, Any]:
    """A linked peer as Discovery describes it: idle, ``workers`` offered, no exec."""
    return {"fingerprint": f"fp-{name}", "name": name, "state": "up", "cores": workers,
            "cpu_pct": 0.0, "mem_available_mb": 2048, "offer_mem_mb": 1024,
            "offer_workers": workers, "willingness": 1.0, "power": "grid", "gpu": False,
            "allow_exec": False, "exec_allowlist": []}


@dataclass
class Pool:
    """An Autopilot, this node's executor and the peers, all played by the test."""

    pilot: Autopilot
    executor: Told
    transport: Told
    clients: Told
    peers: dict[str, dict[str, Any]]
    answered: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, peers: dict[str, int], here_workers: int = 1, **here: Any) -> Pool:
        links = Links()
        executor, transport, clients = Told(), Told(), Told()
        links.executor, links.transport, links.clients = executor, transport, clients
        config = build_config({"key": "split-test-key-0123", "name": "desk",
                               "pause_replace_s": 0})
        pilot = Autopilot(Counters(), links, config,
                          node_info("desk", cores=here_workers, **here), here_workers)
        docs = {f"fp-{name}": peer_doc(name, workers) for name, workers in peers.items()}
        pool = cls(pilot, executor, transport, clients, docs)
        pool.tell(PeerTable(list(docs.values())))
        return pool

    def tell(self, msg: Message) -> None:
        self.pilot.react(msg)

    def submit(self, job: CpuJob) -> None:
        self.tell(ClientRequest(CLIENT, SubmitRequest(job)))

    def pending(self) -> list[tuple[str, RunTask]]:
        """Every task handed out and not answered yet, with the node it went to."""
        runs = [(HERE, m) for m in self.executor.messages if isinstance(m, RunTask)]
        runs += [(m.fingerprint, m.msg) for m in self.transport.messages
                 if isinstance(m, ForPeer) and isinstance(m.msg, RunTask)]
        return [(key, run) for key, run in runs if run.task_id not in self.answered]

    def finish(self, run: RunTask, seconds: float, units: range | None = None) -> None:
        done = range(run.start, run.end) if units is None else units
        self.tell(TaskUnits(run.task_id, {i: result_of(i) for i in done}))
        self.answered.add(run.task_id)
        self.tell(TaskDone(run.task_id, True, seconds))

    def lose(self, key: str, run: RunTask, finished: int) -> None:
        """The node died after finishing the first ``finished`` units of the task."""
        self.tell(TaskUnits(run.task_id, {i: result_of(i)
                                          for i in range(run.start, run.start + finished)}))
        self.answered.add(run.task_id)
        self.tell(TaskDone(run.task_id, False, 0.0, exits.NOT_RUN, "the link went down",
                           lost=True))
        self.peers.pop(key, None)
        self.tell(PeerTable(list(self.peers.values())))

    def client_got(self, kind: type[Message]) -> list[Any]:
        return [m.msg for m in self.clients.messages
                if isinstance(m, ToClient) and isinstance(m.msg, kind)]

    def done(self) -> JobDone | None:
        ends = self.client_got(JobDone)
        assert len(ends) <= 1
        return ends[0] if ends else None


def sizes(pool: Pool) -> list[tuple[str, int]]:
    return [(key, run.end - run.start) for key, run in pool.pending()]


# -- chunks as nodes finish ------------------------------------------------------------------------


def test_each_node_gets_a_small_first_chunk_then_a_second_of_its_own_work() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(20))

    first = dict(sizes(pool))
    assert first == {HERE: FIRST_CHUNK_PER_WORKER, "fp-pi4": FIRST_CHUNK_PER_WORKER}
    here_run = next(run for key, run in pool.pending() if key == HERE)
    pool.finish(here_run, seconds=0.1)  # 20 units a second here

    second = dict(sizes(pool))
    assert second == {HERE: round(20 * CHUNK_SECONDS), "fp-pi4": FIRST_CHUNK_PER_WORKER}
    started = pool.client_got(JobStarted)
    assert [s.node for s in started] == ["desk", "pi4", "desk"]


def run_all(pool: Pool, rates: dict[str, float]) -> JobDone:
    """Finish every task as it is handed out, each node at its rate (units a second)."""
    for _ in range(1000):
        pending = pool.pending()
        if not pending:
            break
        for key, run in pending:
            pool.finish(run, seconds=(run.end - run.start) / rates[key])
    done = pool.done()
    assert done is not None and done.ok, done
    return done


def test_a_slow_node_gets_no_last_units_it_would_hold_the_job_back_on() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(10))
    done = run_all(pool, {HERE: 100.0, "fp-pi4": 5.0})
    units = {p["node"]: p["units"] for p in done.result["placements"]}
    assert sum(units.values()) == 10 * UNITS_PER_MILLION
    # pi4 gets its first chunk, then only what it finishes while desk does the rest
    assert units["pi4"] <= FIRST_CHUNK_PER_WORKER + 5


def test_the_shares_of_the_last_chunks_follow_the_nodes_rates() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(40))  # 400 units
    done = run_all(pool, {HERE: 40.0, "fp-pi4": 10.0})
    placements = {p["node"]: p for p in done.result["placements"]}
    # with both nodes busy throughout, desk (4 times faster) does about 4 units in 5
    assert 0.7 <= placements["desk"]["units"] / 400 <= 0.9
    assert placements["desk"]["chunks"] >= 3 and placements["pi4"]["chunks"] >= 3


def test_one_node_left_takes_the_rest_at_once() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(8))
    (_, here_run), (pi_key, pi_run) = sorted(pool.pending(), key=lambda kr: kr[0] != HERE)
    pool.lose(pi_key, pi_run, finished=1)
    pool.finish(here_run, seconds=0.1)

    (key, rest), = pool.pending()
    # desk did units 0-1, pi4 unit 2 of its 2-3 before it died: desk takes all of 3-79 at once
    assert (key, rest.start, rest.end) == (HERE, 3, 80)


# -- any order: the digest of one node, every unit once --------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data(), peers=st.integers(1, 3), here_workers=st.integers(1, 2),
       n=st.integers(4, 12))
def test_any_order_of_ends_deaths_and_duplicates_gives_the_one_node_digest(
    data: st.DataObject, peers: int, here_workers: int, n: int,
) -> None:
    pool = Pool.of({f"p{i}": data.draw(st.integers(1, 2)) for i in range(peers)}, here_workers)
    pool.submit(CpuJob(n))
    total = n * UNITS_PER_MILLION
    finished: list[RunTask] = []
    for _ in range(10 * total):
        if pool.done() is not None:
            break
        pending = pool.pending()
        assert pending, "units are missing and nothing runs"
        key, run = data.draw(st.sampled_from(pending))
        action = data.draw(st.sampled_from(["finish", "finish", "die", "duplicate"]))
        if action == "die" and key != HERE:
            pool.lose(key, run, data.draw(st.integers(0, run.end - run.start)))
        else:
            pool.finish(run, seconds=data.draw(st.floats(0.01, 2.0)))
            finished.append(run)
        if action == "duplicate" and finished:  # a late copy of results already counted
            late = data.draw(st.sampled_from(finished))
            pool.tell(TaskUnits(late.task_id, {i: b"late" for i in range(late.start, late.end)}))
    done = pool.done()
    assert done is not None, "the job did not end"
    assert done.ok, done.error
    assert done.result["digest"] == one_node_digest(total)
    assert sum(p["units"] for p in done.result["placements"]) == total
    assert not pool.pilot.jobs and not pool.pilot.tasks
    assert sum(pool.pilot.booked.values()) == 0, "workers stay booked after the job"


# -- parts paused for their lender's owner ---------------------------------------------------------


def paused_on_a_peer(job: Any) -> tuple[Pool, str, RunTask]:
    """desk busy, two idle peers that run anything: the job goes to one, which pauses it for
    its owner."""
    pool = Pool.of({"p1": 1, "p2": 1}, cpu_pct=95.0)
    for doc in pool.peers.values():
        doc["allow_exec"] = True
    pool.tell(PeerTable(list(pool.peers.values())))
    pool.submit(job)
    ((key, run),) = pool.pending()
    pool.tell(TaskPaused(run.task_id, "its owner's load is 95%"))
    return pool, key, run


def test_a_part_paused_too_long_is_placed_where_another_node_can_take_it() -> None:
    pool, key, run = paused_on_a_peer(CpuJob(1))

    pool.tell(pool.pilot.node)  # the next reading: pause_replace_s (0 here) is over

    cancels = [m for m in pool.transport.messages
               if isinstance(m, ForPeer) and isinstance(m.msg, CancelTask)]
    assert [(c.fingerprint, c.msg.task_id) for c in cancels] == [(key, run.task_id)]
    pool.answered.add(run.task_id)  # not waited for: its lender may take long to stop it
    ((elsewhere, again),) = pool.pending()
    assert elsewhere != key and (again.start, again.end) == (run.start, run.end)
    pool.tell(TaskUnits(run.task_id, {run.start: b"late"}))  # its lease is no longer held
    pool.tell(TaskDone(run.task_id, False, 0.1, cancelled=True))
    pool.finish(again, seconds=0.5)
    done = pool.done()
    assert done is not None and done.ok
    assert done.result["digest"] == one_node_digest(10) and done.result["retried"] == 10
    kinds = [(e["kind"], e["node"]) for e in pool.pilot.events]
    assert ("pause", key[3:]) in kinds and ("failover", key[3:]) in kinds


def test_an_exec_without_retry_waits_for_its_paused_lender() -> None:
    pool, key, run = paused_on_a_peer(ExecJob(["make"]))
    pool.tell(pool.pilot.node)
    assert not [m for m in pool.transport.messages
                if isinstance(m, ForPeer) and isinstance(m.msg, CancelTask)]
    pool.tell(TaskPaused(run.task_id, ""))  # its owner is done: it runs again
    assert ("resume", key[3:]) in [(e["kind"], e["node"]) for e in pool.pilot.events]


# -- straggler insurance ---------------------------------------------------------------------------


def desk_does_the_rest(pool: Pool) -> None:
    """desk, at 100 units a second, finishes all it is handed, at once, until it has nothing."""
    for _ in range(100):
        here = [run for k, run in pool.pending() if k == HERE]
        if not here:
            return
        for run in here:
            pool.finish(run, seconds=(run.end - run.start) / 100)


def test_the_last_part_on_a_slow_node_runs_again_where_it_ends_sooner_and_the_first_counts(
) -> None:
    pool = Pool.of({"pi4": 4})
    pool.submit(CpuJob(4))  # 40 units
    (job,) = pool.pilot.jobs.values()
    ((key, slow),) = [(k, r) for k, r in pool.pending() if k != HERE]
    assert slow.end - slow.start == 4 * FIRST_CHUNK_PER_WORKER  # pi4's first chunk, 4 workers
    job.rates[key] = 1.0  # pi4 turned out slow: a unit a second
    desk_does_the_rest(pool)

    runs = [m for m in pool.executor.messages if isinstance(m, RunTask)]
    assert (runs[-1].start, runs[-1].end) == (slow.start, slow.end)  # desk ran pi4's part too
    assert ("straggler", "pi4") in [(e["kind"], e["node"]) for e in pool.pilot.events]
    cancels = [m.msg for m in pool.transport.messages
               if isinstance(m, ForPeer) and isinstance(m.msg, CancelTask)]
    assert cancels == [CancelTask(slow.task_id)]  # desk's copy came first: pi4's is cancelled
    pool.tell(TaskUnits(slow.task_id, {slow.start: b"late"}))  # too late to count
    done = pool.done()
    assert done is not None and done.ok
    assert done.result["digest"] == one_node_digest(40)
    units = {p["node"]: p["units"] for p in done.result["placements"]}
    assert units == {"desk": 40}


def test_a_node_that_slowed_down_after_it_was_measured_is_insured_by_what_its_part_shows(
) -> None:
    """pi4 measured as fast as desk, then slowed (its owner, a throttled CPU): its part, two
    seconds old, shows one unit done. That, not the rate measured before, says it ends last."""
    pool = Pool.of({"pi4": 4})
    pool.submit(CpuJob(4))
    (job,) = pool.pilot.jobs.values()
    ((key, slow),) = [(k, r) for k, r in pool.pending() if k != HERE]
    job.rates[key] = 100.0
    job.parts[slow.task_id].started -= 2.0
    pool.tell(TaskUnits(slow.task_id, {slow.start: result_of(slow.start)}))
    desk_does_the_rest(pool)

    runs = [m for m in pool.executor.messages if isinstance(m, RunTask)]
    assert (runs[-1].start, runs[-1].end) == (slow.start + 1, slow.end)  # its unfinished end
    assert ("straggler", "pi4") in [(e["kind"], e["node"]) for e in pool.pilot.events]
    done = pool.done()
    assert done is not None and done.result["digest"] == one_node_digest(40)


# -- a node lost or refusing mid-split -------------------------------------------------------------


def test_units_a_lost_node_held_start_at_once_here_beside_this_nodes_chunk() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(20))
    ((_, here_first),) = [(k, r) for k, r in pool.pending() if k == HERE]
    ((pi_key, pi_first),) = [(k, r) for k, r in pool.pending() if k != HERE]
    pool.finish(here_first, seconds=0.02)  # 100 units a second: desk takes its next chunk
    assert len([k for k, _ in pool.pending() if k == HERE]) == 1

    pool.lose(pi_key, pi_first, finished=0)

    here = [run for k, run in pool.pending() if k == HERE]
    assert len(here) == 2, "pi4's units wait for desk's chunk to end"
    assert (here[-1].start, here[-1].end) == (pi_first.start, pi_first.end)


def test_a_node_that_refuses_a_chunk_rests_then_is_asked_again() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(20))
    ((pi_key, refused),) = [(k, r) for k, r in pool.pending() if k != HERE]
    pool.answered.add(refused.task_id)
    pool.tell(TaskDone(refused.task_id, False, 0.0, exits.NOT_RUN, "pi4 refused cpu: its "
                       "owner's load is 90%, at or over the 80% spill line", refused=True))
    pool.tell(pool.pilot.node)  # a reading: pi4 rests
    assert not [k for k, _ in pool.pending() if k != HERE]

    (job,) = pool.pilot.jobs.values()
    job.resting[pi_key] = 0.0  # its rest is over
    pool.tell(pool.pilot.node)
    assert [k for k, _ in pool.pending() if k != HERE] == [pi_key]
