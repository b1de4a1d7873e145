"""Every ``vesta`` command against a real vestad: output, JSON keys and exit statuses."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

from tests.conftest import Daemon, python_env, run_cli, sigint_as_in_a_shell, wait_for
from vesta.workers.jobs import job_digest, unit_result

pytestmark = pytest.mark.timeout(90)

PEER_KEYS = {"name", "address", "fingerprint", "cpu_pct", "mem_available_mb", "power",
             "last_seen_s", "willingness", "version"}


def as_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.stdout.count("\n") == 1, f"not one JSON document: {result.stdout!r}"
    return json.loads(result.stdout)


class Terminal:
    """``vesta ARGS`` with its stderr on a pseudo-terminal, as a person at a terminal sees it
    (the terminal turns each newline into CR LF); stdout is a pipe."""

    def __init__(self, *args: str, **popen: object) -> None:
        master, slave = pty.openpty()
        self.master = master
        popen.setdefault("preexec_fn", sigint_as_in_a_shell)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vesta.apps.cli", *args], stdout=subprocess.PIPE,
            stderr=slave, stdin=subprocess.DEVNULL, env=python_env(), text=True,
            **popen,  # type: ignore[call-overload]
        )
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the CLI closed its end
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def finish(self, timeout: float = 20) -> tuple[int, str, str]:
        """Wait for the CLI to end: its status, its stdout and what the terminal showed."""
        out, _ = self.proc.communicate(timeout=timeout)
        self.reader.join(timeout=10)
        return self.proc.returncode, out, self.text

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(timeout=10)
        os.close(self.master)


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


def test_why_explains_the_last_job_or_the_one_named(daemon: Daemon) -> None:
    fresh = daemon.cli("why")
    assert fresh.returncode != 0 and "no job was submitted to this node" in fresh.stderr
    first = as_json(daemon.cli("--json", "cpu", "1"))["job_id"]
    daemon.cli("exec", "--", "true")

    last = as_json(daemon.cli("--json", "why"))
    assert last["kind"] == "exec" and last["result"]["ok"]
    (node,) = last["nodes"]
    assert set(node) >= {"node", "score", "decision", "reason", "units"}
    assert (node["node"], node["decision"], node["units"]) == (daemon.name, "chosen", 1)
    named = daemon.cli("why", first)
    assert named.returncode == 0, named.stderr
    assert named.stdout.startswith(f"job {first} (cpu): done in ")
    assert f"{daemon.name}  " in named.stdout and "chosen" in named.stdout
    unknown = daemon.cli("why", "nope-000000")
    assert unknown.returncode != 0 and "no job nope-000000 is known here" in unknown.stderr


def test_doctor_checks_the_daemon_and_says_what_to_fix(daemon: Daemon) -> None:
    result = daemon.cli("--json", "doctor")
    assert result.returncode == 1, result.stderr  # the test daemons listen on loopback only
    found = {c["name"]: c for c in as_json(result)["checks"]}
    assert {"daemon", "interfaces", "ports", "address", "others", "fingerprint", "seeds",
            "clock", "key", "files"} <= found.keys()
    assert all(set(c) == {"name", "ok", "detail", "fix"} for c in found.values())
    assert found["daemon"]["ok"] and daemon.name in found["daemon"]["detail"]
    assert not found["address"]["ok"] and "loopback" in found["address"]["detail"]
    # bound to loopback, without seeds: its beacons reach nobody either
    assert [name for name, c in found.items() if not c["ok"]] == ["interfaces", "address"]
    people = daemon.cli("doctor")
    assert people.returncode == 1
    assert any(line.startswith("FAIL  address") for line in people.stdout.splitlines())
    assert "fix: give -advertise" in people.stdout


def test_doctor_without_a_daemon_still_checks_this_machine(tmp_path: Path) -> None:
    result = run_cli("--socket", str(tmp_path / "none.sock"), "--json", "doctor")
    assert result.returncode == 1 and not result.stderr
    found = {c["name"]: c for c in as_json(result)["checks"]}
    assert not found["daemon"]["ok"] and "not running" in found["daemon"]["detail"]
    assert {"interfaces", "ports", "address", "files"} <= found.keys()


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
    shown = as_json(daemon.cli("--json", "status"))["node"]["stress"]
    assert shown["cores"] == 1 and 0 < shown["seconds_left"] <= 30
    assert "1 core(s) pinned" in daemon.cli("status").stdout
    stopped = daemon.cli("stop-stress")
    assert stopped.returncode == 0 and "stopped 1" in stopped.stdout
    wait_for(lambda: all(not p.is_running() or p.status() == "zombie" for p in spinning),
             what="the stress process to end")
    wait_for(lambda: as_json(daemon.cli("--json", "status"))["node"]["stress"] is None,
             what="status to show no stress")
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
    # the time it waited is said apart from the time it ran
    took = re.search(r"ran on \S+ in ([\d.]+) s \(queued ([\d.]+) s\)", queued.stderr)
    assert took, queued.stderr
    assert float(took[1]) < 1.0 and float(took[2]) > 0


def test_ctrl_c_cancels_the_job_everywhere(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, "exec", "--",
         "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=python_env(), preexec_fn=sigint_as_in_a_shell,
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


def test_streamed_output_arrives_whole_at_any_size(daemon: Daemon) -> None:
    """More than any cap the one-node release had (16 MiB), through a pipe: every byte."""
    size = 40_000_000
    result = subprocess.run(
        f"{sys.executable} -m vesta.apps.cli --socket {daemon.socket} exec -- "
        f"head -c {size} /dev/zero | wc -c", shell=True, capture_output=True, text=True,
        env=python_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == size


def test_json_keeps_at_most_16_mib_per_stream_and_says_so(daemon: Daemon) -> None:
    result = daemon.cli("--json", "exec", "--", "head", "-c", str(17 << 20), "/dev/zero")
    assert result.returncode == 0
    doc = as_json(result)
    assert len(doc["stdout"]) == 16 << 20
    assert doc["truncated"] == ["stdout"]
    assert "--json keeps 16 MiB of each stream: stdout cut there" in result.stderr


@pytest.mark.parametrize(
    ("args", "status"),
    [(["cpu", "2000"], 1), (["mem", "16", "60000"], 1), (["exec", "--", "sleep", "60"], 125)],
)
def test_a_daemon_that_dies_mid_job_fails_the_job(daemon: Daemon, args: list[str],
                                                  status: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vesta.apps.cli", "--socket", daemon.socket, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())
    wait_for(lambda: [j for j in as_json(daemon.cli("--json", "status"))["jobs"]
                      if j["state"] == "running"], what="the job to run")
    daemon.proc.kill()
    daemon.proc.wait(10)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == status, err  # the job failed: not "no daemon to talk to" (3)
    assert "went away mid-job" in err and daemon.socket in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_cancel_the_job_as_ctrl_c_does(daemon: Daemon,
                                                          sig: signal.Signals) -> None:
    with Terminal("--socket", daemon.socket, "cpu", "2000") as term:
        wait_for(lambda: "units" in term.text, what="the progress line")
        term.proc.send_signal(sig)
        code, out, err = term.finish()
    assert code == 128 + sig
    assert f"{sig.name}: cancelling" in err and "cancelled job" in err
    assert "\r\x1b[K" in err[err.rindex("units"):]  # the progress line was finished
    assert out == ""
    # the CLI waited to hear the job end: it is gone already
    assert as_json(daemon.cli("--json", "status"))["jobs"] == []


def test_an_ignored_sighup_stays_ignored(daemon: Daemon) -> None:
    with Terminal("--socket", daemon.socket, "mem", "16", "1500",
                  preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as term:
        wait_for(lambda: "MiB on" in term.text, what="the hold to start")
        term.proc.send_signal(signal.SIGHUP)  # as under nohup: the job goes on
        code, out, _ = term.finish()
    assert code == 0 and "done in" in out


def test_exec_on_a_terminal_says_where_it_runs_as_it_starts(daemon: Daemon) -> None:
    with Terminal("--socket", daemon.socket, "exec", "--", "sleep", "60") as term:
        wait_for(lambda: f"vesta: running on {daemon.name}\r\n" in term.text,
                 what="the CLI to say where the command runs")
        assert term.proc.poll() is None  # said while it runs, not when it ends
        term.proc.send_signal(signal.SIGINT)
        code, _, _ = term.finish()
    assert code == 130


def test_mem_on_a_terminal_shows_the_hold(daemon: Daemon) -> None:
    with Terminal("--socket", daemon.socket, "mem", "16", "1500") as term:
        wait_for(lambda: "of 1.5 s" in term.text, what="the progress line of the hold")
        code, out, err = term.finish()
    assert code == 0, err
    assert f"16 MiB on {daemon.name}" in err
    assert err.endswith("\r\x1b[K")  # the line was cleared for the summary
    assert out.startswith("mem 16 MiB for 1500 ms done in ")


def test_without_a_terminal_only_exec_names_its_node_on_stderr(daemon: Daemon) -> None:
    ran = daemon.cli("exec", "--", "true")
    assert ran.returncode == 0
    assert re.fullmatch(rf"vesta: ran on {daemon.name} in [\d.]+ s, exit status 0\n", ran.stderr)
    held = daemon.cli("mem", "16", "300")
    assert held.returncode == 0 and held.stderr == ""
    assert "done in" in held.stdout


def test_stress_says_when_fewer_cores_are_here_than_asked(daemon: Daemon) -> None:
    cores = len(os.sched_getaffinity(0))
    result = daemon.cli("stress", str(cores + 3), "30")
    assert result.returncode == 0, result.stderr
    plural = "s" * (cores != 1)
    assert f"vesta: only {cores} core{plural} here: pinning {cores}\n" == result.stderr
    assert f"stressing {cores} core{plural} for 30 s" in result.stdout
    assert daemon.cli("stop-stress").returncode == 0
    asked = daemon.cli("stress", "1", "30")
    assert asked.returncode == 0 and asked.stderr == ""
    assert daemon.cli("stop-stress").returncode == 0


def test_keygen_prints_a_key_for_key_file(daemon_factory: Callable[..., Daemon],
                                          tmp_path: Path) -> None:
    nowhere = python_env(VESTA_SOCKET=str(tmp_path / "none.sock"))  # it needs no daemon
    first, second = run_cli("keygen", env=nowhere), run_cli("keygen", env=nowhere)
    assert first.returncode == 0 and first.stderr == ""
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", first.stdout)  # 256 bits, nothing else
    assert second.stdout != first.stdout
    key_file = tmp_path / "fed.key"
    key_file.write_text(first.stdout)  # as `vesta keygen > fed.key` does
    key_file.chmod(0o600)
    node = daemon_factory("-key-file", str(key_file))
    assert node.cli("--json", "status").returncode == 0
    helped = run_cli("--help")
    assert re.search(r"keygen .*-key-file", helped.stdout)


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
    # not a /tmp/vestad-*.sock name: a CLI of another test that lists the sockets there would
    # connect to it, and the planted server takes one connection only
    path = f"/tmp/planted-test-{secrets.token_hex(3)}.sock"
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
