"""``vesta why``: the Autopilot records each placement decision as it makes it, one rule per
node, and what happened to the job on its way. Run step by step, as in test_split.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.actors.test_split import CLIENT, Pool, result_of
from vesta import exits
from vesta.actors.autopilot import HERE
from vesta.messages import (
    ClientRequest,
    CpuJob,
    ErrorReply,
    ExecJob,
    PeerTable,
    TaskDone,
    TaskUnits,
    ToClient,
    WhyReply,
    WhyRequest,
)

pytestmark = pytest.mark.timeout(60)


def why(pool: Pool, job_id: str = "") -> dict[str, Any]:
    pool.tell(ClientRequest(CLIENT, WhyRequest(job_id)))
    reply = pool.clients.messages[-1]
    assert isinstance(reply, ToClient) and isinstance(reply.msg, WhyReply), reply
    doc: dict[str, Any] = reply.msg.doc
    return doc


def nodes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["node"]: n for n in doc["nodes"]}


def run_to_the_end(pool: Pool) -> None:
    """Every node finishes whatever it is handed, at 100 units a second."""
    for _ in range(1000):
        pending = pool.pending()
        if not pending:
            return
        for _key, run in pending:
            pool.finish(run, seconds=(run.end - run.start) / 100)


def with_peer(pool: Pool, name: str, **changes: Any) -> None:
    pool.peers[f"fp-{name}"].update(changes)
    pool.tell(PeerTable(list(pool.peers.values())))


def test_a_split_names_every_node_chosen_and_what_each_ran_in_how_many_chunks() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(8))
    run_to_the_end(pool)

    doc = why(pool)
    assert doc["kind"] == "cpu" and doc["result"]["ok"]
    desk, pi4 = nodes(doc)["desk"], nodes(doc)["pi4"]
    assert (desk["decision"], pi4["decision"]) == ("chosen", "chosen")
    assert pi4["reason"] == "pi4 takes part in the split: at 0% CPU with 1 worker(s) free"
    assert desk["units"] + pi4["units"] == 80
    assert desk["chunks"] >= 2 and pi4["chunks"] >= 2
    parts = [e for e in doc["events"] if e["kind"] == "part"]
    assert len(parts) == desk["chunks"] + pi4["chunks"]
    assert "key" not in desk  # the slot book's key stays inside


def test_each_node_that_cannot_take_the_job_is_skipped_with_its_rule() -> None:
    pool = Pool.of({"pi4": 1, "laptop": 1, "pi3": 1, "old": 1, "tired": 1}, cpu_pct=95.0)
    with_peer(pool, "pi4", allow_exec=True)
    with_peer(pool, "laptop", power="empty", offer_workers=0, allow_exec=True)
    with_peer(pool, "pi3", allow_exec=True, offer_workers=0,
              paused="its owner's load is 97%, at or over the 80% spill line")
    with_peer(pool, "old", state="incompatible",
              reason="protocol 1 only; this node speaks 2 to 3")
    pool.submit(ExecJob(["make"]))

    why_of = {name: (n["decision"], n["reason"]) for name, n in nodes(why(pool)).items()}
    assert why_of["pi4"] == ("chosen", "pi4 is at 0% CPU with 1 worker(s) offered: the most "
                                       "spare capacity")
    assert why_of["desk"] == ("skipped", "desk (this node) is at 95% CPU, at or above the 80% "
                                         "spill line")
    assert why_of["laptop"] == ("skipped", "laptop is on battery below its battery_min_pct: "
                                           "it lends nothing")
    assert why_of["pi3"] == ("skipped", "pi3 is paused for its owner: its owner's load is 97%, "
                                        "at or over the 80% spill line")
    assert why_of["old"] == ("skipped", "old is incompatible: protocol 1 only; this node speaks "
                                        "2 to 3")
    assert why_of["tired"] == ("skipped", "tired does not run it: exec is off on tired "
                                          "(allow_exec is false)")


def test_a_node_that_refuses_under_the_fairness_cap_is_skipped_with_the_figures() -> None:
    pool = Pool.of({"pi4": 1}, cpu_pct=95.0)
    pool.submit(CpuJob(1))
    ((_key, run),) = pool.pending()
    cap = ("desk has used 300 core-seconds of this node, over its cap of 200 (max_borrow_ratio "
           "1 x (goodwill_core_s 200 + the 0 core-seconds it ran for this node)); it gets room "
           "by lending")
    pool.answered.add(run.task_id)
    pool.tell(TaskDone(run.task_id, False, 0.0, exits.NOT_RUN, f"pi4 refused cpu: {cap}",
                       refused=True))
    run_to_the_end(pool)

    doc = why(pool)
    pi4 = nodes(doc)["pi4"]
    assert pi4["decision"] == "skipped" and pi4["reason"] == f"chosen, then it refused: " \
        f"pi4 refused cpu: {cap}"
    assert nodes(doc)["desk"]["units"] == 10
    kinds = [(e["kind"], e["node"]) for e in doc["events"]]
    assert kinds[:2] == [("part", "pi4"), ("refusal", "pi4")]
    assert ("placed", "desk") in kinds


def test_a_failover_says_what_was_lost_and_where_it_went() -> None:
    pool = Pool.of({"pi4": 1})
    pool.submit(CpuJob(8))
    ((pi_key, pi_first),) = [(k, r) for k, r in pool.pending() if k != HERE]
    pool.lose(pi_key, pi_first, finished=0)
    run_to_the_end(pool)

    doc = why(pool)
    events = doc["events"]
    lost = next(i for i, e in enumerate(events) if e["kind"] == "failover")
    assert events[lost]["node"] == "pi4"
    assert f"{pi_first.end - pi_first.start} unit(s) it had not finished are placed again" in (
        events[lost]["detail"])
    again = [e for e in events[lost:] if e["kind"] == "part" and e["node"] == "desk"]
    assert again and f"units {pi_first.start}-" in again[0]["detail"]
    assert nodes(doc)["desk"]["units"] + nodes(doc)["pi4"]["units"] == 80


def test_without_an_id_the_last_job_and_an_unknown_id_is_an_error() -> None:
    pool = Pool.of({})
    pool.submit(CpuJob(1))
    run_to_the_end(pool)
    pool.submit(ExecJob(["true"]))
    run_to_the_end(pool)
    assert why(pool)["kind"] == "exec"
    first = next(iter(pool.pilot.whys))
    assert why(pool, first)["kind"] == "cpu"

    pool.tell(ClientRequest(CLIENT, WhyRequest("desk-000000")))
    reply = pool.clients.messages[-1].msg
    assert isinstance(reply, ErrorReply) and reply.code == "unknown_job"
    assert reply.error == "no job desk-000000 is known here (it remembers the last 50)"


def test_a_running_job_is_explained_too() -> None:
    pool = Pool.of({"pi4": 1}, cpu_pct=95.0)
    pool.submit(CpuJob(1))
    ((_key, run),) = pool.pending()
    pool.tell(TaskUnits(run.task_id, {run.start: result_of(run.start)}))
    doc = why(pool)
    assert "result" not in doc and nodes(doc)["pi4"]["decision"] == "chosen"


def test_a_job_still_in_the_queue_is_said_to_wait() -> None:
    pool = Pool.of({})  # one worker here, no peer
    pool.submit(CpuJob(1))
    pool.submit(CpuJob(1))  # waits for the first
    pool.tell(ClientRequest(CLIENT, WhyRequest()))
    reply = pool.clients.messages[-1].msg
    assert isinstance(reply, ErrorReply) and reply.code == "not_placed"
    assert reply.error.endswith("waits in the queue: no node has been chosen for it yet")
