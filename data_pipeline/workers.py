"""DataLoader worker hygiene shared by the readers."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


# The rank handles these (train/runtime/preemption.py: checkpoint at the next step, then exit 75).
# torchrun passes them to the rank's whole process group, DataLoader workers included.
RANK_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def leave_signals_to_parent() -> None:
    """Ignore RANK_SIGNALS in this (worker) process: killed by one, a worker would take the
    DataLoader down before the rank could save its checkpoint; the rank ends it afterwards."""
    for sig in RANK_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent() -> None:
    """Make this (worker) process receive SIGKILL when its parent dies (Linux; no-op elsewhere).

    PyTorch's workers notice a dead parent only between items, and one blocked on a full result
    pipe never does: after a SIGKILL of the job it would linger holding the job's stdout/stderr
    (and its GPU context's host memory). The kernel's parent-death signal ends it at once.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
