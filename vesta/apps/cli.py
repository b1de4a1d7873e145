"""vesta: submit work to a vesta federation and see how it is doing.

Usage:
  vesta [options] peers
  vesta [options] status
  vesta [options] [submit] cpu <N> [--seed=<S>]
  vesta [options] [submit] mem <MB> <MS>
  vesta [options] exec [--gpu] [--retry] [--timeout=<SECS>] [--] <cmd>...
  vesta [options] stress <cores> <secs>
  vesta [options] stop-stress
  vesta [options] why [<job_id>]
  vesta [options] doctor
  vesta keygen
  vesta (-h | --help)
  vesta --version

Commands:
  peers        the other nodes this daemon knows
  status       this node, its peers, ledger, jobs and counters
  cpu N        N million SHA-256 iterations, placed where there is room
  mem MB MS    hold MB MiB for MS milliseconds
  exec CMD     run a command where there is room; exits with its status
  stress C S   pin C of the daemon's cores (0 = all) for S seconds, to see work spill
  stop-stress  end a stress early
  why [JOB]    where a job of this node went and why (the last one without JOB)
  doctor       check what usually keeps nodes apart, one line each with a fix
  keygen       print a new random federation key, for vestad -key-file (vesta keygen > fed.key)

Options:
  --node=<NAME>     the daemon of node NAME (else $VESTA_NODE, else the only one running)
  --socket=<PATH>   the daemon on this control socket (else $VESTA_SOCKET)
  --json            print one JSON document and nothing else on stdout
  --seed=<S>        seed of a cpu job [default: 0]
  --timeout=<SECS>  kill the command after SECS seconds (exit status 124)
  --gpu             run only on a node with a GPU
  --retry           if the node running the command goes away, run it again elsewhere
  --debug           show tracebacks on errors
  -h --help         show this help
  --version         show the version

Exit status: 0 done, 1 the job failed (also when its daemon goes away mid-job), 2 usage or
input error, 3 no daemon to talk to; exec exits with the command's own status (124 timed out,
125 could not run it, 126 not executable, 127 not found, 128+N killed by signal N).
Ctrl-C cancels the job everywhere it runs (130); so do SIGTERM and SIGHUP (143, 129).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from docopt import DocoptExit, docopt

from vesta import __version__, exits
from vesta.apps import Interrupted, signals_interrupt
from vesta.client import Client, DaemonUnreachable, UsageError, VestaError, find_socket
from vesta.messages import (
    AnyJob,
    CpuJob,
    ErrorReply,
    ExecJob,
    JobAccepted,
    JobDone,
    JobOutput,
    JobProgress,
    JobStarted,
    MemJob,
    StopStressRequest,
    StressReply,
    StressRequest,
)
from vesta.names import sanitize_name

_USAGE = __doc__ or ""
#: Output of exec kept per stream for the --json document (streamed output is never cut).
JSON_KEEP_BYTES = 16 << 20


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(_USAGE, argv=words, version=f"vesta {__version__}")
    except DocoptExit:  # docopt exits 1 on a usage error; the contract says 2
        print(f"vesta: {_usage_problem(words)}\n\n{_USAGE.split(chr(10) * 2)[1]}",
              file=sys.stderr)
        return exits.USAGE
    debug = bool(args["--debug"])
    command = Command(args)
    try:
        return command.run()
    except VestaError as exc:
        if debug:
            raise
        print(f"vesta: {exc}", file=sys.stderr)
        if isinstance(exc, DaemonUnreachable) and args["exec"]:
            return exits.NOT_RUN  # SPEC: exec exits 125 when vesta could not run the command
        return exc.exit_code
    except KeyboardInterrupt as exc:
        _tell("interrupted")
        return _interrupted_status(exc)
    except BrokenPipeError:
        # the reader went away (`vesta ... | head`): stop quietly, as a shell tool does; the
        # daemon sees the connection close and cancels what is still running
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return exits.BROKEN_PIPE


def _usage_problem(words: list[str]) -> str:
    """One sentence on what is wrong with a command line docopt refused."""
    commands = ("peers", "status", "cpu", "mem", "exec", "stress", "stop-stress", "submit",
                "keygen")
    given = [w for w in words if not w.startswith("-")]
    if "exec" in words and "--" not in words:
        return "put -- before the command: vesta exec -- CMD [ARG...]"
    if "exec" in words and words[-1] == "--":
        return "exec needs a command after --"
    if given and given[0] not in commands and not any(w in given for w in commands):
        return f"unknown command {given[0]!r}"
    return "those arguments do not fit any command"


def _interrupted_status(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 128+N for signal N, as shells report a process ended by a signal."""
    return exits.killed_by(exc.signum) if isinstance(exc, Interrupted) else exits.CANCELLED


