"""Every ``vesta`` command against a real vestad: output, JSON keys and exit statuses."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, python_env, run_cli, wait_for
from vesta.workers.jobs import job_digest, unit_result

pytestmark = pytest.mark.timeout(90)

PEER_KEYS = {"name", "address", "fingerprint", "cpu_pct", "mem_available_mb", "power",
             "last_seen_s", "willingness", "version"}


def as_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.stdout.count("\n") == 1, f"not one JSON document: {result.stdout!r}"
    return json.loads(result.stdout)


def looking_in(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``vesta ARGS`` looking for control sockets in ``directory`` instead of /tmp, where other
    daemons of this machine may run."""
    program = ("import sys\n"
               "from vesta import client\n"
               "client.SOCKET_GLOB = sys.argv[1] + '/vestad-*.sock'\n"
               "from vesta.apps.cli import main\n"
               "sys.exit(main(sys.argv[2:]))\n")
    return subprocess.run([sys.executable, "-c", program, str(directory), *args],
                          capture_output=True, text=True, env=python_env(), timeout=30,
                          stdin=subprocess.DEVNULL)


def test_status_json_has_the_contract_keys(daemon: Daemon) -> None:
    result = daemon.cli("--json", "status")
    assert result.returncode == 0, result.stderr
    doc = as_json(result)
    assert {"node", "peers", "ledger", "jobs", "counters"} <= doc.keys()
    assert doc["node"].keys() >= PEER_KEYS
    assert doc["node"]["name"] == daemon.name
    assert doc["node"]["cores"] == len(os.sched_getaffinity(0))
    assert doc["node"]["power"] in {"grid", "solar", "battery", "empty"}
    assert {"dropped_beacons", "dropped_frames", "refused_jobs"} <= doc["counters"].keys()
    identity = json.loads((daemon.state_dir / f"vestad-identity-{daemon.name}.json").read_text())
    assert doc["node"]["fingerprint"] == identity["fingerprint"]


def test_status_for_people_is_short_and_names_the_node(daemon: Daemon) -> None:
    result = daemon.cli("status")
    assert result.returncode == 0, result.stderr
    assert daemon.name in result.stdout
    assert len(result.stdout.splitlines()) < 15


def test_peers_alone_lists_none(daemon: Daemon) -> None:
    result = daemon.cli("--json", "peers")
    assert result.returncode == 0
    assert as_json(result) == {"peers": []}
    people = daemon.cli("peers")
    assert people.returncode == 0 and "no peers" in people.stdout


def test_cpu_digest_matches_the_definition(daemon: Daemon) -> None:
    result = daemon.cli("--json", "cpu", "2", "--seed", "5")
    assert result.returncode == 0, result.stderr
    doc = as_json(result)
    expected = job_digest([unit_result(5, i) for i in range(20)])
    assert doc["digest"] == expected
    assert doc["kind"] == "cpu" and doc["retried"] == 0 and doc["job_id"]
    assert doc["placements"] == [{"node": daemon.name, "units": 20,
                                  "seconds": doc["placements"][0]["seconds"]}]
    assert doc["seconds"] > 0


def test_submit_is_the_same_as_the_bare_command(daemon: Daemon) -> None:
    bare = as_json(daemon.cli("--json", "cpu", "1"))
    submitted = as_json(daemon.cli("--json", "submit", "cpu", "1"))
    assert bare["digest"] == submitted["digest"]


def test_cpu_for_people_shows_node_and_digest(daemon: Daemon) -> None:
    result = daemon.cli("cpu", "1")
    assert result.returncode == 0, result.stderr
    assert daemon.name in result.stdout
    assert job_digest([unit_result(0, i) for i in range(10)]) in result.stdout


def test_mem_job(daemon: Daemon) -> None:
    result = daemon.cli("--json", "mem", "32", "100")
    assert result.returncode == 0, result.stderr
    doc = as_json(result)
    assert doc["kind"] == "mem" and doc["mb"] == 32 and doc["seconds"] >= 0.1


def test_mem_beyond_the_machine_is_refused(daemon: Daemon) -> None:
    result = daemon.cli("mem", str(1 << 30), "10")
    assert result.returncode == 1
    assert "not enough memory" in result.stderr


