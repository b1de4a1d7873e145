"""The Discovery actor: who dials, replayed beacons, marks, links, the peer table, expiry, open().

Most tests hand the actor :class:`BeaconHeard` directly (no socket), as its loop thread would
after a datagram opened; ``open`` is tested on datagrams sealed here; one test goes through a real
UDP socket on loopback. Probes play the transport (which receives ``Dial`` and ``ForPeer``) and
the autopilot (which receives the ``PeerTable``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from tests.actors.conftest import DEADLINE, Wiring, by_fingerprint, new_identity, node_info
from tests.conftest import wait_for
from vesta import PROTOCOL_VERSION
from vesta.actors import discovery
from vesta.actors.discovery import Discovery
from vesta.config import build_config
from vesta.identity import Identity
from vesta.messages import (
    Beacon,
    BeaconHeard,
    Dial,
    ForPeer,
    PeerHello,
    PeerLinked,
    PeerSeen,
    PeerTable,
    Ping,
    Scope,
    SeedsResolved,
    decode,
    encode,
)
from vesta.transport.crypto import FederationKeys, envelope, open_beacon, seal_beacon
from vesta.transport.loop import IoLoop

pytestmark = pytest.mark.timeout(30)

KEYS = FederationKeys.from_stretched(b"x" * 32)
OTHER_KEYS = FederationKeys.from_stretched(b"y" * 32)
HOST = "192.0.2.7"  # where a beacon came from (a documentation address: nothing is sent there)


@dataclass
class Disco:
    """A running Discovery, its identity and config, and the probes around it."""

    ref: pykka.ActorRef[Any]
    wiring: Wiring
    identity: Identity
    config: Any

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def hear(self, peer: Identity, boot: int = 1, seq: int = 1, **node: Any) -> None:
        """Tell the actor a beacon of ``peer`` arrived, as its loop thread would."""
        self.ref.tell(BeaconHeard(peer.fingerprint, [PROTOCOL_VERSION, PROTOCOL_VERSION],
                                  beacon(peer, boot, seq, **node), HOST))

    def settle(self) -> None:
        """Return once the actor handled everything told to it before, and the probes it tells
        hold whatever it told them meanwhile."""
        for ref in (self.ref, self.wiring.transport.ref, self.wiring.autopilot.ref):
            assert ref.ask(Ping(), timeout=DEADLINE) is True

    def count(self, name: str) -> int:
        self.settle()
        return self.wiring.counters.get(name)

    def knows(self, fingerprint: str) -> bool:
        """Whether the node is in the actor's table of nodes heard of (linked or not)."""
        return fingerprint in self.ref.proxy().nodes.get(timeout=DEADLINE)

    def table(self, where: Any = None) -> list[dict[str, Any]]:
        """The peers of the next PeerTable told to the autopilot (that satisfies ``where``)."""
        return self.wiring.autopilot.expect(
            PeerTable, None if where is None else lambda m: where(m.peers)).peers

    def open(self, datagram: bytes, host: str = HOST) -> BeaconHeard | None:
        result = self.ref.proxy().open(datagram, host).get(timeout=DEADLINE)
        assert result is None or isinstance(result, BeaconHeard)
        return result


def beacon(peer: Identity, boot: int = 1, seq: int = 1, port: int = 7777, dport: int = 7778,
           advertise: str = "", **node: Any) -> Beacon:
    node.setdefault("name", "peer")
    info = node_info(fingerprint=peer.fingerprint, **node)
    return Beacon(boot, seq, port, dport, advertise, info)


def entry(peers: list[dict[str, Any]], fingerprint: str) -> dict[str, Any] | None:
    return next((p for p in peers if p["fingerprint"] == fingerprint), None)


@pytest.fixture
def loop() -> Iterator[IoLoop]:
    io = IoLoop()
    io.start()
    yield io
    pykka.ActorRegistry.stop_all(timeout=10)  # before the loop: the actors still call it
    io.stop()


@pytest.fixture
def start(wiring: Wiring, loop: IoLoop) -> Iterator[Any]:
    """Start a Discovery of its own identity (by default) with no socket: ``start(...)``."""

    def starter(identity: Identity | None = None, sock: socket.socket | None = None,
                **kwargs: Any) -> Disco:
        identity = identity or new_identity()
        config = build_config({"key": "q7Tz-discovery-test-Kx42", "name": "n1",
                               "advertise_spare_ms": 100, "bind": "127.0.0.1"}, env={})
        node = node_info("n1", identity.fingerprint)
        ref = Discovery.start(wiring.counters, wiring.links, loop, sock, KEYS, identity, config,
                              3, node, **kwargs)
        wiring.links.discovery = ref
        return Disco(ref, wiring, identity, config)

    yield starter


