"""Exit statuses: what ``vesta`` exits with, and the one place that maps outcomes to them.

SPEC: 0 done, 1 the job failed, 2 usage or input error, 3 no daemon to talk to; ``exec`` exits with
the command's own status, or, where the command ran to no status of its own (as ``timeout`` and
``env`` do): 124 timed out, 125 vesta could not run it, 126 not executable, 127 not found, 128+N
killed by signal N. 130 is Ctrl-C. Standard library only: job processes and the CLI import it.
"""

from __future__ import annotations

import contextlib
import os
import signal

OK = 0
FAILED = 1
USAGE = 2
NO_DAEMON = 3
TIMED_OUT = 124
NOT_RUN = 125
NOT_EXECUTABLE = 126
NOT_FOUND = 127
CANCELLED = 128 + signal.SIGINT
BROKEN_PIPE = 128 + signal.SIGPIPE


def from_returncode(returncode: int) -> int:
    """A shell-style status from a ``Popen.returncode`` or ``Process.exitcode``: the code itself,
    or 128+N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def killed_by(signum: int) -> int:
    """The status of a process ended by signal ``signum``."""
    return 128 + signum


def not_finished(kind: str) -> int:
    """The status of a job that could not run to its end: 125 for exec (vesta could not run the
    command), 1 (the job failed) for the other kinds."""
    return NOT_RUN if kind == "exec" else FAILED


def exec_failure(code: int) -> int:
    """The status of an exec that did not complete: timed out, not executable, not found and
    killed by a signal keep their meaning; anything else is "vesta could not run it" (125)."""
    if code in (TIMED_OUT, NOT_EXECUTABLE, NOT_FOUND) or code > 128:
        return code
    return NOT_RUN


def kill_group(pgid: int, signum: int = signal.SIGKILL) -> None:
    """Signal a process group; a group that is gone, or not ours, is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
