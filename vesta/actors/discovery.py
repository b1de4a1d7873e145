"""The Discovery actor: sealed UDP beacons out and in, the table of nodes heard, the peer table.

A node announces itself to the broadcast address of every IPv4 interface (or only the one that
holds ``-bind``), to each ``-seed``, and to every known node beyond its subnets: at start, every
``advertise_spare_ms``, and at once when its load moves by 10 points or more. A node that hears a
new node answers it directly, so two nodes know each other within one round trip of the second
one starting. A beacon counts only if its (boot counter, sequence) is newer than the last accepted
from that fingerprint (a replay is dropped, even after the node expired); the mark is forgotten
when a link handshake with that node completes, so a node whose state directory was wiped is not
locked out. Beacons are signed by the sender's identity (see :mod:`vesta.transport.crypto`), so no
key holder can speak for another node. Hearing a node never makes it a peer: the lower
fingerprint dials (the other one too if no link came up after a grace period), and only a link
whose handshake proved the fingerprint does. Discovery keeps what each peer says of itself and
tells the Autopilot the peer table after every change.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vesta import PROTOCOL_VERSION
from vesta.actors.base import VestaActor, tell_quietly
from vesta.actors.links import Links
from vesta.counters import Counters
from vesta.doctor import CLOCK_STEP_S
from vesta.identity import Identity
from vesta.messages import (
    Beacon,
    BeaconHeard,
    ClientRequest,
    DecodeError,
    Dial,
    DoctorReply,
    DoctorRequest,
    LinkRefused,
    Message,
    NodeInfo,
    PeerHello,
    PeerLinked,
    PeerSeen,
    PeerTable,
    Scope,
    SeedsResolved,
    Tick,
    ToClient,
    Woke,
    decode,
    encode,
)
from vesta.sampler import describe
from vesta.sysstat import ipv4_networks
from vesta.transport.crypto import (
    MAX_DATAGRAM,
    CryptoError,
    FederationKeys,
    NotVesta,
    WrongKey,
    open_beacon,
    seal_beacon,
)
from vesta.transport.loop import IoLoop

logger = logging.getLogger(__name__)

#: Most (boot, sequence) marks kept; the least recently used go first.
MAX_MARKS = 1024
#: Most nodes in the table at once.
MAX_NODES = 256
#: A change of load, in points, that is announced at once.
LOAD_STEP = 10.0
#: Seconds the higher fingerprint waits for the lower one to dial before it dials itself.
DIAL_GRACE_S = 2.0
#: Seconds between look-ups of the seeds' host names.
RESOLVE_EVERY_S = 30.0
#: Most hosts remembered for each kind of foreign beacon, and most clock events kept, for
#: ``vesta doctor``.
MAX_FOREIGN_HOSTS = 32
MAX_CLOCK_EVENTS = 10
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=i4s4s")  # ifindex, local address, destination address


def open_discovery_socket(dport: int) -> socket.socket:
    """The UDP socket for beacons: bound to the wildcard address, so broadcasts arrive even with
    ``-bind`` (a socket bound to a unicast address receives none on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
    try:
        sock.bind(("", dport))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Network:
    """One IPv4 address of this machine: its interface, network and broadcast address."""

    interface: str
    address: str
    network: ipaddress.IPv4Network
    broadcast: str | None


def networks(bind: str = "") -> list[Network]:
    """This machine's IPv4 networks (loopback excluded); with ``bind``, the one holding it."""
    found = []
    for name, address, netmask, broadcast in ipv4_networks():
        if bind and address != bind:
            continue
        net = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
        found.append(Network(name, address, net, broadcast))
    return found


@dataclass
class _Node:
    """A node heard of: what its beacons and its link say."""

    fingerprint: str
    host: str
    port: int = 0
    dport: int = 0
    advertise: str = ""
    node: NodeInfo | None = None
    versions: tuple[int, int] = (PROTOCOL_VERSION, PROTOCOL_VERSION)
    first_heard: float = 0.0
    last_seen: float = 0.0
    linked: bool = False
    version: int = 0
    state: str = "seen"  # seen, up, leaving, incompatible
    reason: str = ""

    def doc(self, now: float) -> dict[str, Any]:
        info = self.node
        fields: dict[str, Any] = describe(info) if info else {
            "name": self.fingerprint[:8], "fingerprint": self.fingerprint}
        fields.update(
            fingerprint=self.fingerprint, address=self.advertise or self.host,
            state=self.state, version=self.version or max(self.versions),
            versions=list(self.versions), last_seen_s=round(now - self.last_seen, 1),
            reason=self.reason,
        )
        return fields


class Discovery(VestaActor):
    """Beacons, the nodes heard of, and the peer table."""

    def __init__(
        self, counters: Counters, links: Links, loop: IoLoop, sock: socket.socket | None,
        keys: FederationKeys, identity: Identity, config: Any, boot: int, node: NodeInfo,
        versions: tuple[int, int] = (PROTOCOL_VERSION, PROTOCOL_VERSION),
        expire_s: float | None = None, facts: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(counters)
        self.links = links
        self.loop = loop
        self.sock = sock
        self.keys = keys
        self.identity = identity
        self.fingerprint = identity.fingerprint
        self.config = config
        self.boot = boot
        self.seq = 0
        self.node = node
        self.versions = versions
        interval = config.advertise_spare_ms / 1000
        self.interval = interval
        self.expire_s = expire_s if expire_s is not None else max(3 * interval, 3.0)
        self.nodes: dict[str, _Node] = {}
        self.marks: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.seeds: list[tuple[str, int]] = []
        self.networks: list[Network] = []
        self.networks_read = 0.0
        self.last_load = node.cpu_pct
        self.bind_index = 0
        self.resolver = Resolver(config.seed, lambda m: tell_quietly(self.actor_ref, m))
        # for ``vesta doctor``: what the daemon knew at start, and what it has seen since; the
        # beacons dropped are noted in the loop thread, under the lock
        self.facts = facts or {}
        self._foreign_lock = threading.Lock()
        self.other_key: Counter[str] = Counter()  # host -> beacons under another key
        self.other_version: dict[str, list[Any]] = {}  # host -> [beacons, versions it speaks]
        self.own_from: Counter[str] = Counter()  # host -> beacons with our fingerprint
        self.twins: dict[str, set[str]] = {}  # fingerprint -> hosts it came from at once
        self.suspends: list[float] = []
        self.clock_steps: list[float] = []
        self.wall_offset = _wall_offset()

    def on_start(self) -> None:
        self.read_networks()
        if self.config.bind:
            with contextlib.suppress(OSError, IndexError):
                self.bind_index = socket.if_nametoindex(self.networks[0].interface)
        if self.sock is not None:
            self.loop.datagrams(self.sock, self._receive)
        self.resolver.start()
        self.every(self.interval, "beacon")
        self.announce()

    def stopping(self) -> None:
        self.resolver.stop()
        if self.sock is not None:
            self.loop.unlisten(self.sock)
            self.loop.call(self.sock.close)

    def handle(self, message: Message) -> Any:
        match message:
            case NodeInfo():
                self.node = message
                if abs(message.cpu_pct - self.last_load) >= LOAD_STEP:
                    self.announce()
            case Tick(name="beacon"):
                self.announce()
                self.expire()
                self.watch_clock()
            case ClientRequest(client=client, request=DoctorRequest()):
                self.links.clients.tell(ToClient(client, DoctorReply(self.doctor_facts())))
            case Woke(slept_s=slept):  # a lid opened: perhaps on another network; say so now
                self.suspends = [*self.suspends, slept][-MAX_CLOCK_EVENTS:]
                self.read_networks()
                self.announce()
                if self.seeds:
                    self.announce(to=self.seeds)
            case BeaconHeard():
                self.heard(message)
            case PeerLinked():
                self.linked(message)
            case PeerSeen():
                self.seen(message)
            case LinkRefused(fingerprint=fp, host=host, reason=reason):
                entry = self.entry(fp, host)
                entry.state, entry.reason = "incompatible", reason
                entry.last_seen = time.monotonic()
                self.publish()
            case SeedsResolved(addresses=addresses):
                self.seeds = [(str(host), int(port)) for host, port in addresses]
                self.announce(to=self.seeds)
            case _:
                return super().handle(message)
        return None

    # -- beacons out -------------------------------------------------------------------------------

    def read_networks(self) -> None:
        try:
            self.networks = networks(self.config.bind)
        except Exception as exc:  # psutil on an odd system: beacons still go to the seeds
            logger.warning("cannot read the network interfaces: %s", exc)
            self.networks = []
        self.networks_read = time.monotonic()

    def announce(self, to: list[tuple[str, int]] | None = None) -> None:
        """Send a beacon to ``to``, or to everyone it goes to each round."""
        if self.sock is None:
            return
        if to is None:
            if time.monotonic() - self.networks_read > 10:
                self.read_networks()
            to = self.destinations()
        if not to:
            return
        self.seq += 1
        self.last_load = self.node.cpu_pct
        beacon = Beacon(self.boot, self.seq, self.config.port, self.config.dport,
                        self.config.advertise or self.config.bind, self.node)
        payload = encode(beacon)
        sock, keys, identity, versions = self.sock, self.keys, self.identity, self.versions

        def send() -> None:  # sealed and sent in the loop thread, off this one
            datagram = seal_beacon(keys, identity, payload, versions)
            for address in to:
                try:
                    sock.sendto(datagram, address)
                except OSError as exc:  # an unreachable network, a name gone: the next round
                    logger.debug("beacon to %s:%d failed: %s", *address, exc)

        self.loop.call(send)

    def destinations(self) -> list[tuple[str, int]]:
        dport = self.config.dport
        out = [(n.broadcast, dport) for n in self.networks if n.broadcast]
        out += self.seeds
        for entry in self.nodes.values():  # nodes beyond our subnets hear only unicast
            if entry.dport and not self.on_our_subnets(entry.host):
                out.append((entry.host, entry.dport))
        return list(dict.fromkeys(out))

    def on_our_subnets(self, host: str) -> bool:
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return any(address in n.network and n.broadcast for n in self.networks)

    # -- vesta doctor ------------------------------------------------------------------------------

    def note_foreign(self, counts: Counter[str], host: str) -> None:
        """Count a dropped beacon's sender (in the loop thread), for at most so many hosts."""
        with self._foreign_lock:
            if host in counts or len(counts) < MAX_FOREIGN_HOSTS:
                counts[host] += 1

    def ours(self, host: str) -> bool:
        """Whether ``host`` is one of this machine's addresses (our broadcasts come back)."""
        return host.startswith("127.") or any(n.address == host for n in self.networks)

    def watch_clock(self) -> None:
        """Note a step of the wall clock (NTP setting a Pi's clock, a person): the offset from
        the boot clock, which suspends do not move, changes."""
        offset = _wall_offset()
        if abs(offset - self.wall_offset) >= CLOCK_STEP_S:
            self.clock_steps = [*self.clock_steps, round(offset - self.wall_offset, 1)][
                -MAX_CLOCK_EVENTS:]
        self.wall_offset = offset

    def doctor_facts(self) -> dict[str, Any]:
        """What ``vesta doctor`` checks: the facts of the start, and what was seen since."""
        with self._foreign_lock:
            other_key, own_from = dict(self.other_key), dict(self.own_from)
            other_version = {host: list(seen) for host, seen in self.other_version.items()}
        heard = {e.host for e in self.nodes.values() if e.host}
        return {
            **self.facts,
            "networks": [{"interface": n.interface, "address": n.address,
                          "broadcast": n.broadcast} for n in self.networks],
            "beacon_targets": [f"{host}:{port}" for host, port in self.destinations()],
            "foreign": {"other_key": other_key, "other_version": other_version},
            "own_fingerprint_from": own_from,
            "twins": {fp: sorted(hosts) for fp, hosts in self.twins.items()},
            "seeds": list(self.config.seed),
            "seed_status": [{"seed": f"{host}:{port}", "answered": host in heard}
                            for host, port in self.seeds]
            + [{"seed": seed, "answered": False, "unresolved": True}
               for seed in self.resolver.unresolved],
            "suspends": self.suspends, "clock_steps": self.clock_steps,
        }

    # -- beacons in --------------------------------------------------------------------------------

    def _receive(self, sock: socket.socket) -> None:
        """In the loop thread: open every waiting datagram; tell the actor what counts."""
        for _ in range(64):
            try:
                data, ancillary, _flags, source = sock.recvmsg(
                    MAX_DATAGRAM + 1, socket.CMSG_SPACE(_PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.debug("discovery socket: %s", exc)
                return
            if self.bind_index and _arrived_on(ancillary) not in (0, self.bind_index):
                continue  # -bind: only the interface that holds the bound address
            heard = self.open(data, source[0])
            if heard is not None:
                tell_quietly(self.actor_ref, heard)

    def open(self, data: bytes, host: str) -> BeaconHeard | None:
        """A datagram's beacon, or None (counted) if it is not one of ours to take."""
        try:
            opened = open_beacon(self.keys, data, self.versions)
        except CryptoError as exc:
            self.counters.add("dropped_beacons")
            if isinstance(exc, WrongKey):
                self.counters.add("beacons_other_key")
                self.note_foreign(self.other_key, host)
            elif not isinstance(exc, NotVesta):
                self.counters.add("beacons_bad")
            return None
        if opened.fingerprint == self.fingerprint:
            if not self.ours(host):  # not our own broadcast come back: a copy of this node
                self.counters.add("beacons_own_fingerprint")
                self.note_foreign(self.own_from, host)
            return None
        if not opened.compatible:
            self.counters.add("beacons_other_version")
            with self._foreign_lock:
                seen = self.other_version.get(host)
                if seen is None and len(self.other_version) < MAX_FOREIGN_HOSTS:
                    seen = self.other_version[host] = [0, _versions(opened.versions)]
                if seen is not None:
                    seen[0] += 1
            return BeaconHeard(opened.fingerprint, list(opened.versions), None, host)
        try:
            beacon = decode(opened.payload, Scope.PEER)
        except DecodeError:
            beacon = None
        if not isinstance(beacon, Beacon) or beacon.node.fingerprint != opened.fingerprint:
            self.counters.add("dropped_beacons")
            self.counters.add("beacons_bad")
            return None
        return BeaconHeard(opened.fingerprint, list(opened.versions), beacon, host)

    def heard(self, heard: BeaconHeard) -> None:
        fp, beacon = heard.fingerprint, heard.beacon
        now = time.monotonic()
        if beacon is None:
            if fp in self.nodes and self.nodes[fp].linked:
                return  # a linked peer proved a common version; this datagram is no news
            entry = self.entry(fp, heard.host)
            entry.versions = (heard.versions[0], heard.versions[1])
            entry.state, entry.last_seen = "incompatible", now
            entry.reason = (f"speaks protocol {_versions(entry.versions)}, this node speaks "
                            f"{_versions(self.versions)}")
            self.publish()
            return
        mark = (beacon.boot, beacon.seq)
        if fp in self.marks and mark <= self.marks[fp]:
            self.counters.add("dropped_beacons")
            self.counters.add("beacons_replayed")
            known = self.nodes.get(fp)
            if (mark < self.marks[fp] and known is not None and known.host
                    and known.host != heard.host and len(self.twins) < MAX_FOREIGN_HOSTS):
                # an older mark from another address while the node speaks from its own: two
                # machines with one identity (a node with two addresses repeats the same mark)
                self.twins.setdefault(fp, set()).update((known.host, heard.host))
            return
        self.marks[fp] = mark
        self.marks.move_to_end(fp)
        while len(self.marks) > MAX_MARKS:
            self.marks.popitem(last=False)
        new = fp not in self.nodes
        entry = self.entry(fp, heard.host)
        entry.host, entry.port, entry.dport = heard.host, beacon.port, beacon.dport
        entry.advertise, entry.node, entry.last_seen = beacon.advertise, beacon.node, now
        entry.versions = (heard.versions[0], heard.versions[1])
        if entry.state == "incompatible":
            entry.state, entry.reason = "seen", ""
        if new:
            self.announce(to=[(heard.host, beacon.dport)])  # answer a newcomer at once
        self.maybe_dial(entry, now)
        if entry.linked:
            self.publish()

    def entry(self, fp: str, host: str) -> _Node:
        entry = self.nodes.get(fp)
        if entry is None:
            if len(self.nodes) >= MAX_NODES:
                self.forget_one()
            entry = self.nodes[fp] = _Node(fp, host, first_heard=time.monotonic())
        return entry

    def forget_one(self) -> None:
        unlinked = [e for e in self.nodes.values() if not e.linked]
        if unlinked:
            oldest = min(unlinked, key=lambda e: e.last_seen)
            del self.nodes[oldest.fingerprint]

    def maybe_dial(self, entry: _Node, now: float) -> None:
        if entry.linked or entry.state == "incompatible" or not entry.port:
            return
        if self.fingerprint < entry.fingerprint or now - entry.first_heard > DIAL_GRACE_S:
            self.links.transport.tell(Dial(entry.fingerprint, entry.advertise or entry.host,
                                           entry.port))

    # -- links -------------------------------------------------------------------------------------

    def linked(self, msg: PeerLinked) -> None:
        entry = self.nodes.get(msg.fingerprint)
        if msg.up:
            self.marks.pop(msg.fingerprint, None)  # a proved peer starts a fresh sequence
            entry = entry or self.entry(msg.fingerprint, "")
            entry.linked, entry.version, entry.state = True, msg.version, "up"
            entry.last_seen, entry.reason = time.monotonic(), ""
            self.links.to_peer(msg.fingerprint, PeerHello(
                self.node, self.config.port, self.config.dport))
            logger.info("peer %s is up", entry.node.name if entry.node else msg.fingerprint)
        elif entry is not None:
            entry.linked = False
            entry.state = "seen" if entry.state != "incompatible" else entry.state
            entry.reason = msg.reason
            entry.first_heard = time.monotonic()
            logger.info("peer %s is down: %s",
                        entry.node.name if entry.node else msg.fingerprint, msg.reason)
        self.publish()

    def seen(self, msg: PeerSeen) -> None:
        entry = self.nodes.get(msg.fingerprint)
        if entry is None or not entry.linked:
            return
        entry.last_seen = time.monotonic()
        if msg.hello is not None:
            entry.node = msg.hello.node
            entry.port, entry.dport = msg.hello.port, msg.hello.dport
            if msg.host:
                entry.host = msg.host
        if msg.leaving:
            entry.state, entry.reason = "leaving", msg.leaving
        self.publish()

    def expire(self) -> None:
        now = time.monotonic()
        gone = [fp for fp, e in self.nodes.items()
                if not e.linked and now - e.last_seen > self.expire_s]
        for fp in gone:
            del self.nodes[fp]
        if gone:
            self.publish()

    def publish(self) -> None:
        now = time.monotonic()
        peers = [e.doc(now) for e in self.nodes.values()
                 if e.linked or e.state == "incompatible"]
        self.links.autopilot.tell(PeerTable(peers))


def _arrived_on(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= _PKTINFO.size:
            return int(_PKTINFO.unpack_from(data)[0])
    return 0


def _versions(versions: tuple[int, int]) -> str:
    low, high = versions
    return f"version {low}" if low == high else f"versions {low} to {high}"


class Resolver(threading.Thread):
    """Looks up the seeds' host names off the actor thread (DNS can take seconds), now and then."""

    def __init__(self, seeds: list[str], tell: Callable[[Message], object]) -> None:
        super().__init__(name="vesta-resolver", daemon=True)
        self.seeds = seeds
        self.tell = tell
        self.unresolved: list[str] = []  # the seeds whose names did not resolve last time
        self._stopped = threading.Event()

    def run(self) -> None:
        if not self.seeds:
            return
        while True:
            found: list[list[Any]] = []
            unresolved = []
            for seed in self.seeds:
                host, _, port = seed.rpartition(":")
                try:
                    infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)
                except OSError as exc:
                    logger.warning("seed %s: %s", seed, exc)
                    unresolved.append(seed)
                    continue
                found += [[info[4][0], info[4][1]] for info in infos[:1]]
            self.unresolved = unresolved  # read by vesta doctor, in the actor's thread
            self.tell(SeedsResolved(found))
            if self._stopped.wait(RESOLVE_EVERY_S if found else 2.0):
                return

    def stop(self) -> None:
        self._stopped.set()


def _wall_offset() -> float:
    """The wall clock less the boot clock: steady but for steps of the wall clock."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
