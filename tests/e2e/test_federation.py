"""Real daemons on loopback as peers: linking through seeds, keys, versions, hostile input.

Every daemon here binds 127.0.0.1 and finds the others through ``-seed``, so nothing leaves the
machine; broadcast discovery across hosts is tried in tests/lab. A test that needs a peer which
misbehaves plays it itself, with the project's own handshake and a key pair of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import (
    KEY,
    Daemon,
    free_port,
    python_env,
    sigint_as_in_a_shell,
    wait_for,
)
from vesta import PROTOCOL_VERSION
from vesta.client import Client
from vesta.identity import Identity
from vesta.messages import Beacon, NodeInfo, RunTask, encode
from vesta.transport.crypto import FederationKeys, seal_beacon
from vesta.transport.framing import HEADER, frame
from vesta.transport.handshake import Initiator, VersionMismatch
from vesta.workers.jobs import job_digest, unit_result

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., Daemon]
#: a spills only when its own cores are pinned, and counts b busy only when b's are; b, a lender,
#: takes work while its owner's load (all else on its cores) is below it: the tests hold however
#: much else runs on this machine
BUSY_LINE = ("-spill-cpu-pct", "95")


def ports() -> tuple[int, int]:
    return free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)


def peers(d: Daemon) -> list[dict[str, Any]]:
    """What ``vesta --json peers`` prints, through the client in this process: polling it does
    not start an interpreter each time, which would load the very cores the tests measure."""
    with Client(d.socket, timeout=10) as client:
        return client.peers()


def status(d: Daemon) -> dict[str, Any]:
    with Client(d.socket, timeout=10) as client:
        return client.status()


def busy_and_idle(a: Daemon, idle: str) -> bool:
    """a is at or above its spill line and, as a sees it, the peer ``idle`` is below it."""
    seen = [p for p in peers(a) if p["name"] == idle]
    return (status(a)["node"]["cpu_pct"] >= 95 and bool(seen) and seen[0]["cpu_pct"] < 95)


def up(d: Daemon, name: str) -> bool:
    return any(p["name"] == name and p["state"] == "up" for p in peers(d))


def pair(start: Start, *extra_b: str, key_b: str = KEY,
         extra_a: tuple[str, ...] = ()) -> tuple[Daemon, Daemon, dict[str, int]]:
    """Two daemons on loopback that seed each other, each on CPUs of its own where the machine
    has two or more (as two machines would be: a's stress leaves b idle); b lends while what else
    runs on its CPUs stays below BUSY_LINE."""
    (pa, da), (pb, db) = ports(), ports()
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    cpus_a, cpus_b = set(cores[:half]), set(cores[half:]) or set(cores)
    a = start("-port", str(pa), "-dport", str(da), "-seed", f"127.0.0.1:{db}",
              "-advertise-spare", "200", *extra_a, name="a", cpus=cpus_a)
    b = start("-port", str(pb), "-dport", str(db), "-seed", f"127.0.0.1:{da}",
              "-advertise-spare", "200", "-key", key_b, *BUSY_LINE, *extra_b, name="b",
              cpus=cpus_b)
    return a, b, {"a_port": pa, "a_dport": da, "b_port": pb, "b_dport": db}


def test_two_nodes_link_through_seeds_and_list_each_other(daemon_factory: Start) -> None:
    a, b, _ = pair(daemon_factory)
    wait_for(lambda: up(a, "b") and up(b, "a"), timeout=10, what="the two nodes to link")
    shown = a.cli("peers").stdout.splitlines()
    assert shown[0].split()[:3] == ["NAME", "ADDRESS", "STATE"]
    assert shown[1].split()[:3] == ["b", "127.0.0.1", "up"]
    (peer,) = peers(a)
    assert {"name", "address", "fingerprint", "cpu_pct", "mem_available_mb", "power",
            "last_seen_s", "version", "willingness", "cores", "state", "owner_cpu_pct",
            "lent_cpu_pct", "temp_c"} <= peer.keys()
    assert peer["fingerprint"] == status(b)["node"]["fingerprint"]
    assert peer["address"] == "127.0.0.1" and peer["version"] == PROTOCOL_VERSION
    counters = status(a)["counters"]
    assert {"dropped_beacons", "dropped_frames", "failed_handshakes", "refused_jobs"} <= (
        counters.keys())


def test_a_node_with_another_key_stays_invisible_both_ways(daemon_factory: Start) -> None:
    a, b, _ = pair(daemon_factory, key_b="a-completely-different-key-42")
    wait_for(lambda: status(a)["counters"].get("beacons_other_key", 0) >= 3
             and status(b)["counters"].get("beacons_other_key", 0) >= 3,
             timeout=10, what="several beacons of the other key to be dropped")
    assert peers(a) == [] and peers(b) == []
    assert status(a)["counters"]["dropped_beacons"] >= 3


def test_the_other_node_runs_work_when_this_one_is_busy(daemon_factory: Start) -> None:
    a, _b, _ = pair(daemon_factory, "-allow-exec", extra_a=BUSY_LINE)
    wait_for(lambda: up(a, "b"), timeout=10, what="the link")
    assert a.cli("stress", "0", "20").returncode == 0
    try:
        wait_for(lambda: busy_and_idle(a, "b"), timeout=20, what="a to be busy and b idle")
        done = a.cli("--json", "exec", "--", "sh", "-c",
                     "echo $VESTA_JOB_ID $VESTA_NODE; grep Cpus_allowed_list /proc/self/status;"
                     " cut -d' ' -f19 /proc/self/stat")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["node"] == "b"
        ids, cpus, nice = result["stdout"].splitlines()
        assert ids == f"{result['job_id']} b"  # the job, and the node it runs on
        offered = next(p for p in peers(a) if p["name"] == "b")["offer_workers"]
        assert _count_cpus(cpus.split(":")[1].strip()) == offered  # lent: the offered CPUs only
        assert nice.strip() == "19"  # and at the lowest priority
        cpu = json.loads(a.cli("--json", "cpu", "1").stdout)
        assert [p["node"] for p in cpu["placements"]] == ["b"]
        assert cpu["digest"] == job_digest([unit_result(0, i) for i in range(10)])
    finally:
        a.cli("stop-stress")


def test_a_large_job_goes_out_in_chunks_to_both_idle_nodes_with_one_nodes_digest(
    daemon_factory: Start,
) -> None:
    a, b, _ = pair(daemon_factory, extra_a=BUSY_LINE)
    wait_for(lambda: up(a, "b"), timeout=10, what="the link")
    # a takes chunks itself only while below its spill line: wait out its start's load
    wait_for(lambda: status(a)["node"]["cpu_pct"] < 80, timeout=20, what="a to be idle")
    done = a.cli("--json", "cpu", "6", "--seed", "5")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    placements = {p["node"]: p for p in result["placements"]}
    assert placements.keys() == {"a", "b"}
    assert sum(p["units"] for p in placements.values()) == 60
    # a first chunk each to measure the node, then chunks of about a second of its work
    assert all(p["chunks"] >= 2 for p in placements.values()), placements
    assert result["digest"] == job_digest([unit_result(5, i) for i in range(60)])
    # both ledgers book what b ran for a, as b measured it
    fp_a, fp_b = status(a)["node"]["fingerprint"], status(b)["node"]["fingerprint"]
    wait_for(lambda: status(a)["ledger"].get(fp_b, {}).get("borrowed", 0) > 0
             and status(b)["ledger"].get(fp_a, {}).get("lent", 0) > 0, timeout=10,
             what="both ledgers to book the work")
    borrowed = status(a)["ledger"][fp_b]
    lent = status(b)["ledger"][fp_a]
    assert borrowed["borrowed"] == lent["lent"]
    assert (borrowed["name"], lent["name"]) == ("b", "a")
    # b's CPU for its units: about its share of the job's seconds, on b's one core
    assert 0.3 * placements["b"]["seconds"] <= lent["lent"] <= 1.2 * placements["b"]["seconds"]
    assert next(p for p in peers(a) if p["name"] == "b")["borrowed"] == borrowed["borrowed"]


def lent_cpu_seconds(d: Daemon) -> float:
    """CPU seconds used so far by d's processes that lend (nice 19) and what they started."""
    total = 0.0
    for proc in d.descendants():
        with contextlib.suppress(psutil.Error):
            if proc.nice() == 19:
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
    return total


def test_ctrl_c_cancels_a_split_job_on_every_node_that_holds_a_part(
    daemon_factory: Start,
) -> None:
    a, b, _ = pair(daemon_factory, extra_a=BUSY_LINE)
    wait_for(lambda: up(a, "b"), timeout=10, what="the link")
    for _attempt in range(3):  # a job that found b busy for a moment runs on a alone: again
        wait_for(lambda: status(a)["node"]["cpu_pct"] < 80 and any(
            p["offer_workers"] > 0 for p in peers(a)), timeout=20, what="a and b to be idle")
        proc = subprocess.Popen([sys.executable, "-m", "vesta.apps.cli", "--socket", a.socket,
                                 "cpu", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=python_env(), preexec_fn=sigint_as_in_a_shell)
        try:
            wait_for(lambda: lent_cpu_seconds(b) > 0.1 and any(
                f["to"] == "b" for f in status(a)["flows"]), timeout=10, interval=0.05,
                what="a chunk of the job to run on b")
            break
        except pytest.fail.Exception:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=20)
    else:
        pytest.fail("the job never ran on b in 3 submissions")

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)

    assert proc.returncode == 130, err
    wait_for(lambda: not status(a)["jobs"], timeout=5, what="a to forget the job")
    samples: list[float] = []

    def b_idle() -> bool:  # b's lent processes use no more CPU: cancelled there too
        samples.append(lent_cpu_seconds(b))
        return len(samples) >= 3 and samples[-1] - samples[-3] < 0.02

    wait_for(b_idle, timeout=5, interval=0.1, what="b to stop the chunk it ran for a")


