"""The lab itself: broadcast stays in its subnet, unicast crosses, hosts have their own names and
cores, a link can be cut, and nothing of a lab outlives it, even when its user fails or crashes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from tests.conftest import KEY, python_env, wait_for
from tests.lab.conftest import start_vestad
from tests.lab.netlab import Host, Lab, LabError, cleanup_stale

pytestmark = pytest.mark.timeout(60)

PORT = 47123

# argv: PORT LAST. Prints "MESSAGE SENDER" for each datagram up to and including LAST.
RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(15)
while True:
    data, (addr, _) = s.recvfrom(100)
    print(data.decode(), addr, flush=True)
    if data.decode() == sys.argv[2]:
        break
"""

# argv: ADDRESS PORT MESSAGE. One datagram; broadcast allowed.
SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""

# argv: PORT. Accepts one connection and answers "DATA PEER-ADDRESS".
ECHO_SERVER = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
s.settimeout(15)
conn, (addr, _) = s.accept()
conn.sendall(conn.recv(100) + b" " + addr.encode())
"""

# argv: ADDRESS PORT MESSAGE. Prints the answer.
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
    s.sendall(sys.argv[3].encode())
    print(s.recv(100).decode())
"""


def receive(host: Host, last: str) -> subprocess.Popen[str]:
    """A UDP receiver on PORT in ``host``, bound before this returns."""
    proc = host.run([sys.executable, "-c", RECEIVER, str(PORT), last], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    wait_listening(host, "-u", proc)
    return proc


def wait_listening(host: Host, proto: str, proc: subprocess.Popen[str]) -> None:
    def bound() -> bool:
        assert proc.poll() is None, proc.communicate()
        return bool(host.exec(["ss", "-Hln", proto, f"sport = :{PORT}"]).stdout.strip())

    wait_for(bound, timeout=10, what=f"a socket on port {PORT} in {host.name}")


def send(sender: Host, address: str, message: str) -> None:
    result = sender.exec([sys.executable, "-c", SENDER, address, str(PORT), message])
    assert result.returncode == 0, result.stderr


def send_until_received(sender: Host, address: str, message: str,
                        receiver: subprocess.Popen[str]) -> list[str]:
    """Send ``message`` (the receiver's last) until the receiver has it; what it received."""
    def delivered() -> bool:
        if receiver.poll() is None:
            send(sender, address, message)
        return receiver.poll() is not None

    wait_for(delivered, timeout=10, interval=0.05, what=f"{message!r} to reach {address}")
    out, err = receiver.communicate(timeout=5)
    assert receiver.returncode == 0, err
    return out.splitlines()


def netns_names() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout.split()


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                          check=True).stdout


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def running(proc: subprocess.Popen[str], argv: list[str]) -> bool:
    """The exec chain is through: the pid is ``argv`` itself."""
    try:
        return psutil.Process(proc.pid).cmdline() == argv
    except psutil.NoSuchProcess:
        return False


def netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def netns_inode(host: Host) -> str:
    return f"net:[{os.stat(f'/run/netns/{host.netns}').st_ino}]"


