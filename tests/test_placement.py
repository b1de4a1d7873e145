"""Tests for the placement part of vesta.policy: place, unable, spare, want_of and admit, as named
tables of cases and as properties over any nodes and any job."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta.messages import CpuJob, ExecJob, MemJob
from vesta.policy import Candidate, Decision, Want, admit, place, spare, unable, want_of

SPILL = 80.0
CPU = Want("cpu")
GPU_EXEC = Want("exec", "train", gpu=True)


def here(**kw: Any) -> Candidate:
    """This node: 4 cores at 10% CPU, 2 workers free, 8000 MiB available."""
    fields: dict[str, Any] = dict(key="", name="desk", cores=4, cpu_pct=10.0,
                                  mem_available_mb=8000, offer_mem_mb=1024, free=2)
    return Candidate(**(fields | kw))


def peer(name: str, **kw: Any) -> Candidate:
    """A peer that is up, 4 cores at 10% CPU, 2 workers and 1024 MiB offered, no exec, no GPU."""
    fields: dict[str, Any] = dict(key=f"fp-{name}", name=name, cores=4, cpu_pct=10.0,
                                  mem_available_mb=4000, offer_mem_mb=1024, free=2)
    return Candidate(**(fields | kw))


BUSY = here(cpu_pct=95.0)
FULL = here(free=0)


def chosen_name(node: Candidate | None) -> str | None:
    return None if node is None else node.name


# -- place: where a job goes ----------------------------------------------------------------------

PLACE_CASES = [
    # local while below the spill line with a free worker
    pytest.param(CPU, here(), [], SPILL, "desk", id="local, no peers"),
    pytest.param(CPU, here(), [peer("a", cores=32, cpu_pct=0.0, free=16)], SPILL, "desk",
                 id="local although a peer is idler"),
    pytest.param(CPU, here(cpu_pct=79.9), [peer("a")], SPILL, "desk", id="local just below"),
    pytest.param(CPU, here(free=1), [peer("a")], SPILL, "desk", id="local, last free worker"),
    pytest.param(Want("exec", "rm"), here(), [peer("a", allow_exec=True)], SPILL, "desk",
                 id="exec local, exec is always allowed here"),
    pytest.param(Want("mem", mem_mb=4000), here(), [peer("a")], SPILL, "desk",
                 id="mem local, within what is available"),
    # spill: at or above the line, or no free worker here
    pytest.param(CPU, here(cpu_pct=80.0), [peer("a")], SPILL, "a", id="spill exactly at the line"),
    pytest.param(CPU, BUSY, [peer("a")], SPILL, "a", id="spill above the line"),
    pytest.param(CPU, FULL, [peer("a")], SPILL, "a", id="spill, no free worker here"),
    pytest.param(CPU, here(free=-1), [peer("a")], SPILL, "a", id="spill, overbooked here"),
    pytest.param(CPU, here(cpu_pct=50.0), [peer("a")], 50.0, "a", id="spill at a lower line"),
    pytest.param(CPU, BUSY, [peer("a", cpu_pct=50.0), peer("b", cores=8, free=3)], SPILL, "b",
                 id="spill to the peer with most spare"),
    pytest.param(CPU, BUSY, [peer("a", free=6, cpu_pct=90.0), peer("b", free=2)], SPILL, "b",
                 id="idle cores count, not only free workers"),
    pytest.param(CPU, BUSY, [peer("a", willingness=0.35), peer("b", willingness=1.0)], SPILL, "b",
                 id="willingness scales spare"),
    pytest.param(CPU, BUSY, [peer("a", mem_available_mb=1000), peer("b", mem_available_mb=9000)],
                 SPILL, "b", id="memory breaks a tie"),
    pytest.param(CPU, BUSY, [peer("a", cpu_pct=100.0, free=1)], SPILL, "a",
                 id="spill to a loaded peer rather than wait"),
    # exec: only to peers whose allow_exec and allowlist accept argv0
    pytest.param(Want("exec", "piwork"), BUSY, [peer("a"), peer("b", allow_exec=True)], SPILL,
                 "b", id="exec skips a peer with exec off"),
    pytest.param(Want("exec", "piwork"), BUSY,
                 [peer("a", cores=16, allow_exec=True, exec_allowlist=("ls",)),
                  peer("b", allow_exec=True, exec_allowlist=("piwork",))], SPILL, "b",
                 id="exec skips a peer whose allowlist lacks it"),
    pytest.param(Want("exec", "/usr/bin/piwork"), BUSY,
                 [peer("a", allow_exec=True, exec_allowlist=("piwork",))], SPILL, "a",
                 id="exec allowlist matches the basename"),
    pytest.param(Want("exec", "./piwork"), BUSY,
                 [peer("a", allow_exec=True, exec_allowlist=("piwork",))], SPILL, "a",
                 id="exec allowlist matches the basename of ./NAME"),
    pytest.param(Want("exec", "/opt/x/piwork"), BUSY,
                 [peer("a", allow_exec=True, exec_allowlist=("/opt/x/piwork",))], SPILL, "a",
                 id="exec allowlist matches the full path"),
    pytest.param(Want("exec", "/opt/y/piwork"), BUSY,
                 [peer("a", allow_exec=True, exec_allowlist=("/opt/x/piwork",))], SPILL, "desk",
                 id="exec allowlist, another full path: waits here"),
    pytest.param(Want("exec", "sh"), BUSY, [peer("a", allow_exec=True)], SPILL, "a",
                 id="exec with an empty allowlist runs anything"),
    # gpu: only to nodes that have one
    pytest.param(GPU_EXEC, here(gpu=True), [peer("a", allow_exec=True, gpu=True)], SPILL, "desk",
                 id="gpu local when it has one"),
    pytest.param(GPU_EXEC, here(), [peer("a", allow_exec=True),
                                    peer("b", allow_exec=True, gpu=True)], SPILL, "b",
                 id="gpu goes to the peer that has one, even below the line"),
    pytest.param(GPU_EXEC, here(), [peer("a", allow_exec=True)], SPILL, None,
                 id="gpu nowhere"),
    pytest.param(GPU_EXEC, here(), [], SPILL, None, id="gpu, no GPU here and no peers"),
    pytest.param(GPU_EXEC, here(gpu=True, cpu_pct=95.0), [peer("a", allow_exec=True)], SPILL,
                 "desk", id="gpu waits here when only here has one"),
    pytest.param(GPU_EXEC, here(), [peer("a", gpu=True)], SPILL, None,
                 id="gpu peer with exec off"),
    # mem: a peer's offer, this node's available memory
    pytest.param(Want("mem", mem_mb=2000), BUSY, [peer("a", offer_mem_mb=1024),
                                                  peer("b", offer_mem_mb=4096)], SPILL, "b",
                 id="mem over a peer's offer skips it"),
    pytest.param(Want("mem", mem_mb=1024), BUSY, [peer("a", offer_mem_mb=1024)], SPILL, "a",
                 id="mem exactly the offer"),
    pytest.param(Want("mem", mem_mb=2000), BUSY,
                 [peer("a", offer_mem_mb=1024, mem_available_mb=64000)], SPILL, "desk",
                 id="a peer's available memory is not its offer"),
    pytest.param(Want("mem", mem_mb=9000), here(), [peer("a", offer_mem_mb=10000)], SPILL, "a",
                 id="mem over what is available here spills"),
    pytest.param(Want("mem", mem_mb=9000), here(), [peer("a")], SPILL, None,
                 id="mem too big for every node"),
    # peers that are not up, or have nothing free
    pytest.param(CPU, BUSY, [peer("a", state="leaving", cores=32), peer("b")], SPILL, "b",
                 id="a leaving peer is skipped"),
    pytest.param(CPU, BUSY, [peer("a", state="incompatible")], SPILL, "desk",
                 id="an incompatible peer is skipped"),
    pytest.param(CPU, BUSY, [peer("a", free=0, cores=32), peer("b")], SPILL, "b",
                 id="a peer with no free worker is skipped"),
    pytest.param(CPU, BUSY, [peer("a", free=-2)], SPILL, "desk",
                 id="a peer overbooked is skipped"),
    # no viable peer: the job waits here when this node can take it
    pytest.param(CPU, BUSY, [], SPILL, "desk", id="busy, no peers: waits here"),
    pytest.param(CPU, FULL, [], SPILL, "desk", id="full, no peers: waits here"),
    pytest.param(CPU, FULL, [peer("a", free=0), peer("b", state="leaving")], SPILL, "desk",
                 id="full, no viable peer: waits here"),
    pytest.param(Want("exec", "piwork"), BUSY, [peer("a")], SPILL, "desk",
                 id="exec refused by every peer: waits here"),
]


@pytest.mark.parametrize(("want", "local", "peers", "spill", "expected"), PLACE_CASES)
def test_place(want: Want, local: Candidate, peers: list[Candidate], spill: float,
               expected: str | None) -> None:
    node, decisions = place(want, local, peers, spill)
    assert chosen_name(node) == expected
    check_decisions(local, peers, node, decisions)
    if node is not None:
        assert unable(node, want) == ""
        assert node is local or any(node is p for p in peers)


def check_decisions(local: Candidate, peers: Sequence[Candidate], node: Candidate | None,
                    decisions: list[Decision]) -> None:
    """Every node considered appears once, the chosen one (and only it) marked chosen, each with
    a reason."""
    assert Counter(d.key for d in decisions) == Counter([local.key, *(p.key for p in peers)])
    names = {p.key: p.name for p in [local, *peers]}
    assert all(d.name == names[d.key] for d in decisions)
    chosen = [d.key for d in decisions if d.chosen]
    assert chosen == ([] if node is None else [node.key])
    assert all(d.reason.strip() for d in decisions)


def spilled(case: Any) -> bool:
    """Whether a case is one where the job does not simply stay local below the line."""
    _want, local, _peers, spill, expected = case.values
    return not (expected == local.name and local.cpu_pct < spill and local.free > 0)


@pytest.mark.parametrize(("want", "local", "peers", "spill", "expected"),
                         [case for case in PLACE_CASES if spilled(case)])
def test_place_reasons_name_their_node(want: Want, local: Candidate, peers: list[Candidate],
                                       spill: float, expected: str | None) -> None:
    _node, decisions = place(want, local, peers, spill)
    for d in decisions:
        assert d.name in d.reason, d


def test_peers_skipped_for_a_local_job_are_named_in_their_reason() -> None:
    _node, decisions = place(CPU, here(), [peer("attic")], SPILL)
    assert "attic" in decisions[1].reason


def test_local_reason_gives_the_figures() -> None:
    node, decisions = place(CPU, here(cpu_pct=42.0, free=3), [peer("a")], SPILL)
    assert node is not None and node.local
    local = decisions[0]
    assert (local.key, local.chosen) == ("", True)
    assert "42%" in local.reason and "80%" in local.reason and "3 worker" in local.reason


@pytest.mark.parametrize(("local", "words"), [
    pytest.param(BUSY, "at or above the 80% spill line", id="busy"),
    pytest.param(FULL, "every worker busy", id="full"),
])
def test_spilled_local_reason_says_why(local: Candidate, words: str) -> None:
    node, decisions = place(CPU, local, [peer("a")], SPILL)
    assert chosen_name(node) == "a"
    local_decision = next(d for d in decisions if d.key == "")
    assert not local_decision.chosen
    assert words in local_decision.reason


@pytest.mark.parametrize("local", [pytest.param(BUSY, id="busy"), pytest.param(FULL, id="full")])
def test_waiting_here_says_no_peer_can_take_it(local: Candidate) -> None:
    node, decisions = place(CPU, local, [peer("a", state="leaving")], SPILL)
    assert node is local
    local_decision = next(d for d in decisions if d.key == "")
    assert local_decision.chosen
    assert "no peer can take it" in local_decision.reason
    assert "runs here" in local_decision.reason


SKIP_REASONS = [
    pytest.param(CPU, peer("a", state="leaving"), "a is leaving", id="leaving"),
    pytest.param(CPU, peer("a", free=0, offer=2), "every worker a offers runs our work (2 of 2)",
                 id="no free worker"),
    pytest.param(CPU, peer("a", free=0, offer=0, cpu_pct=90.0),
                 "a offers no worker now (at 90% CPU", id="offers nothing"),
    pytest.param(CPU, peer("a", free=0, offer=0, power="empty"),
                 "a is on battery below its battery_min_pct: it lends nothing", id="battery"),
    pytest.param(CPU, peer("a", free=0, offer=0, paused="its owner's load is 90%"),
                 "a is paused for its owner: its owner's load is 90%", id="paused"),
    pytest.param(GPU_EXEC, peer("a", allow_exec=True), "a has no GPU", id="no gpu"),
    pytest.param(Want("exec", "x"), peer("a"), "allow_exec is false", id="exec off"),
    pytest.param(Want("exec", "x"), peer("a", allow_exec=True, exec_allowlist=("y",)),
                 "not in exec_allowlist", id="not allowlisted"),
    pytest.param(Want("mem", mem_mb=2000), peer("a"), "a has 1024 MiB offered", id="mem"),
]


@pytest.mark.parametrize(("want", "skipped", "words"), SKIP_REASONS)
def test_a_skipped_peer_says_why(want: Want, skipped: Candidate, words: str) -> None:
    _node, decisions = place(want, BUSY, [skipped, peer("b", allow_exec=True, gpu=True,
                                                       offer_mem_mb=4096)], SPILL)
    decision = next(d for d in decisions if d.name == "a")
    assert (decision.chosen, decision.score) == (False, 0.0)
    assert words in decision.reason


def test_a_viable_peer_not_chosen_gives_both_spares() -> None:
    _node, decisions = place(CPU, BUSY, [peer("a", free=1), peer("b", free=3)], SPILL)
    a = next(d for d in decisions if d.name == "a")
    assert not a.chosen
    assert "less spare capacity" in a.reason
    assert f"{spare(peer('a', free=1)):.2f}" in a.reason
    assert f"{spare(peer('b', free=3)):.2f} for b" in a.reason


# -- unable and spare -----------------------------------------------------------------------------

UNABLE_CASES = [
    pytest.param(here(), CPU, False, id="here, cpu"),
    pytest.param(here(state="leaving"), CPU, False, id="here, state is not asked"),
    pytest.param(here(free=0), CPU, False, id="here, full is not unable"),
    pytest.param(here(), Want("exec", "anything"), False, id="here, exec always"),
    pytest.param(here(), GPU_EXEC, True, id="here, no gpu"),
    pytest.param(here(gpu=True), GPU_EXEC, False, id="here, gpu"),
    pytest.param(here(mem_available_mb=100), Want("mem", mem_mb=101), True,
                 id="here, mem over available"),
    pytest.param(peer("a"), CPU, False, id="peer, cpu"),
    pytest.param(peer("a", state="leaving"), CPU, True, id="peer leaving"),
    pytest.param(peer("a", free=0), CPU, True, id="peer full"),
    pytest.param(peer("a"), Want("exec", "x"), True, id="peer, exec off"),
    pytest.param(peer("a", allow_exec=True), GPU_EXEC, True, id="peer, no gpu"),
    pytest.param(peer("a", offer_mem_mb=10), Want("mem", mem_mb=11), True, id="peer, mem"),
]


@pytest.mark.parametrize(("node", "want", "refused"), UNABLE_CASES)
def test_unable(node: Candidate, want: Want, refused: bool) -> None:
    why = unable(node, want)
    assert bool(why) is refused
    if refused:
        assert node.name in why


SPARE_CASES = [
    pytest.param(peer("a", cores=4, cpu_pct=50.0, free=8, mem_available_mb=0), 2.0,
                 id="idle cores bound it"),
    pytest.param(peer("a", cores=8, cpu_pct=0.0, free=3, mem_available_mb=0), 3.0,
                 id="free workers bound it"),
    pytest.param(peer("a", cores=8, cpu_pct=0.0, free=4, willingness=0.5, mem_available_mb=0),
                 2.0, id="scaled by willingness"),
    pytest.param(peer("a", cores=4, cpu_pct=150.0, free=2, mem_available_mb=0), 0.0,
                 id="over 100% CPU is no idle core"),
    pytest.param(peer("a", cores=4, cpu_pct=100.0, free=2, mem_available_mb=20000), 0.002,
                 id="memory alone"),
]


@pytest.mark.parametrize(("node", "expected"), SPARE_CASES)
def test_spare(node: Candidate, expected: float) -> None:
    assert spare(node) == pytest.approx(expected)


# -- want_of --------------------------------------------------------------------------------------

WANT_CASES = [
    pytest.param(CpuJob(n=3), Want("cpu"), id="cpu"),
    pytest.param(CpuJob(n=1, seed=7), Want("cpu"), id="cpu with a seed"),
    pytest.param(MemJob(mb=512, ms=100), Want("mem", mem_mb=512), id="mem"),
    pytest.param(ExecJob(argv=["piwork", "100"]), Want("exec", "piwork"), id="exec"),
    pytest.param(ExecJob(argv=["/usr/bin/env", "ls"], gpu=True),
                 Want("exec", "/usr/bin/env", gpu=True), id="exec with --gpu"),
    pytest.param(ExecJob(argv=[]), Want("exec", ""), id="exec without a command"),
]


@pytest.mark.parametrize(("job", "expected"), WANT_CASES)
def test_want_of(job: Any, expected: Want) -> None:
    assert want_of(job) == expected


# -- admit: the lender's side ---------------------------------------------------------------------

ADMIT_DEFAULTS: dict[str, Any] = dict(offer_workers=4, lent_busy=1, offer_mem_mb=1024,
                                      lent_mem_mb=0, allow_exec=True, allowlist=(), gpu=False)

ADMIT_CASES = [
    pytest.param(CPU, {}, "", id="cpu accepted"),
    pytest.param(Want("exec", "piwork"), {}, "", id="exec accepted, empty allowlist"),
    pytest.param(Want("exec", "piwork"), {"allowlist": ("piwork",)}, "",
                 id="exec accepted, in allowlist"),
    pytest.param(Want("exec", "/usr/local/bin/piwork"), {"allowlist": ("piwork",)}, "",
                 id="exec accepted, basename in allowlist"),
    pytest.param(Want("exec", "/usr/local/bin/piwork"),
                 {"allowlist": ("/usr/local/bin/piwork",)}, "",
                 id="exec accepted, full path in allowlist"),
    pytest.param(Want("mem", mem_mb=1024), {}, "", id="mem accepted, exactly the offer"),
    pytest.param(Want("mem", mem_mb=500), {"lent_mem_mb": 524}, "",
                 id="mem accepted, exactly what is left"),
    pytest.param(GPU_EXEC, {"gpu": True}, "", id="gpu accepted"),
    pytest.param(CPU, {"lent_busy": 3}, "", id="last worker"),
    pytest.param(Want("exec", "piwork"), {"allow_exec": False}, "allow_exec is false",
                 id="exec off"),
    pytest.param(Want("exec", "piwork"), {"allow_exec": False, "allowlist": ("piwork",)},
                 "allow_exec is false", id="exec off despite the allowlist"),
    pytest.param(Want("exec", "rm"), {"allowlist": ("piwork", "ls")},
                 "'rm' is not in exec_allowlist (piwork, ls)", id="exec not in allowlist"),
    pytest.param(Want("exec", "/bin/rm"), {"allowlist": ("rm-safe",)},
                 "not in exec_allowlist", id="exec basename not in allowlist"),
    pytest.param(Want("exec", "/tmp/piwork"), {"allowlist": ("/usr/bin/piwork",)},
                 "not in exec_allowlist", id="exec another full path"),
    pytest.param(CPU, {"offer_workers": 0, "lent_busy": 0}, "offer is 0 workers", id="offer 0"),
    pytest.param(Want("mem", mem_mb=1), {"offer_workers": 0, "lent_busy": 0},
                 "offer is 0 workers", id="offer 0, mem"),
    pytest.param(CPU, {"lent_busy": 4}, "every worker it offers is busy (4 of 4)",
                 id="all lent workers busy"),
    pytest.param(CPU, {"offer_workers": 2, "lent_busy": 3},
                 "every worker it offers is busy (3 of 2)", id="more busy than offered"),
    pytest.param(Want("mem", mem_mb=1025), {}, "offers 1024 MiB of memory now, 1025 MiB asked",
                 id="mem over the offer"),
    pytest.param(Want("mem", mem_mb=600), {"lent_mem_mb": 500},
                 "offers 524 MiB of memory now, 600 MiB asked", id="mem over what is left"),
    pytest.param(Want("mem", mem_mb=1), {"lent_mem_mb": 2000},
                 "offers 0 MiB of memory now", id="mem overlent"),
    pytest.param(GPU_EXEC, {}, "it has no GPU", id="gpu asked without one"),
    pytest.param(Want("cpu", gpu=True), {}, "it has no GPU", id="gpu cpu job without one"),
]


@pytest.mark.parametrize(("want", "overrides", "refusal"), ADMIT_CASES)
def test_admit(want: Want, overrides: dict[str, Any], refusal: str) -> None:
    why = admit(want, **(ADMIT_DEFAULTS | overrides))
    if refusal:
        assert refusal in why
    else:
        assert why == ""


# -- properties -----------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]
CMDS = ["piwork", "ls", "/usr/bin/piwork", "./piwork", "/opt/bin/ls"]


def candidates(key: str, name: str) -> st.SearchStrategy[Candidate]:
    return st.builds(
        Candidate, key=st.just(key), name=st.just(name),
        cores=st.integers(0, 16), cpu_pct=st.floats(0, 120, allow_nan=False),
        mem_available_mb=st.integers(0, 16000), offer_mem_mb=st.integers(0, 4096),
        free=st.integers(-1, 4), willingness=st.sampled_from([0.0, 0.35, 0.5, 1.0]),
        power=st.sampled_from(["grid", "solar", "battery", "empty"]), gpu=st.booleans(),
        allow_exec=st.booleans(),
        exec_allowlist=st.lists(st.sampled_from(CMDS), max_size=2).map(tuple),
        state=st.sampled_from(["up", "up", "up", "leaving", "incompatible"]),
    )


@st.composite
def peer_lists(draw: st.DrawFn) -> list[Candidate]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    return [draw(candidates(f"fp-{name}", name)) for name in names]


wants = st.one_of(
    st.builds(Want, kind=st.just("cpu"), gpu=st.booleans()),
    st.builds(Want, kind=st.just("mem"), mem_mb=st.integers(0, 5000)),
    st.builds(Want, kind=st.just("exec"), argv0=st.sampled_from(CMDS), gpu=st.booleans()),
)


@settings(max_examples=120, deadline=None)
@given(want=wants, local=candidates("", "local"), peers=peer_lists(),
       spill=st.floats(0, 100, allow_nan=False))
def test_place_picks_only_a_node_that_can_take_the_job(want: Want, local: Candidate,
                                                       peers: list[Candidate],
                                                       spill: float) -> None:
    node, decisions = place(want, local, peers, spill)
    check_decisions(local, peers, node, decisions)
    viable = [p for p in peers if not unable(p, want)]
    stays = not unable(local, want) and local.cpu_pct < spill and local.free > 0
    if node is None:
        # nobody can: this node cannot take it at all, and no peer can
        assert unable(local, want) and not viable
        return
    assert node is local or any(node is p for p in peers)
    assert unable(node, want) == ""
    if want.gpu:
        assert node.gpu
    if stays:
        assert node is local
    elif node is local:
        assert not viable  # it waits here only when no peer can take it
    else:
        assert spare(node) == max(spare(p) for p in viable)


@settings(max_examples=50, deadline=None)
@given(want=wants, local=candidates("", "local"), peers=peer_lists(),
       spill=st.floats(0, 100, allow_nan=False))
def test_place_does_not_depend_on_peer_order_beyond_ties(want: Want, local: Candidate,
                                                         peers: list[Candidate],
                                                         spill: float) -> None:
    node, _ = place(want, local, peers, spill)
    flipped, _ = place(want, local, peers[::-1], spill)
    if node is None or flipped is None:
        assert node is flipped
    else:
        assert spare(node) == spare(flipped)
        assert node.local == flipped.local


@settings(max_examples=100, deadline=None)
@given(want=wants, offered=st.integers(-1, 8), busy=st.integers(0, 10),
       offer_mem=st.integers(0, 4096), lent_mem=st.integers(0, 5000), allow_exec=st.booleans(),
       allowlist=st.lists(st.sampled_from(CMDS), max_size=2), gpu=st.booleans())
def test_admit_accepts_only_within_the_offer(want: Want, offered: int, busy: int, offer_mem: int,
                                             lent_mem: int, allow_exec: bool,
                                             allowlist: list[str], gpu: bool) -> None:
    why = admit(want, offered, busy, offer_mem, lent_mem, allow_exec, allowlist, gpu)
    if why == "":
        assert 0 <= busy < offered
        assert want.kind != "mem" or want.mem_mb <= offer_mem - lent_mem
        assert gpu or not want.gpu
        assert want.kind != "exec" or allow_exec
    else:
        assert why.strip()