def _tell(text: str) -> None:
    """A line for people on stderr; a terminal that hung up (SIGHUP) is no error."""
    with contextlib.suppress(OSError):
        print(f"vesta: {text}", file=sys.stderr, flush=True)


def _int(text: str, what: str, low: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{what} must be a whole number, not {text!r}") from None
    if value < low:
        raise UsageError(f"{what} must be at least {low}, not {value}")
    return value


def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{what} must be a number, not {text!r}") from None
    if not value > 0:
        raise UsageError(f"{what} must be more than 0, not {text}")
    return value


class Command:
    """One invocation of ``vesta``."""

    def __init__(self, args: dict[str, Any], out: TextIO | None = None) -> None:
        self.args = args
        self.json = bool(args["--json"])
        self.out = out or sys.stdout
        self.node: str | None = sanitize_name(args["--node"]) if args["--node"] else None
        self.socket_path: str | None = args["--socket"]

    def run(self) -> int:
        a = self.args
        actions: list[tuple[str, Callable[[], int]]] = [
            ("peers", self.peers), ("status", self.status), ("cpu", self.cpu), ("mem", self.mem),
            ("exec", self.exec), ("stress", self.stress), ("stop-stress", self.stop_stress),
            ("why", self.why), ("doctor", self.doctor), ("keygen", self.keygen),
        ]
        for name, action in actions:
            if a[name]:
                return action()
        raise UsageError("no command given")

    def connect(self, timeout: float | None = 10.0) -> Client:
        return Client(find_socket(self.node, self.socket_path), timeout)

    def emit(self, doc: Any) -> None:
        import json  # only --json needs it: it costs the CLI's start-up time

        self.out.write(json.dumps(doc) + "\n")
        self.out.flush()

    # -- queries -----------------------------------------------------------------------------------

    def peers(self) -> int:
        with self.connect() as client:
            peers = client.peers()
        if self.json:
            self.emit({"peers": peers})
        elif not peers:
            self.out.write("no peers yet: nodes started with the same key on this subnet appear "
                           "within seconds; beyond it, give -seed HOST:7778 (UDP 7778 and TCP "
                           "7777 must be open)\n")
        else:
            self.out.write(format_peers(peers))
        return 0

    def status(self) -> int:
        with self.connect() as client:
            doc = client.status()
        if self.json:
            self.emit(doc)
        else:
            self.out.write(format_status(doc))
        return 0

    def why(self) -> int:
        with self.connect() as client:
            doc = client.why(self.args["<job_id>"] or "")
        if self.json:
            self.emit(doc)
        else:
            self.out.write(format_why(doc))
        return 0

    def doctor(self) -> int:
        """The daemon's view and this machine's, checked; 1 if anything is wrong. Without a
        daemon, what can be checked here still is."""
        from vesta import doctor  # only doctor needs it: it costs the CLI's start-up time

        facts = None
        try:
            with self.connect(timeout=5) as client:
                facts = client.doctor()
        except DaemonUnreachable:
            pass
        local = doctor.local_facts(facts["state_dir"] if facts else doctor.DEFAULT_STATE_DIR)
        found = doctor.checks(facts, local)
        if self.json:
            self.emit({"checks": [c.doc() for c in found]})
        else:
            self.out.write(doctor.format_checks(found))
        return 0 if all(c.ok for c in found) else 1

    # -- jobs --------------------------------------------------------------------------------------

    def cpu(self) -> int:
        n = _int(self.args["<N>"], "N", 1)
        seed = _int(self.args["--seed"], "--seed")
        return self.submit(CpuJob(n, seed))

    def mem(self) -> int:
        return self.submit(MemJob(_int(self.args["<MB>"], "MB", 1), _int(self.args["<MS>"], "MS")))

    def exec(self) -> int:
        timeout = self.args["--timeout"]
        seconds = _float(timeout, "--timeout") if timeout is not None else None
        return self.submit(ExecJob(list(self.args["<cmd>"]), seconds, bool(self.args["--gpu"]),
                                   bool(self.args["--retry"])))

    def submit(self, job: AnyJob) -> int:
        view = JobView(job, self.json, sys.stderr)
        with self.connect() as client, signals_interrupt():
            try:
                for event in client.submit(job, view.tick):
                    view.show(event)
            except KeyboardInterrupt as exc:
                return self.cancel(client, view, exc)
            except DaemonUnreachable:
                if not view.job_id:  # it never took the job: as good as not reached
                    view.clear()
                    raise
                view.lost(client.path)
            except VestaError:
                view.clear()
                raise
            return view.finish(self.out)

    def cancel(self, client: Client, view: JobView, exc: KeyboardInterrupt) -> int:
        """Ctrl-C, SIGTERM or SIGHUP: cancel the job everywhere it runs, and wait briefly to hear
        that it is gone."""
        with contextlib.suppress(OSError):
            view.clear()
        why = signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "interrupted"
        _tell(f"{why}: cancelling…")
        try:
            client.cancel(view.job_id)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                event = client.receive(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(event, JobDone | ErrorReply):
                    break
        except (VestaError, KeyboardInterrupt):
            pass
        _tell(f"cancelled job {view.job_id or '(not started)'}")
        return _interrupted_status(exc)

    # -- stress ------------------------------------------------------------------------------------

    def stress(self) -> int:
        cores = _int(self.args["<cores>"], "CORES")
        seconds = _float(self.args["<secs>"], "SECS")
        with self.connect() as client:
            reply = client.request(StressRequest(cores, seconds))
        assert isinstance(reply, StressReply)
        if 0 < reply.cores < cores:
            _tell(f"only {reply.cores} core{'s' * (reply.cores != 1)} here: "
                  f"pinning {reply.cores}")
        if self.json:
            self.emit({"cores": reply.cores, "seconds": reply.seconds})
        else:
            self.out.write(f"stressing {reply.cores} core{'s' * (reply.cores != 1)} for "
                           f"{reply.seconds:g} s (vesta stop-stress ends it)\n")
        return 0

    def stop_stress(self) -> int:
        with self.connect() as client:
            reply = client.request(StopStressRequest())
        assert isinstance(reply, StressReply)
        if self.json:
            self.emit({"stopped": reply.stopped})
        else:
            self.out.write(f"stopped {reply.stopped} stress process"
                           f"{'es' * (reply.stopped != 1)}\n" if reply.stopped
                           else "no stress was running\n")
        return 0

    # -- keys --------------------------------------------------------------------------------------

    def keygen(self) -> int:
        """A new random federation key: 256 bits as 43 URL-safe characters, alone on stdout."""
        import secrets  # only keygen needs it: it costs the CLI's start-up time

        self.out.write(secrets.token_urlsafe(32) + "\n")
        self.out.flush()
        return 0


class JobView:
    """Shows a job's events: a progress line on a terminal, where exec runs, its output, the
    result. Without a terminal stderr stays quiet but for the line naming the node of an exec."""

    TICK = 0.25  # seconds between redraws of a progress line while no event comes

    def __init__(self, job: AnyJob, as_json: bool, err: TextIO) -> None:
        self.job = job
        self.as_json = as_json
        self.err = err
        self.live = err.isatty() and not as_json
        #: how often the client should hand over a tick: only a progress line needs the clock
        self.tick = self.TICK if self.live and not isinstance(job, ExecJob) else None
        self.job_id = ""
        self.nodes: list[str] = []
        self.stdout: list[bytes] = []
        self.stderr: list[bytes] = []
        self.truncated: list[str] = []
        self.done: JobDone | None = None
        self.started: float | None = None  # when its first part started running
        self.units: tuple[int, int, dict[str, int]] | None = None  # done, total, by node
        self._line = False

    def show(self, event: Any) -> None:
        match event:
            case None:  # a tick: time passed without news
                self.redraw()
            case JobAccepted(job_id=job_id, queued=queued, position=position):
                self.job_id = job_id
                if queued and not self.as_json:
                    self.note(f"queued (position {position}): waiting for a free worker…")
            case JobStarted(node=node):
                self.part_started(node)
            case JobProgress(done=done, total=total, nodes=nodes):
                self.units = (done, total, nodes)
                self.redraw()
            case JobOutput(stream=stream, data=data):
                self.output(stream, data)
            case JobDone():
                self.done = event

    def part_started(self, node: str) -> None:
        if self.started is None:
            self.started = time.monotonic()
        if node in self.nodes:
            return
        self.nodes.append(node)
        if isinstance(self.job, ExecJob) and self.live:
            self.note(f"running on {node}")
        self.redraw()

    def lost(self, path: str) -> None:
        """The daemon went away mid-job: the job failed, and it says so."""
        went = f"the daemon at {path} went away mid-job (job {self.job_id})"
        if isinstance(self.job, ExecJob):
            went += f", so {' '.join(self.job.argv)!r} did not run to its end"
        self.done = JobDone(self.job_id, False, {}, f"{went}; is vestad still running?",
                            exits.not_finished(self.job.kind))

    def output(self, stream: str, data: bytes) -> None:
        if self.as_json:  # kept for the document, up to a cap; the rest is read and dropped
            kept = self.stdout if stream == "stdout" else self.stderr
            room = JSON_KEEP_BYTES - sum(map(len, kept))
            if len(data) > room and stream not in self.truncated:
                self.truncated.append(stream)
            if room > 0:
                kept.append(data[:room])
            return
        self.clear()
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.buffer.write(data)
        target.buffer.flush()

    def note(self, text: str) -> None:
        self.clear()
        self.err.write(f"vesta: {text}\n")
        self.err.flush()

    def redraw(self) -> None:
        if not self.live or self.started is None:
            return
        elapsed = time.monotonic() - self.started
        if isinstance(self.job, MemJob):
            hold = self.job.ms / 1000
            share = min(elapsed / hold, 1.0) if hold else 1.0
            self.draw(share, f"{elapsed:5.1f} of {hold:g} s  {self.job.mb} MiB on "
                             f"{', '.join(self.nodes)}")
        elif self.units is not None:
            done, total, nodes = self.units
            where = ", ".join(f"{n} {u}" for n, u in sorted(nodes.items()))
            self.draw(done / max(total, 1), f"{done}/{total} units  {elapsed:5.1f} s  {where}")

    def draw(self, share: float, text: str) -> None:
        width = 24
        filled = int(width * share)
        self._line = True  # first: Ctrl-C, SIGTERM or SIGHUP may interrupt the write itself
        self.err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {int(100 * share):3d}%  "
                       f"{text}\x1b[K")
        self.err.flush()

    def clear(self) -> None:
        if self._line:
            self.err.write("\r\x1b[K")
            self.err.flush()
            self._line = False

    def finish(self, out: TextIO) -> int:
        self.clear()
        done = self.done
        if done is None:
            raise VestaError("the daemon ended the job without a result")
        if self.as_json:
            import json  # only --json needs it: it costs the CLI's start-up time

            doc = dict(done.result) or {"job_id": done.job_id, "kind": self.job.kind,
                                        "seconds": 0.0, "placements": []}
            if isinstance(self.job, ExecJob):
                doc["stdout"] = b"".join(self.stdout).decode("utf-8", "replace")
                doc["stderr"] = b"".join(self.stderr).decode("utf-8", "replace")
                doc["exit_code"] = done.exit_code
                if self.truncated:
                    doc["truncated"] = self.truncated
                    print(f"vesta: --json keeps {JSON_KEEP_BYTES >> 20} MiB of each stream: "
                          f"{' and '.join(self.truncated)} cut there", file=sys.stderr)
            if not done.ok:
                doc.update(error=done.error, exit_code=done.exit_code)
            out.write(json.dumps(doc) + "\n")
            out.flush()
            if not done.ok and not done.job_id:
                print(f"vesta: {done.error}", file=sys.stderr)
        elif not done.ok:
            failed = done.job_id and not isinstance(self.job, ExecJob)
            print(f"vesta: {_describe(self.job)} failed: {done.error}" if failed
                  else f"vesta: {done.error}", file=sys.stderr)
        else:
            self.summary(done, out)
        return done.exit_code

    def summary(self, done: JobDone, out: TextIO) -> None:
        r = done.result
        where = ", ".join(f"{p['node']} ({p['units']} unit{'s' * (p['units'] != 1)})"
                          for p in r.get("placements", []))
        # "seconds" is the run time; the time spent waiting for a worker is apart
        took = f"{r['seconds']:.2f} s" + _queued(r.get("queued_seconds", 0.0))
        if isinstance(self.job, ExecJob):
            self.err.write(f"vesta: ran on {r.get('node', '?')} in {took}, "
                           f"exit status {done.exit_code}\n")
            return
        out.write(f"{_describe(self.job)} done in {took} on {where}\n")
        if r.get("retried"):
            out.write(f"retried  {r['retried']} units after a failure\n")
        if "digest" in r:
            out.write(f"digest   {r['digest']}\n")
        out.flush()


def _queued(seconds: float) -> str:
    """The "(queued N s)" of a job that waited for a worker; nothing for one that did not."""
    return f" (queued {seconds:.1f} s)" if seconds >= 0.05 else ""


def _describe(job: AnyJob) -> str:
    match job:
        case CpuJob(n=n):
            return f"cpu {n}"
        case MemJob(mb=mb, ms=ms):
            return f"mem {mb} MiB for {ms} ms"
        case ExecJob(argv=argv):
            return " ".join(argv)
    return job.tag


# -- formatting for people -------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )


def format_peers(peers: list[dict[str, Any]]) -> str:
    rows = [["NAME", "ADDRESS", "STATE", "CPU", "CORES", "MEM FREE", "OFFER", "POWER", "SEEN"]]
    notes = []
    for p in peers:
        known = "cpu_pct" in p  # a node refused at the handshake told us little
        rows.append([
            p["name"], p.get("address", ""), p.get("state", "?"),
            f"{p['cpu_pct']:.0f}%" if known else "-", str(p.get("cores", "-")),
            f"{p['mem_available_mb']} MiB" if known else "-",
            f"{p['offer_workers']} w" if known else "-", p.get("power", "-"),
            f"{p.get('last_seen_s', 0.0):.1f} s ago",
        ])
        if p.get("state") in ("incompatible", "leaving") and p.get("reason"):
            notes.append(f"{p['name']}: {p['reason']}")
    return table(rows) + "".join(f"{note}\n" for note in notes)


def format_status(doc: dict[str, Any]) -> str:
    n = doc["node"]
    lines = [
        ["node", f"{n['name']}  {n['address']}  v{n['version']}  {n['fingerprint']}"],
        ["cpu", f"{n['cpu_pct']:.0f}% of {n['cores']} core{'s' * (n['cores'] != 1)}, "
                f"{n['workers_busy']}/{n['workers']} workers busy, {n['queued']} queued"],
        ["memory", f"{n['mem_available_mb']} MiB free of {n['mem_total_mb']} MiB"],
        ["power", f"{n['power']}, lending {n['willingness']:.0%}"
                  + (f", battery {n['battery_pct']:.0f}%" if n.get("battery_pct") is not None
                     else "")],
        ["offer", f"{n['offer_workers']} worker{'s' * (n['offer_workers'] != 1)}, "
                  f"{n['offer_mem_mb']} MiB; exec for peers "
                  + (("only " + ", ".join(n["exec_allowlist"]) if n["exec_allowlist"]
                      else "allowed") if n["allow_exec"] else "off")],
    ]
    if n.get("stress"):
        lines.append(["stress", f"{n['stress']['cores']} core(s) pinned, "
                                f"{n['stress']['seconds_left']:.0f} s left (vesta stop-stress)"])
    if n.get("temps_c"):
        lines.append(["temp", ", ".join(f"{k} {v:.0f}°C" for k, v in n["temps_c"].items())])
    lines.append(["peers", str(len(doc["peers"])) if doc["peers"] else "none yet"])
    text = table(lines)
    if doc["peers"]:
        text += "\n" + format_peers(doc["peers"])
    if doc["ledger"]:
        rows = [["LEDGER", "LENT core-s", "BORROWED core-s", "ITS CAP HERE core-s"]]
        for peer, entry in sorted(doc["ledger"].items(), key=lambda e: e[1]["name"]):
            rows.append([f"{entry['name'] or '?'} ({peer[:8]})", f"{entry['lent']:.1f}",
                         f"{entry['borrowed']:.1f}", f"{entry.get('cap', 0.0):.0f}"])
        text += "\n" + table(rows)
    if doc["jobs"]:
        rows = [["JOB", "KIND", "STATE", "PROGRESS", "NODES", "AGE"]]
        for j in doc["jobs"]:
            rows.append([j["job_id"], j["kind"], j["state"], f"{j['done']}/{j['total']}",
                         ",".join(j["nodes"]) or "-", f"{j['seconds']:.0f} s"])
        text += "\n" + table(rows)
    troubles = {k: v for k, v in doc["counters"].items() if v}
    if troubles:
        text += "\n" + table([[k, str(v)] for k, v in sorted(troubles.items())])
    return text


def format_why(doc: dict[str, Any]) -> str:
    """A job's placement for people: every node's decision and its reason, what each ran, and
    what happened on the way (parts handed out, refusals, pauses, failovers)."""
    result = doc.get("result")
    head = f"job {doc['job_id']} ({doc['kind']})"
    if result is None:
        head += ": still running"
    elif result["ok"]:
        head += f": done in {result['seconds']:.2f} s"
    else:
        head += f": failed after {result['seconds']:.2f} s: {result['error']}"
    if result and result.get("retried"):
        head += f"; {result['retried']} unit(s) run again"
    split = any("chunks" in n for n in doc["nodes"])
    rows = [["NODE", "SCORE", "DECISION", "UNITS"] + (["CHUNKS"] if split else []) + ["WHY"]]
    for n in doc["nodes"]:
        rows.append([n["node"], f"{n['score']:.2f}", n["decision"], str(n.get("units", 0))]
                    + ([str(n.get("chunks", 0))] if split else []) + [n["reason"]])
    text = head + "\n\n" + table(rows)
    if doc["events"]:
        start = doc["at"]
        text += "\n" + table([[f"+{e['at'] - start:.2f} s", e["kind"], e["node"], e["detail"]]
                              for e in doc["events"]])
    return text


if __name__ == "__main__":
    sys.exit(main())
