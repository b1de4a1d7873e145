"""piwork: an example workload that estimates pi by Monte Carlo sampling on every core.

The sampling code lives here rather than in ``piwork.__main__`` on purpose: worker
processes are started with the "spawn" method, which pickles the worker function by its
module name. Under ``python -m piwork`` the ``__main__`` module is not re-imported in the
children, so functions defined there could not be found; ``piwork`` always can.

The public entry point for library use is :func:`estimate`; the command line lives in
``piwork.__main__``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import multiprocessing.resource_tracker
import os
import random
import signal
import socket
import time
from dataclasses import dataclass

__all__ = ["Estimate", "available_cores", "count_hits", "estimate", "split_samples"]


@dataclass(frozen=True)
class Estimate:
    """The outcome of one run: what was computed, how long it took, and where."""

    pi: float
    samples: int
    seconds: float
    cores: int
    host: str


def available_cores() -> int:
    """Return how many CPUs this process may run on.

    This honours the affinity mask (``taskset``, cgroup cpusets) instead of counting the
    whole machine, so a pinned job does not start more workers than it has cores.
    """
    return len(os.sched_getaffinity(0))


def split_samples(total: int, parts: int) -> list[int]:
    """Split ``total`` samples into ``parts`` near-equal shares that add up exactly.

    The first ``total % parts`` shares get one extra sample, so no sample is lost to
    integer division.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    if total < 0:
        raise ValueError(f"total must not be negative, got {total}")
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def _worker_seed(seed: int, index: int) -> str:
    """Derive a worker's seed from the run seed and its index.

    ``random.Random`` no longer accepts tuples, so (seed, index) is encoded as a string,
    which ``random`` hashes with SHA-512: stable across processes and Python runs, unlike
    ``hash()``, and distinct workers get unrelated streams.
    """
    return f"piwork:{seed}:{index}"


def count_hits(samples: int, seed: int | None, index: int) -> int:
    """Draw ``samples`` points in the unit square and count those inside the quarter circle.

    With ``seed`` set, the generator is seeded from (seed, index) so a run is repeatable;
    with ``seed`` None it is seeded from fresh OS randomness. This is the hot loop, so the
    generator's method is bound to a local name and hits are counted with a plain loop.
    """
    rng = random.Random(None if seed is None else _worker_seed(seed, index))
    rand = rng.random
    hits = 0
    for _ in range(samples):
        x = rand()
        y = rand()
        if x * x + y * y < 1.0:
            hits += 1
    return hits


def _ignore_sigint() -> None:
    """Pool initializer: make a worker ignore Ctrl-C, then accept signals again.

    Workers are started with SIGINT blocked (see :func:`estimate`), so a Ctrl-C that
    arrives while a worker is still booting stays pending. Setting SIGINT to ignored
    discards it; only then is the signal unblocked. The parent alone handles Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _terminate(pool: multiprocessing.pool.Pool) -> None:
    """Stop all workers of ``pool`` and wait for them, shielded from a second Ctrl-C.

    An impatient second Ctrl-C must not cut the clean-up short and leave workers running,
    so SIGINT is blocked for this thread until they are gone (and delivered afterwards).
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool.terminate()
        pool.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def estimate(samples: int, seed: int | None = None) -> Estimate:
    """Estimate pi from ``samples`` Monte Carlo samples, one worker process per usable core.

    The samples are split evenly across the workers (never more workers than samples).
    The same ``seed`` on the same number of cores gives the same estimate; a different
    core count changes how samples are split and therefore the result.

    On Ctrl-C the workers are terminated and :class:`KeyboardInterrupt` is re-raised, so
    the caller decides how to report it. ``seconds`` is wall time including the cost of
    starting the workers, since that is what a person running the job waits for.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    cores = min(available_cores(), samples)
    shares = split_samples(samples, cores)
    jobs = [(share, seed, index) for index, share in enumerate(shares)]
    ctx = multiprocessing.get_context("spawn")

    start = time.perf_counter()
    pool = None
    try:
        # Block SIGINT while the workers are created: spawned children inherit the mask,
        # so a Ctrl-C during their start-up cannot raise inside them before
        # _ignore_sigint runs. A Ctrl-C aimed at the parent meanwhile stays pending and
        # is raised here as soon as the mask is restored. The resource tracker is
        # started first because starting it unconditionally *unblocks* SIGINT, which
        # would silently undo the block if it happened inside the Pool constructor.
        multiprocessing.resource_tracker.ensure_running()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            pool = ctx.Pool(processes=cores, initializer=_ignore_sigint)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        hits = sum(pool.starmap(count_hits, jobs, chunksize=1))
    except BaseException:
        if pool is not None:
            _terminate(pool)
        raise
    pool.close()
    pool.join()
    seconds = time.perf_counter() - start

    return Estimate(
        pi=4.0 * hits / samples,
        samples=samples,
        seconds=seconds,
        cores=cores,
        host=socket.gethostname(),
    )
