"""The daemon's life: start the actors in dependency order, serve, stop them in reverse order.

The main thread owns the signals: SIGINT and SIGTERM only set an event. It then watches the actors;
if one dies, the daemon stops rather than run deaf. Stopping takes no new work, gives running local
jobs up to :data:`SHUTDOWN_GRACE` seconds, cancels the rest, stops every actor (each with a
timeout), removes the control socket, and exits 0. A second signal skips the wait.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pykka

from vesta import __version__
from vesta.actors.autopilot import Autopilot
from vesta.actors.base import tell_quietly
from vesta.actors.control import ClientOutbox, Control, ControlSocketError, open_control_socket
from vesta.actors.discovery import Discovery, open_discovery_socket
from vesta.actors.executor import Executor
from vesta.actors.ledger import Ledger, ledger_path
from vesta.actors.links import Links
from vesta.actors.transport import Transport, open_peer_listener
from vesta.counters import Counters
from vesta.doctor import daemon_facts
from vesta.identity import IdentityError, load_or_create
from vesta.messages import CancelAll, CountRunning, Drain, Serve
from vesta.sampler import Sampler
from vesta.statefiles import StateFileError, next_boot
from vesta.sysstat import Sysstat, primary_ipv4
from vesta.transport.crypto import FederationKeys
from vesta.transport.loop import IoLoop
from vesta.workers.supervisor import open_job_space, servers_cpu_seconds, stop_job_servers

logger = logging.getLogger("vesta.daemon")

#: Seconds local jobs get to finish when the daemon is asked to stop.
SHUTDOWN_GRACE = 10.0
#: Seconds each actor gets to stop.
ACTOR_STOP_TIMEOUT = 5.0
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s vestad %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(config: Any) -> int:
    """Run a daemon with a validated configuration until a signal stops it."""
    setup_logging(config.log_level)
    try:  # first: a daemon already serving this node must not see its files touched
        listener = open_control_socket(config.socket)
    except (ControlSocketError, OSError) as exc:
        return _cannot_start("socket", exc)
    try:
        identity = load_or_create(config.state_dir, config.name)
    except (IdentityError, StateFileError, OSError, ValueError) as exc:
        listener.close()
        Path(config.socket).unlink(missing_ok=True)
        return _cannot_start("state_dir", exc)
    try:
        peer_listener = open_peer_listener(config.bind, config.port)
    except OSError as exc:
        listener.close()
        Path(config.socket).unlink(missing_ok=True)
        return _cannot_start("port", exc)
    try:
        beacons = open_discovery_socket(config.dport)
        boot = next_boot(config.state_dir, config.name)
    except (OSError, StateFileError) as exc:
        listener.close()
        peer_listener.close()
        Path(config.socket).unlink(missing_ok=True)
        return _cannot_start("dport", exc)

    stop = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            hurry.set()
        else:
            stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # before the Executor, whose supervisor puts its job processes there; it also cleans what a
    # daemon of this node killed with kill -9 left behind
    space = open_job_space(config.name)
    counters = Counters()
    links = Links()
    started: list[pykka.ActorRef[Any]] = []
    code = EXIT_FAILED
    loop = IoLoop()
    loop.start()
    links.clients = ClientOutbox(loop, links)
    sysstat = Sysstat()
    address = config.advertise or config.bind or primary_ipv4() or "127.0.0.1"
    sampler = Sampler(sysstat, config, identity.fingerprint, address,
                      config.advertise_spare_ms / 1000,
                      own_cpu=lambda: time.process_time() + servers_cpu_seconds())
    try:
        keys = FederationKeys.derive(config.key)  # stretched once: about 0.1 s
        node = sampler.sample()
        links.executor = Executor.start(counters, links, sorted(sysstat.cpus),
                                        config.max_borrow_ratio, config.goodwill_core_s,
                                        config.spill_cpu_pct)
        started.append(links.executor)
        links.executor.tell(node)
        supervisor = links.executor.proxy().supervisor.get()
        supervisor.on_lend = sampler.lending_began
        sampler.lent = supervisor  # what is lent, and its CPU
        links.autopilot = Autopilot.start(counters, links, config, node, len(sysstat.cpus))
        started.append(links.autopilot)
        links.ledger = Ledger.start(counters, links, ledger_path(config.state_dir, config.name))
        started.append(links.ledger)
        links.transport = Transport.start(counters, links, loop, peer_listener, keys, identity)
        started.append(links.transport)
        facts = daemon_facts(config, identity.fingerprint, address,
                             peer_listener.getsockname()[:2], sys.argv)
        links.discovery = Discovery.start(counters, links, loop, beacons, keys, identity, config,
                                          boot, node, facts=facts)
        started.append(links.discovery)
        sampler.targets = [partial(tell_quietly, ref) for ref in
                           (links.autopilot, links.discovery, links.executor)]
        sampler.start()
        links.control = Control.start(counters, links, loop, listener, config.socket)
        started.append(links.control)
        links.control.tell(Serve())
        logger.info("vestad %s: node %s (%s), %d cores, fingerprint %s, peers on TCP %d, "
                    "beacons on UDP %d, exec for peers: %s", __version__, config.name, address,
                    len(sysstat.cpus), identity.fingerprint, config.port, config.dport,
                    _exec_policy(config))
        if config.allow_exec and os.geteuid() == 0:
            logger.warning("running as root with allow_exec: commands run for peers run as root "
                           "too; a dedicated unprivileged user is safer")
        code = _serve(stop, started)
        _shut_down(links, hurry)
    finally:
        sampler.stop()
        for ref in reversed(started):
            _stop_actor(ref)
        pykka.ActorRegistry.stop_all(timeout=ACTOR_STOP_TIMEOUT)
        loop.stop()
        stop_job_servers()
        space.close()
        listener.close()
        peer_listener.close()
        beacons.close()
        if links.__dict__.get("control") is None:  # Control, which removes it, never started
            Path(config.socket).unlink(missing_ok=True)
    logger.info("stopped")
    return code


def _cannot_start(field: str, exc: BaseException) -> int:
    """Say why the daemon cannot start, naming the setting to change; exit status 2."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    print(f"vestad: {field}: {reason}{where}", file=sys.stderr)
    return EXIT_CONFIG