def test_exec_streams_output_and_keeps_the_exit_status(daemon: Daemon) -> None:
    result = daemon.cli("exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert result.returncode == 7
    assert result.stdout == "out\n"
    assert "err" in result.stderr and daemon.name in result.stderr


def test_exec_json(daemon: Daemon) -> None:
    result = daemon.cli("--json", "exec", "--", "sh", "-c", "printf 'caf\\303\\251 \\377'; exit 2")
    assert result.returncode == 2
    doc = as_json(result)
    assert doc["exit_code"] == 2 and doc["kind"] == "exec"
    assert doc["stdout"] == "café \ufffd"
    assert doc["stderr"] == ""
    assert doc["placements"][0]["node"] == daemon.name


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["no-such-command-here"], 127, "not found"),
        (["/etc/hostname"], 126, "not executable"),
        (["--timeout", "0.5", "--", "sleep", "30"], 124, "timed out"),
        (["--gpu", "--", "true"], None, "GPU"),
    ],
)
def test_exec_statuses(daemon: Daemon, argv: list[str], status: int | None,
                       message: str) -> None:
    args = ["exec", *argv] if argv[0].startswith("--") else ["exec", "--", *argv]
    result = daemon.cli(*args)
    if status is None:  # --gpu: 125 where no node has one; runs where this machine has one
        gpu = as_json(daemon.cli("--json", "status"))["node"]["gpu"]
        status = 0 if gpu else 125
    assert result.returncode == status, result.stderr
    if status:
        assert message in result.stderr


def test_exec_dot_slash_piwork_runs_the_installed_program(daemon: Daemon, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "piwork"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m piwork \"$@\"\n")
    shim.chmod(0o755)
    env = python_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    d = daemon
    # the daemon's own PATH decides, so run a second daemon that has the shim on its PATH
    from tests.conftest import start_daemon

    node = start_daemon(tmp_path, env=env)
    try:
        result = node.cli("--json", "exec", "--", "./piwork", "0.1")
        assert result.returncode == 0, result.stderr
        doc = as_json(result)
        assert "samples" in doc["stdout"] and "100,000" in doc["stdout"]
    finally:
        assert node.stop() == 0
    assert d.proc.poll() is None


def test_exec_finds_programs_installed_beside_vestad(daemon_factory: Callable[..., Daemon]) -> None:
    beside = Path(sys.executable).parent / "piwork"
    if not beside.exists():
        pytest.skip(f"piwork is not installed beside {sys.executable}")
    node = daemon_factory(env=python_env(PATH="/usr/bin:/bin"))
    result = node.cli("--json", "exec", "--", "./piwork", "0.1")
    assert result.returncode == 0, result.stderr
    assert "100,000" in as_json(result)["stdout"]


def test_stress_pins_cores_and_stop_stress_ends_it(daemon: Daemon) -> None:
    result = daemon.cli("--json", "stress", "1", "30")
    assert result.returncode == 0, result.stderr
    assert as_json(result) == {"cores": 1, "seconds": 30.0}
    spinning = wait_for(lambda: [p for p in daemon.descendants()
                                 if p.cpu_times().user > 0.2], what="a stress process")
    assert len(spinning) == 1
    stopped = daemon.cli("stop-stress")
    assert stopped.returncode == 0 and "stopped 1" in stopped.stdout
    wait_for(lambda: all(not p.is_running() or p.status() == "zombie" for p in spinning),
             what="the stress process to end")
    again = daemon.cli("stop-stress")
    assert "no stress" in again.stdout


