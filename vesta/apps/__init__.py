"""The programs: ``vestad`` (the launcher), ``vesta`` (the CLI), ``vestatop`` and the demo."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is (see :func:`signals_interrupt`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Interrupted` as Ctrl-C raises
    KeyboardInterrupt, so that a program cleans up (cancels its job, gives the terminal back)
    as it does on Ctrl-C. A signal ignored on purpose (``nohup``) stays ignored; outside the
    main thread, signals are left alone."""

    def raise_it(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, raise_it)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
