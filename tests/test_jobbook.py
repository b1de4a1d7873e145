"""Tests for vesta.jobbook: the units of a job, as tables of cases and as a property over any
sequence of leases, results and releases."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vesta.jobbook import BookError, JobBook, Lease


def book_with(total: int, done: tuple[int, ...] = (),
              leases: tuple[tuple[str, str, int, int], ...] = ()) -> JobBook:
    """A book of ``total`` units with ``done`` finished (under a lease since released) and
    ``leases`` (id, node, start, end) held."""
    book = JobBook(total)
    for index in done:
        book.lease("setup", "setup-node", index, index + 1)
        assert book.record("setup", {index: b"r%d" % index}) == 1
        book.release("setup")
    for lease_id, node, start, end in leases:
        book.lease(lease_id, node, start, end)
    return book


def results(*indexes: int) -> dict[int, bytes]:
    return {i: b"r%d" % i for i in indexes}


# -- missing --------------------------------------------------------------------------------------

MISSING_CASES = [
    pytest.param(10, (), (), [(0, 10)], id="fresh"),
    pytest.param(1, (), (), [(0, 1)], id="fresh single unit"),
    pytest.param(0, (), (), [], id="no units at all"),
    pytest.param(10, (0, 1, 2), (), [(3, 10)], id="done at the start"),
    pytest.param(10, (7, 8, 9), (), [(0, 7)], id="done at the end"),
    pytest.param(10, (3, 5), (), [(0, 3), (4, 5), (6, 10)], id="done scattered"),
    pytest.param(10, tuple(range(10)), (), [], id="all done"),
    pytest.param(10, (), (("a", "n1", 0, 4),), [(4, 10)], id="leased at the start"),
    pytest.param(10, (), (("a", "n1", 6, 10),), [(0, 6)], id="leased at the end"),
    pytest.param(10, (), (("a", "n1", 3, 5),), [(0, 3), (5, 10)], id="leased in the middle"),
    pytest.param(10, (), (("a", "n1", 0, 10),), [], id="all leased"),
    pytest.param(10, (), (("b", "n2", 6, 8), ("a", "n1", 2, 4)), [(0, 2), (4, 6), (8, 10)],
                 id="two leases out of order"),
    pytest.param(10, (), (("a", "n1", 2, 4), ("b", "n2", 4, 6)), [(0, 2), (6, 10)],
                 id="adjacent leases"),
    pytest.param(10, (0, 9), (("a", "n1", 4, 6),), [(1, 4), (6, 9)],
                 id="done and leased"),
    pytest.param(10, (3,), (("a", "n1", 4, 6),), [(0, 3), (6, 10)],
                 id="done next to a lease"),
]


@pytest.mark.parametrize(("total", "done", "leases", "expected"), MISSING_CASES)
def test_missing(total: int, done: tuple[int, ...], leases: tuple[tuple[str, str, int, int], ...],
                 expected: list[tuple[int, int]]) -> None:
    book = book_with(total, done, leases)
    assert book.missing() == expected
    assert book.missing_units() == sum(end - start for start, end in expected)


def test_missing_leaves_out_units_done_under_a_held_lease() -> None:
    book = book_with(10, leases=(("a", "n1", 2, 6),))
    book.record("a", results(3, 4))
    assert book.missing() == [(0, 2), (6, 10)]
    book.release("a")
    assert book.missing() == [(0, 3), (5, 10)]


# -- next_range ----------------------------------------------------------------------------------

NEXT_RANGE_CASES = [
    pytest.param(10, (), (), 100, (0, 10), id="fresh, most above the total"),
    pytest.param(10, (), (), 10, (0, 10), id="fresh, most equal to the total"),
    pytest.param(10, (), (), 4, (0, 4), id="fresh, cut to most"),
    pytest.param(10, (), (), 1, (0, 1), id="one unit"),
    pytest.param(10, (), (), 0, None, id="most 0"),
    pytest.param(10, (), (), -3, None, id="most negative"),
    pytest.param(10, (0, 1), (), 3, (2, 5), id="after done units"),
    pytest.param(10, (), (("a", "n1", 0, 3),), 100, (3, 10), id="after a lease"),
    pytest.param(10, (), (("a", "n1", 2, 5),), 100, (0, 2), id="first gap only"),
    pytest.param(10, (), (("a", "n1", 2, 5),), 1, (0, 1), id="first gap cut"),
    pytest.param(10, tuple(range(10)), (), 5, None, id="all done"),
    pytest.param(10, (), (("a", "n1", 0, 10),), 5, None, id="all leased"),
]


@pytest.mark.parametrize(("total", "done", "leases", "most", "expected"), NEXT_RANGE_CASES)
def test_next_range(total: int, done: tuple[int, ...],
                    leases: tuple[tuple[str, str, int, int], ...], most: int,
                    expected: tuple[int, int] | None) -> None:
    assert book_with(total, done, leases).next_range(most) == expected


# -- lease ---------------------------------------------------------------------------------------

REFUSED_LEASES = [
    pytest.param((), (), ("b", "n2", -1, 2), "outside", id="starts below 0"),
    pytest.param((), (), ("b", "n2", 8, 11), "outside", id="ends past the total"),
    pytest.param((), (), ("b", "n2", 10, 11), "outside", id="starts at the total"),
    pytest.param((), (), ("b", "n2", 4, 4), "outside", id="empty"),
    pytest.param((), (), ("b", "n2", 5, 3), "outside", id="backwards"),
    pytest.param((3,), (), ("b", "n2", 2, 5), "not all missing", id="over a done unit"),
    pytest.param((3,), (), ("b", "n2", 3, 4), "not all missing", id="exactly a done unit"),
    pytest.param((), (("a", "n1", 4, 6),), ("b", "n2", 5, 8), "not all missing",
                 id="overlaps a lease's end"),
    pytest.param((), (("a", "n1", 4, 6),), ("b", "n2", 2, 5), "not all missing",
                 id="overlaps a lease's start"),
    pytest.param((), (("a", "n1", 4, 6),), ("b", "n2", 0, 10), "not all missing",
                 id="covers a lease"),
    pytest.param((), (("a", "n1", 4, 6),), ("b", "n2", 4, 6), "not all missing",
                 id="same units as a lease"),
    pytest.param((), (("a", "n1", 4, 6),), ("a", "n2", 0, 2), "already held",
                 id="duplicate id, free units"),
    pytest.param((), (("a", "n1", 4, 6),), ("a", "n1", 4, 6), "already held",
                 id="duplicate id, same units"),
]


@pytest.mark.parametrize(("done", "leases", "attempt", "message"), REFUSED_LEASES)
def test_lease_refused(done: tuple[int, ...], leases: tuple[tuple[str, str, int, int], ...],
                       attempt: tuple[str, str, int, int], message: str) -> None:
    book = book_with(10, done, leases)
    held = dict(book.leases)
    missing = book.missing()
    with pytest.raises(BookError, match=message):
        book.lease(*attempt)
    assert book.leases == held
    assert book.missing() == missing


def test_book_error_is_a_value_error() -> None:
    assert issubclass(BookError, ValueError)


ACCEPTED_LEASES = [
    pytest.param((), (), ("b", "n2", 0, 10), id="the whole job"),
    pytest.param((), (), ("b", "n2", 9, 10), id="the last unit"),
    pytest.param((3,), (), ("b", "n2", 4, 10), id="right after a done unit"),
    pytest.param((3,), (), ("b", "n2", 0, 3), id="right before a done unit"),
    pytest.param((), (("a", "n1", 4, 6),), ("b", "n2", 6, 10), id="right after a lease"),
    pytest.param((), (("a", "n1", 4, 6),), ("b", "n1", 0, 4), id="same node, before a lease"),
]


@pytest.mark.parametrize(("done", "leases", "attempt"), ACCEPTED_LEASES)
def test_lease_accepted(done: tuple[int, ...], leases: tuple[tuple[str, str, int, int], ...],
                        attempt: tuple[str, str, int, int]) -> None:
    book = book_with(10, done, leases)
    lease_id, node, start, end = attempt
    lease = book.lease(*attempt)
    assert lease == Lease(lease_id, node, start, end)
    assert lease.size == end - start
    assert book.leases[lease_id] is lease
    assert book.leases_of(node)[-1] is lease
    assert all(book.leased(i) for i in range(start, end))
    assert not any(low < end and start < high for low, high in book.missing())


def test_a_released_lease_id_may_be_used_again() -> None:
    book = book_with(10, leases=(("a", "n1", 0, 5),))
    book.release("a")
    assert book.lease("a", "n2", 0, 5).node == "n2"


# -- record ---------------------------------------------------------------------------------------

RECORD_CASES = [
    pytest.param({2: b"x", 3: b"y"}, 2, {2: b"x", 3: b"y"}, id="inside the lease"),
    pytest.param({}, 0, {}, id="nothing"),
    pytest.param({1: b"x", 4: b"y"}, 0, {}, id="just outside the lease"),
    pytest.param({-1: b"x", 10: b"y", 99: b"z"}, 0, {}, id="outside the job"),
    pytest.param({1: b"x", 2: b"y", 4: b"z"}, 1, {2: b"y"}, id="partly inside"),
]


@pytest.mark.parametrize(("units", "fresh", "kept"), RECORD_CASES)
def test_record_counts_only_units_inside_the_lease(units: dict[int, bytes], fresh: int,
                                                   kept: dict[int, bytes]) -> None:
    book = book_with(10, leases=(("a", "n1", 2, 4),))
    assert book.record("a", units) == fresh
    assert book.results == kept
    assert book.leases["a"].done == fresh
    assert book.finished_by["n1"] == fresh
    assert book.done == fresh


def test_a_unit_finished_twice_under_one_lease_counts_once() -> None:
    book = book_with(10, leases=(("a", "n1", 0, 4),))
    assert book.record("a", {1: b"first"}) == 1
    assert book.record("a", {1: b"second", 2: b"x"}) == 1
    assert book.results == {1: b"first", 2: b"x"}
    assert book.leases["a"].done == 2
    assert book.finished_by == Counter({"n1": 2})


def test_a_unit_finished_twice_on_two_nodes_counts_once() -> None:
    # n1's lease ends with unit 1 done; n2 re-runs the rest, and a stale result for unit 1 that
    # reaches n2's lease (it is outside it) counts for nothing.
    book = book_with(10, leases=(("a", "n1", 0, 4),))
    book.record("a", {1: b"n1"})
    book.release("a")
    book.lease("b", "n2", 2, 4)
    assert book.record("b", {1: b"n2", 2: b"n2", 3: b"n2"}) == 2
    assert book.results == {1: b"n1", 2: b"n2", 3: b"n2"}
    assert book.finished_by == Counter({"n1": 1, "n2": 2})


@pytest.mark.parametrize("lease_id", ["a", "never-held"])
def test_results_under_a_lease_no_longer_held_count_for_nothing(lease_id: str) -> None:
    book = book_with(10, leases=(("a", "n1", 0, 4),))
    book.release("a")
    assert book.record(lease_id, results(0, 1, 2, 3)) == 0
    assert book.results == {}
    assert book.done == 0
    assert sum(book.finished_by.values()) == 0
    assert book.missing() == [(0, 10)]


def test_results_under_a_released_lease_do_not_count_for_its_successor() -> None:
    book = book_with(10, leases=(("a", "n1", 0, 4),))
    book.release("a")
    book.lease("b", "n2", 0, 4)
    assert book.record("a", results(0, 1)) == 0
    assert book.record("b", results(0)) == 1
    assert book.finished_by == Counter({"n2": 1})


def test_finished_by_lists_only_nodes_that_finished_units() -> None:
    book = book_with(10, leases=(("a", "n1", 0, 4),))
    book.release("a")
    book.lease("b", "n2", 0, 4)
    book.record("b", results(7))  # outside the lease: nothing new
    assert list(book.finished_by) == []


# -- release --------------------------------------------------------------------------------------


def test_release_makes_unfinished_units_missing_at_once_while_other_leases_stay() -> None:
    book = book_with(12, leases=(("a", "n1", 0, 4), ("b", "n2", 4, 8), ("c", "n3", 8, 12)))
    book.record("b", results(4, 6))
    assert book.missing() == []
    lease = book.release("b")
    assert lease is not None
    assert (lease.lease_id, lease.node, lease.start, lease.end, lease.done) == ("b", "n2", 4, 8, 2)
    assert book.unfinished(lease) == 2
    assert book.missing() == [(5, 6), (7, 8)]
    assert set(book.leases) == {"a", "c"}
    assert book.next_range(10) == (5, 6)
    assert book.results == results(4, 6)
    book.lease("d", "n1", 5, 6)  # handed out again at once
    book.lease("e", "n3", 7, 8)


def test_release_of_a_lease_not_held_is_none() -> None:
    book = book_with(10, leases=(("a", "n1", 0, 4),))
    assert book.release("zz") is None
    assert book.release("a") is not None
    assert book.release("a") is None
    assert book.missing() == [(0, 10)]


def test_release_of_a_finished_lease_leaves_nothing_missing() -> None:
    book = book_with(4, leases=(("a", "n1", 0, 4),))
    book.record("a", results(0, 1, 2, 3))
    lease = book.release("a")
    assert lease is not None
    assert book.unfinished(lease) == 0
    assert book.missing() == []
    assert book.complete


# -- finished_by, unfinished, leases_of, complete/done --------------------------------------------


def test_finished_by_counts_per_node() -> None:
    book = book_with(20, leases=(("a", "n1", 0, 5), ("b", "n2", 5, 10), ("c", "n1", 10, 20)))
    book.record("a", results(0, 1, 2))
    book.record("b", results(5))
    book.record("c", results(10, 11, 19))
    book.record("c", results(11, 12))
    assert book.finished_by == Counter({"n1": 7, "n2": 1})
    assert book.done == 8
    assert [lease.lease_id for lease in book.leases_of("n1")] == ["a", "c"]
    assert [lease.lease_id for lease in book.leases_of("n2")] == ["b"]
    assert book.leases_of("n3") == []


UNFINISHED_CASES = [
    pytest.param((), 5, id="none done"),
    pytest.param((0, 4), 3, id="ends done"),
    pytest.param((0, 1, 2, 3, 4), 0, id="all done"),
]


@pytest.mark.parametrize(("recorded", "expected"), UNFINISHED_CASES)
def test_unfinished(recorded: tuple[int, ...], expected: int) -> None:
    book = book_with(10, leases=(("a", "n1", 0, 5),))
    book.record("a", results(*recorded))
    lease = book.leases["a"]
    assert book.unfinished(lease) == expected
    assert lease.done == lease.size - expected


COMPLETE_CASES = [
    pytest.param(0, (), True, id="no units"),
    pytest.param(1, (), False, id="one unit, not done"),
    pytest.param(1, (0,), True, id="one unit, done"),
    pytest.param(10, tuple(range(9)), False, id="all but one"),
    pytest.param(10, tuple(range(10)), True, id="all ten"),
]


@pytest.mark.parametrize(("total", "done", "complete"), COMPLETE_CASES)
def test_complete_and_done(total: int, done: tuple[int, ...], complete: bool) -> None:
    book = book_with(total, done)
    assert book.complete is complete
    assert book.done == len(done)
    if complete:
        assert book.missing() == []
        assert book.next_range(10) is None


def test_a_unit_still_leased_but_done_keeps_the_job_complete() -> None:
    book = book_with(3, leases=(("a", "n1", 0, 3),))
    book.record("a", results(0, 1, 2))
    assert book.complete
    assert book.missing() == []


# -- properties -----------------------------------------------------------------------------------


def check_invariants(book: JobBook) -> None:
    units = set(range(book.total))
    done = set(book.results)
    in_leases: list[set[int]] = [set(range(lease.start, lease.end))
                                 for lease in book.leases.values()]
    for i, first in enumerate(in_leases):  # leases never overlap
        for second in in_leases[i + 1:]:
            assert not first & second
    leased = set().union(*in_leases) - done
    missing_ranges = book.missing()
    missing = {i for start, end in missing_ranges for i in range(start, end)}
    # every unit is exactly one of done / leased / missing
    assert done <= units
    assert done | leased | missing == units
    assert not done & leased and not done & missing and not leased & missing
    assert len(done) + len(leased) + len(missing) == book.total
    # missing ranges: non-empty, sorted, disjoint, merged
    for start, end in missing_ranges:
        assert 0 <= start < end <= book.total
    for (_, end), (start, _) in itertools.pairwise(missing_ranges):
        assert end < start
    assert book.missing_units() == len(missing)
    # the counters agree with the results
    assert book.done == len(done)
    assert sum(book.finished_by.values()) == len(done)
    for lease in book.leases.values():
        assert lease.done == lease.size - book.unfinished(lease)
    assert book.complete is (len(done) == book.total)
    if book.complete:
        assert book.missing() == []
        assert book.next_range(book.total + 1) is None


@settings(max_examples=100, deadline=None)
@given(total=st.integers(min_value=0, max_value=24), data=st.data())
def test_any_sequence_of_operations_keeps_the_invariants(total: int, data: st.DataObject) -> None:
    book = JobBook(total)
    nodes = ["n1", "n2", "n3"]
    serial = 0
    check_invariants(book)
    for _ in range(data.draw(st.integers(min_value=0, max_value=30), label="steps")):
        before = dict(book.results)
        ops = ["record-stale"]
        if book.missing():
            ops.append("lease")
        if book.leases:
            ops += ["record", "release"]
        op = data.draw(st.sampled_from(ops), label="op")
        if op == "lease":
            low, high = data.draw(st.sampled_from(book.missing()), label="gap")
            start = data.draw(st.integers(low, high - 1), label="start")
            end = data.draw(st.integers(start + 1, high), label="end")
            serial += 1
            lease = book.lease(f"t{serial}", data.draw(st.sampled_from(nodes)), start, end)
            assert book.unfinished(lease) == end - start
        elif op == "record":
            lease_id = data.draw(st.sampled_from(sorted(book.leases)), label="lease")
            lease = book.leases[lease_id]
            indexes = data.draw(st.sets(st.integers(lease.start - 2, lease.end + 1)), label="units")
            node_before = book.finished_by[lease.node]
            fresh = book.record(lease_id, {i: b"%s:%d" % (lease_id.encode(), i) for i in indexes})
            expected = {i for i in indexes if lease.start <= i < lease.end and i not in before}
            assert fresh == len(expected)
            assert book.finished_by[lease.node] == node_before + fresh
        elif op == "release":
            lease_id = data.draw(st.sampled_from(sorted(book.leases)), label="lease")
            lease = book.release(lease_id)
            assert lease is not None and lease.lease_id == lease_id
            missing = {i for start, end in book.missing() for i in range(start, end)}
            unfinished = {i for i in range(lease.start, lease.end) if i not in book.results}
            assert unfinished <= missing
        else:  # results under an id that is not held count for nothing
            assert book.record(f"gone{serial}", {i: b"stale" for i in range(total)}) == 0
        # results only ever grow, and a result once kept never changes
        assert before.items() <= book.results.items()
        check_invariants(book)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(min_value=1, max_value=30), most=st.integers(min_value=1, max_value=8),
       nodes=st.lists(st.sampled_from(["n1", "n2", "n3"]), min_size=1, max_size=5))
def test_leasing_next_ranges_and_recording_them_completes_the_job(total: int, most: int,
                                                                  nodes: list[str]) -> None:
    book = JobBook(total)
    step = 0
    while (span := book.next_range(most)) is not None:
        start, end = span
        assert 0 < end - start <= most
        node = nodes[step % len(nodes)]
        book.lease(f"t{step}", node, start, end)
        if step % 3 == 2:  # every third part fails half way: its rest is handed out again
            book.record(f"t{step}", results(*range(start, (start + end) // 2)))
        else:
            book.record(f"t{step}", results(*range(start, end)))
        book.release(f"t{step}")
        check_invariants(book)
        step += 1
        assert step <= 4 * total
    assert book.complete
    assert book.results == results(*range(total))
    assert sum(book.finished_by.values()) == total
