"""vestad as a program: flags, keys, configuration errors, files, signals and bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import KEY, Daemon, python_env, run_cli, wait_for
from vesta.client import Client, VestaError
from vesta.messages import ErrorReply, Scope, StatusReply, StatusRequest, encode
from vesta.transport.framing import CONTROL_MAX_FRAME, HEADER, frame, recv_frame

pytestmark = pytest.mark.timeout(90)


def restart(d: Daemon) -> Daemon:
    """The same node again: same name, state directory and socket."""
    proc = subprocess.Popen([sys.executable, "-m", "vesta.apps.vestad", *d.args],
                            stdout=d.log.open("a"), stderr=subprocess.STDOUT, env=python_env(),
                            stdin=subprocess.DEVNULL, text=True)
    again = Daemon(d.name, d.socket, d.state_dir, proc, d.log, d.args)
    try:
        wait_for(lambda: proc.poll() is not None or (os.path.exists(d.socket)
                                                     and still_serves(again)),
                 timeout=20, what="the daemon to come back")
        assert proc.poll() is None, d.log_text()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return again


def vestad(*args: str, env: dict[str, str] | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vesta.apps.vestad", *args],
                          capture_output=True, text=True, env=env or python_env(),
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("dash", ["-", "--"])
def test_both_flag_spellings(daemon_factory: Callable[..., Daemon], dash: str) -> None:
    d = daemon_factory(f"{dash}cpu-offer-pct", "50", f"{dash}advertise-spare", "500",
                       f"{dash}allow-exec", f"{dash}power", "battery")
    node = json.loads(d.cli("--json", "status").stdout)["node"]
    assert node["allow_exec"] is True
    assert node["power"] == "battery" and node["willingness"] == 0.35


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["-name", "x", "-key", "short"], {}, "at least 16"),
        (["-name", "x"], {}, "federation key is needed"),
        (["-name", "x"], {"VESTA_KEY": "tooshort"}, "VESTA_KEY"),
        (["-name", "x", "-key", KEY, "-port", "70000"], {}, "port"),
        (["-name", "x", "-key", KEY, "-power", "wind"], {}, "power"),
        (["-name", "x", "-key", KEY, "-bogus"], {}, "unrecognized"),
        (["-name", "!!!", "-key", KEY], {}, "name"),
    ],
)
def test_bad_start_exits_2_with_a_clear_message(args: list[str], env: dict[str, str],
                                                message: str) -> None:
    result = vestad(*args, env=python_env(**env))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"cpu_offer_pct": 150}', "cpu_offer_pct"),
        ('{"cpu_offer_pct": "lots"}', "cpu_offer_pct"),
        ('{"allow_exec": "yes"}', "allow_exec"),
        ('{"exec_allowlist": "make"}', "exec_allowlist"),
        ('{"no_such_field": 1}', "no_such_field"),
        ('{"battery_min_pct": -1}', "battery_min_pct"),
        ("[1, 2]", "config"),
        ("{not json", "config"),
    ],
)
def test_bad_config_file_names_the_field(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "node.json"
    path.write_text(content)
    result = vestad("-name", "x", "-key", KEY, "-config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"vestad: {field}:"), result.stderr


def test_flags_override_the_config_file(daemon_factory: Callable[..., Daemon],
                                        tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"allow_exec": True, "cpu_offer_pct": 10, "power": "solar"}))
    d = daemon_factory("-config", str(path), "-power", "grid")
    node = json.loads(d.cli("--json", "status").stdout)["node"]
    assert node["allow_exec"] is True and node["power"] == "grid"


def test_example_config_is_accepted(daemon_factory: Callable[..., Daemon]) -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.json"
    d = daemon_factory("-config", str(example))
    assert d.cli("status").returncode == 0


def test_key_from_file_and_environment(daemon_factory: Callable[..., Daemon],
                                       tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    from_file = daemon_factory("-key-file", str(key_file))
    assert from_file.cli("status").returncode == 0
    assert KEY not in " ".join(from_file.args)
    from_env = daemon_factory("-key-file", "", env=python_env(VESTA_KEY=KEY))
    assert from_env.cli("status").returncode == 0


def test_name_is_sanitized(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(name="my laptop/ä")
    assert json.loads(d.cli("--json", "status").stdout)["node"]["name"] == "my-laptop"


def test_files_and_modes(daemon: Daemon) -> None:
    identity = daemon.state_dir / f"vestad-identity-{daemon.name}.json"
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    fingerprint = json.loads(identity.read_text())["fingerprint"]
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket)
    again = restart(daemon)
    try:
        node = json.loads(again.cli("--json", "status").stdout)["node"]
        assert node["fingerprint"] == fingerprint
    finally:
        assert again.stop() == 0


def test_a_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    result = vestad("-name", "other", "-key", KEY, "-socket", daemon.socket,
                    "-state-dir", str(tmp_path / "other"))
    assert result.returncode == 2
    assert "vestad: socket: another vestad is already serving" in result.stderr
    assert daemon.cli("status").returncode == 0


def test_a_leftover_socket_is_replaced(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    d.stop(signal.SIGKILL)
    for child in d.descendants():
        child.kill()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if not os.path.exists(d.socket):
        leftover.bind(d.socket)
    leftover.close()
    again = restart(d)
    try:
        assert again.cli("status").returncode == 0
    finally:
        assert again.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_no_orphans(daemon: Daemon, sig: int) -> None:
    daemon.cli("stress", "0", "60")
    wait_for(lambda: daemon.descendants(), what="job processes")
    children = daemon.descendants()
    assert daemon.stop(sig) == 0
    assert not os.path.exists(daemon.socket)
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in children),
             what="every child to end")


def test_running_job_gets_its_result_before_the_daemon_stops(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, "--json", "exec",
         "--", "sh", "-c", "sleep 1; echo finished"], stdout=subprocess.PIPE, text=True,
        env=python_env())
    wait_for(lambda: any(p.name() == "sleep" for p in daemon.descendants()),
             what="the job to start")
    daemon.proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert json.loads(out)["stdout"] == "finished\n"
    assert daemon.proc.wait(20) == 0


def test_a_job_past_the_grace_period_is_cancelled(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, "exec", "--",
         "sleep", "60"], stderr=subprocess.PIPE, text=True, env=python_env())
    wait_for(lambda: any(p.name() == "sleep" for p in daemon.descendants()),
             what="the job to start")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert 9 < time.monotonic() - started < 20
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 125 and "stopping" in err  # exec that could not finish


# -- bad input on the control socket ---------------------------------------------------------------


def raw(daemon: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(daemon.socket)
    return s


def still_serves(daemon: Daemon) -> bool:
    try:
        with Client(daemon.socket) as client:
            return isinstance(client.status(), dict)
    except VestaError:
        return False


def bad_requests(daemon: Daemon) -> int:
    with Client(daemon.socket) as client:
        return client.status()["counters"]["bad_control_requests"]


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"garbage!", encode(StatusReply({})), b"\x92\xa6CpuJob\xa1x",
     b"\x91\xadStatusRequest\xc7\x01\x09x"],
)
def test_garbage_in_a_frame_gets_an_error_and_the_connection_stays(daemon: Daemon,
                                                                   payload: bytes) -> None:
    before = bad_requests(daemon)
    with raw(daemon) as s:
        s.sendall(frame(payload))
        from vesta.messages import decode

        reply = decode(recv_frame(s, CONTROL_MAX_FRAME), Scope.CLIENT)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
        s.sendall(frame(encode(StatusRequest())))
        assert isinstance(decode(recv_frame(s, CONTROL_MAX_FRAME), Scope.CLIENT), StatusReply)
    assert bad_requests(daemon) == before + 1


def test_an_oversized_frame_is_refused_and_closed(daemon: Daemon) -> None:
    with raw(daemon) as s:
        s.sendall(HEADER.pack(CONTROL_MAX_FRAME + 1) + b"x" * 100)
        from vesta.messages import decode

        reply = decode(recv_frame(s, CONTROL_MAX_FRAME), Scope.CLIENT)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_frame"
        assert s.recv(10) == b""
    assert still_serves(daemon)


def test_truncated_frames_and_random_bytes_never_disturb_the_daemon(daemon: Daemon) -> None:
    for junk in (HEADER.pack(100) + b"half", os.urandom(5000), b"\x00\x00"):
        with raw(daemon) as s:
            s.sendall(junk)
    assert still_serves(daemon)
    assert daemon.proc.poll() is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused(daemon: Daemon) -> None:
    os.chmod(daemon.socket, 0o666)
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        f"s.connect({daemon.socket!r})\n"
        "data = b''\n"
        "while True:\n"
        "    chunk = s.recv(4096)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "sys.stdout.write(data.hex())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=20, env=python_env())
    from vesta.messages import decode

    reply = decode(bytes.fromhex(result.stdout)[HEADER.size:], Scope.CLIENT)
    assert isinstance(reply, ErrorReply) and reply.code == "forbidden"
    with Client(daemon.socket) as client:
        assert client.status()["counters"]["refused_control_clients"] == 1


def test_cli_usage_error_is_2_even_without_a_daemon() -> None:
    assert run_cli("frobnicate").returncode == 2


def test_nothing_outlives_the_daemon_even_for_a_moment(daemon: Daemon) -> None:
    assert daemon.cli("cpu", "1").returncode == 0  # starts the fork server and its tracker
    children = daemon.descendants()
    assert len(children) >= 2
    assert daemon.stop() == 0
    alive = [p for p in children if p.is_running() and p.status() != "zombie"]
    assert not alive, f"still running right after vestad exited: {alive}"


def test_an_unusable_state_dir_is_a_clear_start_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = vestad("-name", "x", "-key", KEY, "-state-dir", str(blocker / "state"),
                    "-socket", str(tmp_path / "x.sock"))
    assert result.returncode == 2
    assert "vestad: state_dir:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.sock").exists()


def test_an_identity_readable_by_others_is_closed_again(daemon: Daemon) -> None:
    identity = daemon.state_dir / f"vestad-identity-{daemon.name}.json"
    assert daemon.stop() == 0
    identity.chmod(0o644)
    again = restart(daemon)
    try:
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        assert "readable by others" in again.log_text()
    finally:
        assert again.stop() == 0