def _count_cpus(listing: str) -> int:
    """CPUs in a list such as ``0-3,6``."""
    count = 0
    for part in listing.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def test_exec_is_refused_by_a_node_that_does_not_allow_it(daemon_factory: Start) -> None:
    a, b, _ = pair(daemon_factory, extra_a=("-spill-cpu-pct", "1", "-cpu-offer-pct", "0"))
    wait_for(lambda: up(a, "b"), timeout=10, what="the link")
    wait_for(lambda: not peers(a)[0]["allow_exec"], timeout=5, what="b's beacon")
    done = b.cli("--json", "exec", "--", "true")  # b spills nowhere: a offers nothing
    assert done.returncode == 0
    assert json.loads(done.stdout)["node"] == "b"


def fake_identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


def handshake(port: int, keys: FederationKeys, identity: Identity,
              versions: tuple[int, int] = (PROTOCOL_VERSION, PROTOCOL_VERSION)) -> Any:
    """Play the initiator against a daemon; return (socket, session)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    init = Initiator(keys, identity, versions)
    sock.sendall(frame(init.hello()))
    auth = init.on_reply(read_frame(sock))
    sock.sendall(frame(auth))
    try:
        return sock, init.on_confirm(read_frame(sock))
    except VersionMismatch:
        sock.close()
        raise


def read_frame(sock: socket.socket) -> bytes:
    head = recv_exactly(sock, HEADER.size)
    return recv_exactly(sock, HEADER.unpack(head)[0])


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("closed")
        data += chunk
    return data


def closed(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        return True
    return True


@pytest.fixture(scope="module")
def keys() -> FederationKeys:
    return FederationKeys.derive(KEY)


def test_a_peer_on_another_protocol_version_is_refused_naming_both(
    daemon: Daemon, keys: FederationKeys
) -> None:
    port = int(daemon.args[daemon.args.index("-port") + 1])
    with pytest.raises(VersionMismatch) as caught:
        handshake(port, keys, fake_identity(), versions=(2, 3))
    message = str(caught.value)
    assert "versions 2 to 3" in message and f"version {PROTOCOL_VERSION}" in message
    (peer,) = wait_for(lambda: peers(daemon), timeout=5, what="the refused node to be listed")
    assert peer["state"] == "incompatible"
    assert "2" in peer["reason"] and str(PROTOCOL_VERSION) in peer["reason"]
    shown = daemon.cli("peers").stdout  # for people: the state, and why, on its own line
    assert "incompatible" in shown and peer["reason"] in shown
    assert status(daemon)["counters"]["failed_handshakes"] >= 1


def test_a_replayed_or_reordered_frame_ends_the_link(daemon: Daemon, keys: FederationKeys) -> None:
    port = int(daemon.args[daemon.args.index("-port") + 1])
    sock, session = handshake(port, keys, fake_identity())
    header, body = session.sealer.seal(b"")  # a heartbeat
    sock.sendall(header + body + header + body)  # the same frame twice
    assert closed(sock)
    wait_for(lambda: status(daemon)["counters"]["dropped_frames"] >= 1, timeout=5,
             what="the replay to be counted")

    sock, session = handshake(port, keys, fake_identity())
    first = session.sealer.seal(b"")
    second = session.sealer.seal(b"")
    sock.sendall(b"".join(second) + b"".join(first))
    assert closed(sock)
    wait_for(lambda: status(daemon)["counters"]["dropped_frames"] >= 2, timeout=5,
             what="the reordered frame to be counted")


def test_a_linked_peer_cannot_send_internal_messages(daemon: Daemon, keys: FederationKeys) -> None:
    """Every type that may not come from a peer, sent over a real link: each refused, counted,
    and the link and the daemon carry on."""
    from tests.test_messages import NOT_FROM_PEERS, _example
    from vesta.messages import Message

    port = int(daemon.args[daemon.args.index("-port") + 1])
    sock, session = handshake(port, keys, fake_identity())
    before = status(daemon)["counters"]["dropped_frames"]
    for tag in NOT_FROM_PEERS:
        sock.sendall(b"".join(session.sealer.seal(encode(_example(Message.registry[tag])))))
    wait_for(lambda: status(daemon)["counters"]["dropped_frames"] >= before + len(NOT_FROM_PEERS),
             timeout=10, what="every internal and control message to be refused")
    assert "CancelAll" in NOT_FROM_PEERS and "Drain" in NOT_FROM_PEERS
    assert "Serve" in NOT_FROM_PEERS and "SubmitRequest" in NOT_FROM_PEERS
    sock.sendall(b"".join(session.sealer.seal(b"")))  # the link is still up: a heartbeat opens
    assert daemon.proc.poll() is None
    assert status(daemon)["counters"]["dropped_frames"] == before + len(NOT_FROM_PEERS)
    sock.close()


def test_random_frames_and_datagrams_are_counted_and_the_peers_still_served(
    daemon_factory: Start,
) -> None:
    a, b, p = pair(daemon_factory)
    wait_for(lambda: up(a, "b") and up(b, "a"), timeout=10, what="the link")
    rng = random.Random(7)
    before = status(a)["counters"]["dropped_beacons"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for i in range(10_000):
            size = rng.randrange(0, 300)
            junk = bytes(rng.getrandbits(8) for _ in range(size))
            if i % 3 == 0:
                junk = b"VSTA" + junk  # the envelope's magic, then garbage
            udp.sendto(junk, ("127.0.0.1", p["a_dport"]))
            if i % 100 == 99:  # paced, so that the kernel's buffer never drops one
                wait_for(lambda n=i: status(a)["counters"]["dropped_beacons"] - before > n,
                         timeout=30, what="the daemon to keep up")
    sent = connections = 0
    deadline = time.monotonic() + 60
    while sent < 10_000 and time.monotonic() < deadline:
        connections += 1
        with socket.create_connection(("127.0.0.1", p["a_port"]), timeout=10) as tcp:
            try:
                for _ in range(50):  # until the daemon hangs up on the garbage
                    size = rng.randrange(1, 200)
                    tcp.sendall(frame(bytes(rng.getrandbits(8) for _ in range(size)))
                                if rng.random() < 0.5 else
                                bytes(rng.getrandbits(8) for _ in range(size)))
                    sent += 1
            except OSError:
                pass
    assert sent >= 10_000
    wait_for(lambda: status(a)["counters"]["dropped_beacons"] - before >= 10_000, timeout=30,
             what="every random datagram to be counted")
    counters = status(a)["counters"]
    assert counters["failed_handshakes"] >= connections // 2
    assert a.proc.poll() is None
    assert up(a, "b") and up(b, "a")  # the link survived it all
    done = a.cli("--json", "cpu", "1")
    assert done.returncode == 0, done.stderr


def test_a_replayed_beacon_is_dropped(daemon_factory: Start, keys: FederationKeys) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    a_port, a_dport = ports()
    a = daemon_factory("-port", str(a_port), "-dport", str(a_dport), "-seed",
                       f"127.0.0.1:{listener.getsockname()[1]}", "-advertise-spare", "200",
                       name="a")
    identity = fake_identity()
    node = NodeInfo("fake", identity.fingerprint, "127.0.0.1", PROTOCOL_VERSION, 1, 0.0, 100,
                    100, "grid", 1.0, None, 1, 10, False, False, [], {})
    dead_port = free_port(socket.SOCK_STREAM)  # it never answers: the node stays unlinked
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        seq = 0

        def beacon_and_dial() -> int:
            nonlocal seq, datagram
            seq += 1
            datagram = seal_beacon(keys, identity, encode(Beacon(1, seq, dead_port, 0, "", node)))
            udp.sendto(datagram, ("127.0.0.1", a_dport))
            return int(status(a)["counters"]["failed_handshakes"])

        datagram = b""
        wait_for(beacon_and_dial, timeout=10, interval=0.2, what="a to dial the fake node")
        for _ in range(5):
            udp.sendto(datagram, ("127.0.0.1", a_dport))
    wait_for(lambda: status(a)["counters"].get("beacons_replayed", 0) >= 5, timeout=10,
             what="the replays to be dropped")
    listener.close()


def test_a_node_claiming_another_fingerprint_is_not_linked(
    daemon_factory: Start, keys: FederationKeys
) -> None:
    """A beacon signed by one identity but pointing at another node's port: the handshake proves
    who answers there, and the dial fails."""
    a, _b, p = pair(daemon_factory)
    wait_for(lambda: up(a, "b"), timeout=10, what="the link")
    liar = fake_identity()
    node = NodeInfo("liar", liar.fingerprint, "127.0.0.1", PROTOCOL_VERSION, 1, 0.0, 100, 100,
                    "grid", 1.0, None, 1, 10, False, False, [], {})
    before = status(a)["counters"]["failed_handshakes"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        seq = 0

        def beacon_and_dial() -> bool:  # new beacons until a dials (at once, or after a grace)
            nonlocal seq
            seq += 1
            beacon = Beacon(1, seq, p["b_port"], 0, "", node)
            udp.sendto(seal_beacon(keys, liar, encode(beacon)), ("127.0.0.1", p["a_dport"]))
            return bool(status(a)["counters"]["failed_handshakes"] > before)

        wait_for(beacon_and_dial, timeout=10, interval=0.2, what="the dial to the liar to fail")
    assert [x["name"] for x in peers(a)] == ["b"]


def test_run_task_from_a_stranger_peer_is_refused_by_rule(
    daemon: Daemon, keys: FederationKeys
) -> None:
    """A peer asks for work the node does not lend (exec is off): a refusal with the rule."""
    from vesta.messages import ExecJob, Scope, TaskDone, decode

    port = int(daemon.args[daemon.args.index("-port") + 1])
    sock, session = handshake(port, keys, fake_identity())
    run = RunTask("t1", "job-1", ExecJob(["hostname"]), 0, 1)
    sock.sendall(b"".join(session.sealer.seal(encode(run))))
    sock.settimeout(10)
    while True:
        header = recv_exactly(sock, HEADER.size)
        body = recv_exactly(sock, HEADER.unpack(header)[0])
        payload = session.opener.open(header, body)
        if payload:
            msg = decode(payload, Scope.PEER)
            if isinstance(msg, TaskDone):
                break
    assert msg.refused and not msg.ok and msg.task_id == "t1"
    assert "refused 'hostname'" in msg.error and "allow_exec is false" in msg.error
    assert daemon.name in msg.error
    assert status(daemon)["counters"]["refused_jobs"] >= 1


@pytest.mark.parametrize("retry", [False, True], ids=["without --retry", "with --retry"])
def test_an_exec_whose_node_dies_fails_or_runs_again_elsewhere(
    daemon_factory: Start, retry: bool, tmp_path: Path
) -> None:
    a, b, _ = pair(daemon_factory, "-allow-exec", extra_a=BUSY_LINE)
    wait_for(lambda: up(a, "b"), timeout=10, what="the link")
    assert a.cli("stress", "0", "30").returncode == 0
    try:
        wait_for(lambda: busy_and_idle(a, "b"), timeout=20, what="a to be busy and b idle")
        marker = tmp_path / "runs"
        args = ["exec", *(["--retry"] if retry else []), "--", "sh", "-c",
                f"echo started; echo run >> {marker}; sleep 3; echo finished"]
        proc = subprocess.Popen([sys.executable, "-m", "vesta.apps.cli", "--socket", a.socket,
                                 *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=python_env())
        wait_for(lambda: any(f["to"] == "b" for f in status(a)["flows"]), timeout=10,
                 what="the command to be placed on b")
        wait_for(marker.exists, timeout=10, what="the command to start on b")
        b.proc.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        a.cli("stop-stress")
    if retry:
        assert proc.returncode == 0, err
        assert marker.read_text().count("run") == 2  # again, from the start, on a
        assert out.endswith("finished\n")
        assert "ran on a" in err
    else:
        assert proc.returncode == 125
        assert "b" in err and "--retry" in err
    kinds = [e["kind"] for e in status(a)["events"]]
    assert "failover" in kinds and "leave" in kinds


def test_half_open_connections_are_bounded_and_time_out(daemon: Daemon) -> None:
    """Connections that never finish a handshake: at most 16 are held, each at most 5 s."""
    from vesta.actors.transport import MAX_HALF_OPEN
    from vesta.transport.link import HANDSHAKE_TIMEOUT_S

    port = int(daemon.args[daemon.args.index("-port") + 1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(MAX_HALF_OPEN)]
    try:
        wait_for(lambda: status(daemon)["counters"]["failed_handshakes"] == 0, timeout=5,
                 what="the daemon to answer")
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            assert extra.recv(1) == b""  # refused at once: closed without a word
        for sock in idle:  # each is closed once its deadline passes, silently
            assert sock.recv(1) == b""
        took = time.monotonic() - started
        assert took <= HANDSHAKE_TIMEOUT_S + 2
        wait_for(lambda: status(daemon)["counters"]["failed_handshakes"] >= MAX_HALF_OPEN + 1,
                 timeout=5, what="each to be counted")
    finally:
        for sock in idle:
            sock.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as again:
        again.sendall(b"\x00\x00\x00\x01x")  # the daemon serves new connections again


def test_a_peer_that_goes_silent_mid_handshake_is_dropped_at_the_deadline(
        daemon: Daemon, keys: FederationKeys) -> None:
    """A key holder that says hello, gets the daemon's reply and never sends its part: the
    connection is closed at the handshake deadline and counted, and the daemon links others."""
    from vesta.transport.link import HANDSHAKE_TIMEOUT_S

    port = int(daemon.args[daemon.args.index("-port") + 1])
    with socket.create_connection(("127.0.0.1", port), timeout=HANDSHAKE_TIMEOUT_S + 5) as sock:
        init = Initiator(keys, fake_identity())
        sock.sendall(frame(init.hello()))
        init.on_reply(read_frame(sock))  # a real reply: the daemon is waiting for the rest
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed without a word
        assert time.monotonic() - started <= HANDSHAKE_TIMEOUT_S + 1
    wait_for(lambda: status(daemon)["counters"]["failed_handshakes"] >= 1, timeout=5,
             what="the silent handshake to be counted")
    linked, session = handshake(port, keys, fake_identity())  # the next one links
    with linked:
        assert session.peer_fingerprint