# -- who dials -------------------------------------------------------------------------------------


def test_a_node_with_a_higher_fingerprint_is_dialled_at_once(start: Any) -> None:
    ours, higher = by_fingerprint(2)
    disco = start(ours)

    disco.hear(higher, advertise="198.51.100.4", port=7001)

    assert disco.wiring.transport.expect(Dial) == Dial(higher.fingerprint, "198.51.100.4", 7001)


def test_a_node_with_a_lower_fingerprint_is_dialled_after_the_grace_when_heard_again(
    start: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lower fingerprint dials; the higher one gives it the grace, then dials too."""
    grace = 0.3
    monkeypatch.setattr(discovery, "DIAL_GRACE_S", grace)
    lower, ours = by_fingerprint(2)
    disco = start(ours)

    first_heard = time.monotonic()
    disco.hear(lower, seq=1)
    disco.wiring.transport.expect_none(Dial, after=[disco.ref])

    seq = 1

    def dialled_when_heard_again() -> bool:
        nonlocal seq
        seq += 1
        disco.hear(lower, seq=seq)
        disco.settle()
        return bool(disco.wiring.transport.all(Dial))

    wait_for(dialled_when_heard_again, what="a Dial once the grace is over")
    assert time.monotonic() - first_heard >= grace
    assert disco.wiring.transport.all(Dial) == [Dial(lower.fingerprint, HOST, 7777)]


def test_an_incompatible_node_is_listed_with_both_version_ranges_and_not_dialled(
    start: Any,
) -> None:
    ours, higher = by_fingerprint(2)
    disco = start(ours)

    disco.ref.tell(BeaconHeard(higher.fingerprint, [2, 3], None, HOST))

    (peer,) = disco.table()
    assert peer["fingerprint"] == higher.fingerprint
    assert peer["state"] == "incompatible"
    assert peer["reason"] == "speaks protocol versions 2 to 3, this node speaks version 1"
    assert peer["versions"] == [2, 3]
    assert peer["address"] == HOST
    disco.wiring.transport.expect_none(Dial, after=[disco.ref])


def test_a_linked_peer_stays_up_when_a_beacon_of_another_version_comes(start: Any) -> None:
    disco = start()
    peer = new_identity()
    disco.ref.tell(PeerLinked(peer.fingerprint, True, PROTOCOL_VERSION))
    listed = entry(disco.table(), peer.fingerprint)
    assert listed is not None and listed["state"] == "up"

    disco.ref.tell(BeaconHeard(peer.fingerprint, [2, 3], None, HOST))

    disco.wiring.autopilot.expect_none(PeerTable, after=[disco.ref])


# -- replayed beacons and their marks -------------------------------------------------------------


def dials(disco: Disco, fingerprint: str) -> int:
    """How many Dial to ``fingerprint`` the transport got (a higher fingerprint is dialled on
    every beacon accepted, so this counts the beacons accepted)."""
    disco.settle()
    return sum(1 for d in disco.wiring.transport.all(Dial) if d.fingerprint == fingerprint)


def test_a_beacon_not_newer_than_the_last_accepted_is_dropped_and_counted(start: Any) -> None:
    ours, higher = by_fingerprint(2)
    disco = start(ours)
    disco.hear(higher, boot=1, seq=5)
    assert dials(disco, higher.fingerprint) == 1

    disco.hear(higher, boot=1, seq=5)  # the same beacon again
    disco.hear(higher, boot=1, seq=4)  # an older one

    assert dials(disco, higher.fingerprint) == 1
    assert disco.count("beacons_replayed") == 2
    assert disco.count("dropped_beacons") == 2

    disco.hear(higher, boot=2, seq=1)  # the node restarted: a newer boot counter

    assert dials(disco, higher.fingerprint) == 2
    assert disco.count("beacons_replayed") == 2


def test_a_replay_is_dropped_even_after_the_node_expired(start: Any) -> None:
    ours, higher = by_fingerprint(2)
    disco = start(ours, expire_s=0.3)
    disco.hear(higher, seq=5)
    assert dials(disco, higher.fingerprint) == 1
    wait_for(lambda: not disco.knows(higher.fingerprint), what="the silent node to expire")

    disco.hear(higher, seq=5)

    assert disco.count("beacons_replayed") == 1
    assert not disco.knows(higher.fingerprint)
    assert dials(disco, higher.fingerprint) == 1

    disco.hear(higher, seq=6)

    assert disco.knows(higher.fingerprint)
    assert dials(disco, higher.fingerprint) == 2


def test_a_completed_handshake_resets_the_mark_says_hello_and_lists_the_peer_up(
    start: Any,
) -> None:
    disco = start()
    peer = new_identity()
    disco.hear(peer, seq=9, name="lender")

    disco.ref.tell(PeerLinked(peer.fingerprint, True, PROTOCOL_VERSION))

    hello = disco.wiring.transport.expect(ForPeer)
    assert hello == ForPeer(peer.fingerprint, PeerHello(
        node_info("n1", disco.fingerprint), disco.config.port, disco.config.dport))
    (listed,) = disco.table()
    assert listed["fingerprint"] == peer.fingerprint
    assert listed["state"] == "up" and listed["name"] == "lender"
    assert listed["version"] == PROTOCOL_VERSION

    disco.hear(peer, seq=1, name="lender", cpu_pct=42.0)  # a fresh sequence is taken

    (listed,) = disco.table()
    assert listed["cpu_pct"] == 42.0
    assert disco.count("beacons_replayed") == 0


def test_a_link_down_takes_the_peer_off_the_table(start: Any) -> None:
    disco = start()
    peer = new_identity()
    disco.ref.tell(PeerLinked(peer.fingerprint, True, PROTOCOL_VERSION))
    assert entry(disco.table(), peer.fingerprint) is not None

    disco.ref.tell(PeerLinked(peer.fingerprint, False, reason="the other side closed"))

    assert disco.table() == []
    assert disco.knows(peer.fingerprint), "heard of still, only not linked"


def test_what_a_linked_peer_says_over_the_link_updates_its_entry(start: Any) -> None:
    disco = start()
    peer = new_identity()
    disco.ref.tell(PeerLinked(peer.fingerprint, True, PROTOCOL_VERSION))
    disco.table()

    hello = PeerHello(node_info("renamed", peer.fingerprint, cpu_pct=55.0), 7001, 7002)
    disco.ref.tell(PeerSeen(peer.fingerprint, "198.51.100.9", hello))

    (listed,) = disco.table()
    assert listed["name"] == "renamed" and listed["cpu_pct"] == 55.0
    assert listed["address"] == "198.51.100.9"


def test_a_leaving_peer_is_listed_as_leaving(start: Any) -> None:
    disco = start()
    peer = new_identity()
    disco.ref.tell(PeerLinked(peer.fingerprint, True, PROTOCOL_VERSION))
    disco.table()

    disco.ref.tell(PeerSeen(peer.fingerprint, HOST, leaving="the node is stopping"))

    (listed,) = disco.table()
    assert listed["state"] == "leaving"
    assert listed["reason"] == "the node is stopping"


def test_the_marks_are_bounded_and_the_least_recently_used_goes_first(
    start: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discovery, "MAX_MARKS", 3)
    ours, a, b, c, d = by_fingerprint(5)  # every peer higher: each beacon accepted is a Dial
    disco = start(ours)
    for peer in (a, b, c):
        disco.hear(peer, seq=1)
    disco.hear(a, seq=2)  # a is used again: b is now the least recent

    disco.hear(d, seq=1)

    marks = disco.ref.proxy().marks.get(timeout=DEADLINE)
    assert list(marks) == [c.fingerprint, a.fingerprint, d.fingerprint]
    disco.hear(b, seq=1)  # its mark was forgotten, so the beacon counts
    assert dials(disco, b.fingerprint) == 2
    disco.hear(a, seq=2)
    disco.hear(d, seq=1)
    assert disco.count("beacons_replayed") == 2
    assert len(disco.ref.proxy().marks.get(timeout=DEADLINE)) == 3


def test_the_node_table_is_bounded_and_keeps_linked_nodes(
    start: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discovery, "MAX_NODES", 3)
    disco = start()
    linked, a, b, c, d = (new_identity() for _ in range(5))
    disco.ref.tell(PeerLinked(linked.fingerprint, True, PROTOCOL_VERSION))
    for peer in (a, b, c, d):
        disco.hear(peer)
    disco.settle()

    nodes = disco.ref.proxy().nodes.get(timeout=DEADLINE)
    assert set(nodes) == {linked.fingerprint, c.fingerprint, d.fingerprint}
    assert entry(disco.table(), linked.fingerprint) is not None


def test_silent_unlinked_nodes_expire_and_linked_ones_stay(start: Any) -> None:
    disco = start(expire_s=0.3)
    linked, incompatible, seen = (new_identity() for _ in range(3))
    disco.ref.tell(PeerLinked(linked.fingerprint, True, PROTOCOL_VERSION))
    disco.ref.tell(BeaconHeard(incompatible.fingerprint, [2, 2], None, HOST))
    disco.hear(seen)
    both = disco.table(lambda peers: len(peers) == 2)
    assert {p["fingerprint"] for p in both} == {linked.fingerprint, incompatible.fingerprint}

    after = disco.table(lambda peers: entry(peers, incompatible.fingerprint) is None)

    assert [p["fingerprint"] for p in after] == [linked.fingerprint]
    wait_for(lambda: not disco.knows(seen.fingerprint), what="the node only seen to expire")
    assert disco.knows(linked.fingerprint)


# -- datagrams: open() -----------------------------------------------------------------------------


def test_open_takes_a_beacon_of_another_node(start: Any) -> None:
    disco = start()
    peer = new_identity()
    sent = beacon(peer, seq=4)

    heard = disco.open(seal_beacon(KEYS, peer, encode(sent)))

    assert heard == BeaconHeard(peer.fingerprint, [PROTOCOL_VERSION, PROTOCOL_VERSION], sent,
                                HOST)
    assert disco.count("dropped_beacons") == 0


def test_open_ignores_our_own_beacon(start: Any) -> None:
    disco = start()
    ours = beacon(disco.identity)

    assert disco.open(seal_beacon(KEYS, disco.identity, encode(ours))) is None
    assert disco.count("dropped_beacons") == 0


def test_open_counts_a_beacon_under_another_key(start: Any) -> None:
    disco = start()
    peer = new_identity()

    assert disco.open(seal_beacon(OTHER_KEYS, peer, encode(beacon(peer)))) is None
    assert disco.count("dropped_beacons") == 1
    assert disco.count("beacons_other_key") == 1


@pytest.mark.parametrize("datagram", [
    b"",
    b"hello, world",
    bytes(range(256)),
    envelope(1, (1, 1)) + b"\0" * 200,  # our envelope, then nothing that opens
    b"\xff" * 9000,  # over the datagram limit
], ids=["empty", "text", "bytes", "envelope-then-noise", "too-large"])
def test_open_counts_garbage(start: Any, datagram: bytes) -> None:
    disco = start()

    assert disco.open(datagram) is None
    assert disco.count("dropped_beacons") == 1


@pytest.mark.parametrize("payload", ["other-node", "node-info", "not-msgpack"])
def test_open_drops_a_sealed_payload_that_is_not_the_signers_beacon(
    start: Any, payload: str
) -> None:
    disco = start()
    signer, other = new_identity(), new_identity()
    data = {
        "other-node": encode(beacon(other)),  # signed by one node, speaking for another
        "node-info": encode(node_info(fingerprint=signer.fingerprint)),
        "not-msgpack": b"\xc1\xc1\xc1",
    }[payload]

    assert disco.open(seal_beacon(KEYS, signer, data)) is None
    assert disco.count("dropped_beacons") == 1
    assert disco.count("beacons_bad") == 1


def test_open_passes_on_a_node_of_another_version_without_its_payload(start: Any) -> None:
    disco = start()
    peer = new_identity()

    heard = disco.open(seal_beacon(KEYS, peer, b"a payload of version 2", versions=(2, 3)))

    assert heard == BeaconHeard(peer.fingerprint, [2, 3], None, HOST)
    assert disco.count("beacons_other_version") == 1
    assert disco.count("dropped_beacons") == 0


# -- what vesta doctor is told ---------------------------------------------------------------------


def doctor_facts(disco: Disco) -> dict[str, Any]:
    facts: dict[str, Any] = disco.ref.proxy().doctor_facts().get(timeout=DEADLINE)
    return facts


def test_doctor_is_told_who_sends_beacons_under_another_key_or_version(start: Any) -> None:
    disco = start(facts={"name": "n1"})
    peer = new_identity()
    for _ in range(3):
        disco.open(seal_beacon(OTHER_KEYS, peer, encode(beacon(peer))), "192.0.2.20")
    disco.open(seal_beacon(KEYS, peer, b"v2", versions=(2, 3)), "192.0.2.30")

    facts = doctor_facts(disco)
    assert facts["name"] == "n1"  # what the daemon knew at start comes along
    assert facts["foreign"] == {"other_key": {"192.0.2.20": 3},
                                "other_version": {"192.0.2.30": [1, "versions 2 to 3"]}}


def test_doctor_is_told_of_a_copy_of_this_node_but_not_of_its_own_broadcasts(start: Any) -> None:
    disco = start()
    ours = seal_beacon(KEYS, disco.identity, encode(beacon(disco.identity)))
    assert disco.open(ours, "127.0.0.1") is None
    assert doctor_facts(disco)["own_fingerprint_from"] == {}
    assert disco.open(ours, "192.0.2.40") is None
    assert doctor_facts(disco)["own_fingerprint_from"] == {"192.0.2.40": 1}
    assert disco.count("beacons_own_fingerprint") == 1


def test_doctor_is_told_of_one_fingerprint_from_two_machines(start: Any) -> None:
    disco = start()
    peer = new_identity()
    disco.hear(peer, seq=9)  # from HOST
    again = beacon(peer, seq=9)
    disco.ref.tell(BeaconHeard(peer.fingerprint, [PROTOCOL_VERSION] * 2, again, "192.0.2.8"))
    assert doctor_facts(disco)["twins"] == {}  # the same mark: one node with two addresses
    older = beacon(peer, seq=3)
    disco.ref.tell(BeaconHeard(peer.fingerprint, [PROTOCOL_VERSION] * 2, older, "192.0.2.9"))
    assert doctor_facts(disco)["twins"] == {peer.fingerprint: [HOST, "192.0.2.9"]}


def test_doctor_is_told_which_seed_names_do_not_resolve(wiring: Wiring, loop: IoLoop) -> None:
    identity = new_identity()
    config = build_config({"key": "q7Tz-discovery-test-Kx42", "name": "n1",
                           "seed": ["127.0.0.1:7778", "no-such-host.invalid:7778"]}, env={})
    ref = Discovery.start(wiring.counters, wiring.links, loop, None, KEYS, identity, config, 3,
                          node_info("n1", identity.fingerprint))
    disco = Disco(ref, wiring, identity, config)

    def reported() -> list[dict[str, Any]]:
        status: list[dict[str, Any]] = doctor_facts(disco)["seed_status"]
        return status if any(s.get("unresolved") for s in status) else []

    status = wait_for(reported, timeout=20, what="the resolver to give up on the name")
    assert {"seed": "no-such-host.invalid:7778", "answered": False, "unresolved": True} in status
    assert {"seed": "127.0.0.1:7778", "answered": False} in status


def test_doctor_is_told_which_seeds_answered(start: Any) -> None:
    disco = start()
    disco.ref.tell(SeedsResolved([[HOST, 7778], ["192.0.2.99", 7778]]))
    disco.hear(new_identity())
    assert doctor_facts(disco)["seed_status"] == [
        {"seed": f"{HOST}:7778", "answered": True},
        {"seed": "192.0.2.99:7778", "answered": False}]


# -- a real socket ---------------------------------------------------------------------------------


@pytest.fixture
def udp() -> Iterator[Any]:
    """Make UDP sockets bound to a free port of loopback; the test's own ones are closed."""
    made: list[socket.socket] = []

    def make(timeout: float | None = DEADLINE) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(timeout)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


def our_beacon(disco: Disco, sock: socket.socket) -> Beacon:
    """The next datagram on ``sock``, opened: it must be a beacon the node sealed and signed."""
    data, _ = sock.recvfrom(65536)
    opened = open_beacon(KEYS, data)
    assert opened.fingerprint == disco.fingerprint
    sent = decode(opened.payload, Scope.PEER)
    assert isinstance(sent, Beacon)
    return sent


def test_a_beacon_by_udp_is_heard_dialled_and_answered(start: Any, udp: Any) -> None:
    ours, higher = by_fingerprint(2)
    beacons = udp(timeout=None)
    disco = start(ours, sock=beacons)
    peer = udp()
    peer_dport = peer.getsockname()[1]

    peer.sendto(seal_beacon(KEYS, higher, encode(beacon(higher, dport=peer_dport))),
                beacons.getsockname())

    assert disco.wiring.transport.expect(Dial) == Dial(higher.fingerprint, "127.0.0.1", 7777)
    answer = our_beacon(disco, peer)  # a newcomer is answered at once, at its discovery port
    assert answer.node == node_info("n1", disco.fingerprint)
    assert (answer.boot, answer.port, answer.dport) == (3, disco.config.port, disco.config.dport)


def test_the_seeds_hear_a_beacon_as_soon_as_they_resolve(start: Any, udp: Any) -> None:
    disco = start(sock=udp(timeout=None))
    seed = udp()

    disco.ref.tell(SeedsResolved([["127.0.0.1", seed.getsockname()[1]]]))

    first = our_beacon(disco, seed)
    second = our_beacon(disco, seed)  # and every round after
    assert (first.boot, first.seq) < (second.boot, second.seq)