def _serve(stop: threading.Event, actors: list[pykka.ActorRef[Any]]) -> int:
    """Wait for a signal; return early, failed, if an actor died."""
    while not stop.wait(0.5):
        dead = [ref for ref in actors if not ref.is_alive()]
        if dead:
            logger.error("%s stopped unexpectedly; shutting down", dead[0])
            return EXIT_FAILED
    logger.info("stopping: no new work; running jobs get up to %g s (signal again to stop now)",
                SHUTDOWN_GRACE)
    return EXIT_OK


def _shut_down(links: Links, hurry: threading.Event) -> None:
    # new submissions are refused by the autopilot; peers hear that this node leaves, and the
    # work it ran for them is handed back at once
    for ref in (links.autopilot, links.transport, links.executor):
        tell_quietly(ref, Drain())
    deadline = time.monotonic() + SHUTDOWN_GRACE
    while time.monotonic() < deadline and not hurry.is_set():
        if _wait_idle(links, min(deadline, time.monotonic() + 0.2)):
            return
    logger.info("cancelling the jobs still running")
    tell_quietly(links.autopilot, CancelAll("cancelled: the daemon is stopping"))
    _wait_idle(links, time.monotonic() + ACTOR_STOP_TIMEOUT)


def _wait_idle(links: Links, deadline: float) -> bool:
    """Wait until no local task runs; False at the deadline."""
    while time.monotonic() < deadline:
        try:
            if not links.autopilot.ask(CountRunning(), timeout=1.0):
                return True
        except (pykka.ActorDeadError, pykka.Timeout):
            return False
        time.sleep(0.05)
    return False


def _exec_policy(config: Any) -> str:
    if not config.allow_exec:
        return "off"
    return "only " + ", ".join(config.exec_allowlist) if config.exec_allowlist else "allowed"


def _stop_actor(ref: pykka.ActorRef[Any]) -> None:
    try:
        ref.stop(timeout=ACTOR_STOP_TIMEOUT)
    except pykka.Timeout:
        logger.error("%s did not stop in %g s", ref, ACTOR_STOP_TIMEOUT)