def test_jobs_queue_first_come_first_served(daemon: Daemon) -> None:
    cores = len(os.sched_getaffinity(0))
    env = python_env()
    cmd = [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, "--json"]
    first = subprocess.Popen([*cmd, "exec", "--", "sleep", "1.5"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    blockers = [first] + [
        subprocess.Popen([*cmd, "exec", "--", "sleep", "1.5"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(cores - 1)
    ]
    wait_for(lambda: len(as_json(daemon.cli("--json", "status"))["jobs"]) == cores,
             what="every worker to be busy")
    queued = daemon.cli("exec", "--", "true")
    assert queued.returncode == 0
    assert "queued" in queued.stderr
    for p in blockers:
        assert p.wait(30) == 0


def test_ctrl_c_cancels_the_job_everywhere(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, "exec", "--",
         "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=python_env(),
    )
    wait_for(lambda: any(p.name() == "sleep" for p in daemon.descendants()),
             what="the command to start")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130
    assert "cancelled" in err
    wait_for(lambda: not any(p.name() == "sleep" for p in daemon.descendants()),
             what="the command to be killed")
    assert as_json(daemon.cli("--json", "status"))["jobs"] == []


@pytest.mark.parametrize(
    "args",
    [["cpu"], ["cpu", "x"], ["cpu", "0"], ["mem", "10"], ["bogus"], ["stress", "1", "-3"],
     ["exec", "--timeout", "0", "--", "true"], ["cpu", "1", "--seed", "-1"]],
)
def test_usage_errors_exit_2(daemon: Daemon, args: list[str]) -> None:
    result = daemon.cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip()
    assert "Traceback" not in result.stderr


def test_no_daemon_exits_3_with_a_hint(tmp_path: Path) -> None:
    result = run_cli("--socket", str(tmp_path / "nothing.sock"), "status")
    assert result.returncode == 3
    assert "Is vestad running?" in result.stderr


def test_node_name_picks_the_socket(daemon: Daemon) -> None:
    env = python_env(VESTA_SOCKET=daemon.socket)
    assert run_cli("--json", "status", env=env).returncode == 0
    missing = run_cli("--node", "surely-not-running", "status")
    assert missing.returncode == 3 and "/tmp/vestad-surely-not-running.sock" in missing.stderr


def test_cli_imports_stay_light(daemon: Daemon) -> None:
    probe = (
        "import sys\n"
        "from vesta.apps import cli\n"
        f"code = cli.main(['--socket', {daemon.socket!r}, '--json', 'status'])\n"
        "heavy = sorted(m for m in ('pykka', 'psutil', 'cryptography', 'blessed', "
        "'dataclasses', 'multiprocessing') if m in sys.modules)\n"
        "print(code, heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env=python_env(), timeout=30)
    assert result.stderr.strip().splitlines()[-1] == "0 []"


def test_a_closed_pipe_ends_quietly_and_cancels_the_job(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, "exec", "--",
         "sh", "-c", "while :; do echo y; done"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=python_env())
    assert proc.stdout is not None
    proc.stdout.read(10)
    proc.stdout.close()  # as `| head -c 10` does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 141
    assert b"Traceback" not in err
    wait_for(lambda: as_json(daemon.cli("--json", "status"))["jobs"] == [],
             what="the job to be cancelled")


@pytest.mark.parametrize(
    ("args", "says"),
    [(["frobnicate"], "unknown command 'frobnicate'"),
     (["exec", "ls", "-la"], "put -- before the command"),
     (["exec", "--"], "needs a command")],
)
def test_usage_errors_say_what_is_wrong(args: list[str], says: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Warning" not in result.stderr and "Option(" not in result.stderr


def test_exec_without_a_daemon_is_125(tmp_path: Path) -> None:
    result = run_cli("--socket", str(tmp_path / "none.sock"), "exec", "--", "true")
    assert result.returncode == 125
    assert "Is vestad running?" in result.stderr


def test_node_names_are_cleaned_the_same_way_on_both_sides(
        daemon_factory: Callable[..., Daemon]) -> None:
    node = daemon_factory(name="my laptop", wait=True)
    assert "is used as 'my-laptop'" in node.log_text()
    # the daemon under test listens on its own -socket: the CLI must look for the cleaned name
    result = run_cli("--node", "my laptop", "--json", "status")
    assert result.returncode == 3 and "/tmp/vestad-my-laptop.sock" in result.stderr


def test_truncated_output_is_said(daemon_factory: Callable[..., Daemon]) -> None:
    node = daemon_factory("-exec-output-max-mb", "1")
    result = node.cli("exec", "--", "sh", "-c", "head -c 3000000 /dev/zero")
    assert result.returncode == 0
    assert len(result.stdout) == 1 << 20
    assert "stdout was cut at the node's output limit (exec_output_max_mb)" in result.stderr


def test_a_stale_socket_is_never_picked(daemon_factory: Callable[..., Daemon]) -> None:
    live, dead = daemon_factory(), daemon_factory()
    dead.proc.kill()  # as kill -9 does: its socket stays behind with nothing listening
    dead.proc.wait(10)
    look = Path(tempfile.mkdtemp(prefix="vc-", dir="/tmp"))  # short: a socket path is limited
    try:
        (look / f"vestad-{live.name}.sock").symlink_to(live.socket)
        (look / f"vestad-{dead.name}.sock").symlink_to(dead.socket)
        picked = looking_in(look, "--json", "status")
        assert picked.returncode == 0, picked.stderr
        assert as_json(picked)["node"]["name"] == live.name
        live.proc.kill()
        live.proc.wait(10)
        alone = looking_in(look, "status")
        assert alone.returncode == 3
        for d in (live, dead):
            assert f"{look}/vestad-{d.name}.sock (stale: nothing answers)" in alone.stderr
    finally:
        shutil.rmtree(look, ignore_errors=True)


_PLANTED = """\
import os, socket, sys
path = sys.argv[1]
os.setgid(65534)
os.setuid(65534)  # nobody: another user than the CLI's
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path + ".new")
os.chmod(path + ".new", 0o666)
server.listen(1)
os.rename(path + ".new", path)  # it appears already listening
server.settimeout(20)
conn, _ = server.accept()
conn.settimeout(20)
got = b""
while chunk := conn.recv(4096):
    got += chunk
print("got", len(got))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can listen as another user")
def test_a_socket_planted_by_another_user_is_refused() -> None:
    path = f"/tmp/vestad-test-{secrets.token_hex(3)}.sock"
    planted = subprocess.Popen([sys.executable, "-c", _PLANTED, path], stdout=subprocess.PIPE,
                               text=True, env=python_env())
    try:
        wait_for(lambda: os.path.exists(path), what="the planted socket")
        result = run_cli("--socket", path, "status")
        assert result.returncode == 3
        assert f"refusing {path}: the process behind it runs as uid 65534" in result.stderr
        out, _ = planted.communicate(timeout=20)
        assert out.split() == ["got", "0"]  # not one byte was sent to it
    finally:
        if planted.poll() is None:
            planted.kill()
            planted.wait(10)
        Path(path).unlink(missing_ok=True)