def test_broadcast_reaches_its_subnet_and_not_the_other(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    c = lab.add_host("c", subnet_index=1)
    at_a, at_c = receive(a, "hello"), receive(c, "end")
    assert send_until_received(b, "10.77.0.255", "hello", at_a)[0] == f"hello {b.address}"
    # Were the broadcasts forwarded, they would reach c before the unicast sent after them.
    assert set(send_until_received(b, c.address, "end", at_c)) == {f"end {b.address}"}


def test_unicast_udp_and_tcp_cross_subnets_through_the_router(lab: Lab) -> None:
    a, c = lab.add_host("a"), lab.add_host("c", subnet_index=1)
    assert (a.address, c.address) == ("10.77.0.1", "10.77.1.1")
    for src, dst in ((a, c), (c, a)):
        assert send_until_received(src, dst.address, "hi", receive(dst, "hi")) == [
            f"hi {src.address}"]
    server = a.run([sys.executable, "-c", ECHO_SERVER, str(PORT)], stderr=subprocess.PIPE,
                   text=True)
    wait_listening(a, "-t", server)
    result = c.exec([sys.executable, "-c", ECHO_CLIENT, a.address, str(PORT), "ping"])
    assert result.stdout == f"ping {c.address}\n", result.stderr
    assert server.wait(5) == 0


def test_a_host_has_its_own_hostname(lab: Lab) -> None:
    for name in ("alpha", "beta"):
        assert lab.add_host(name).exec(["hostname"]).stdout == f"{name}\n"
    assert socket.gethostname() not in ("alpha", "beta")


def test_run_pins_to_the_cpu_and_its_pid_is_the_program(lab: Lab) -> None:
    cpu = max(os.sched_getaffinity(0))
    host, free = lab.add_host("pinned", cpu=cpu), lab.add_host("free")
    argv = ["sleep", "60"]
    proc = host.run(argv, text=True)
    wait_for(lambda: running(proc, argv), timeout=10, what="the exec chain to reach sleep")
    assert psutil.Process(proc.pid).cpu_affinity() == [cpu]
    shown = subprocess.run(["taskset", "-p", str(proc.pid)], capture_output=True, text=True)
    assert shown.stdout.split()[-1] == f"{1 << cpu:x}"
    assert netns_of(proc.pid) == netns_inode(host) != netns_of(os.getpid())
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(5) == -signal.SIGKILL
    unpinned = free.run(argv, text=True)
    wait_for(lambda: running(unpinned, argv), timeout=10, what="the exec chain to reach sleep")
    assert set(psutil.Process(unpinned.pid).cpu_affinity()) == os.sched_getaffinity(0)


def test_a_host_with_its_link_down_gets_no_unicast(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    c = lab.add_host("c", subnet_index=1)
    send_until_received(a, b.address, "warm", receive(b, "warm"))  # a knows b's MAC now
    at_b = receive(b, "after")
    b.link_down()
    send(a, b.address, "lost")  # no error at the sender: the link is cut silently
    b.link_up()
    # "after" comes from the other subnet: link_up restored b's route there too.
    assert send_until_received(c, b.address, "after", at_b)[0] == f"after {c.address}"


def test_close_leaves_nothing_and_is_idempotent(netns_available: None) -> None:
    lab = Lab()
    a = lab.add_host("a")
    lab.add_host("c", subnet_index=1)
    proc = a.run(["sleep", "60"], text=True)
    stray = int(a.exec(["sh", "-c", "sleep 61 >/dev/null 2>&1 & echo $!"]).stdout)
    assert len(lab.namespaces) == 4 and set(lab.namespaces) <= set(netns_names())
    lab.close()
    assert proc.returncode == -signal.SIGKILL
    assert gone(stray), "a process the lab did not start itself outlived its namespace"
    assert not [ns for ns in netns_names() if ns.startswith(lab.prefix)]
    assert lab.prefix not in root_links()
    assert not lab.rundir.exists()
    lab.close()
    with pytest.raises(LabError, match="closed"):
        a.run(["true"])


def test_a_failing_body_still_tears_down(netns_available: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        proc = lab.add_host("a").run(["sleep", "60"], text=True)
        raise RuntimeError("boom")
    assert proc.returncode == -signal.SIGKILL
    assert not [ns for ns in netns_names() if ns.startswith(lab.prefix)]


CRASHING_RUN = """
import os, signal, subprocess
from tests.lab.netlab import Lab
lab = Lab()
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
proc = lab.add_host("a").run(["sleep", "60"], **quiet)
lab.add_host("c", subnet_index=1)
print(lab.prefix, proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_cleanup_stale_removes_a_crashed_run_and_spares_a_live_lab(lab: Lab) -> None:
    lab.add_host("live")
    crashed = subprocess.run([sys.executable, "-c", CRASHING_RUN], capture_output=True,
                             text=True, env=python_env(), timeout=30)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    prefix, pid = crashed.stdout.split()
    assert [ns for ns in netns_names() if ns.startswith(prefix)]
    cleaned = cleanup_stale()
    assert prefix in cleaned and lab.prefix not in cleaned
    assert not [ns for ns in netns_names() if ns.startswith(prefix)]
    assert gone(int(pid))
    assert not (Path(tempfile.gettempdir()) / prefix).exists()
    assert set(lab.namespaces) <= set(netns_names()) and lab.rundir.exists()


def test_vestad_in_a_host_answers_the_cli_from_the_root_namespace(lab: Lab) -> None:
    host = lab.add_host("alpha", subnet_index=1, cpu=max(os.sched_getaffinity(0)))
    daemon = start_vestad(host, "alpha", KEY, "-bind", host.address, "-advertise", host.address)
    node = daemon.status()["node"]
    assert node["name"] == "alpha"
    assert node["cores"] == 1
    assert netns_of(daemon.proc.pid) == netns_inode(host)
    assert psutil.Process(daemon.proc.pid).cmdline()[1:3] == ["-m", "vesta.apps.vestad"]
