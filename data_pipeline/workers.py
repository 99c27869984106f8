"""DataLoader worker hygiene shared by the readers."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


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
