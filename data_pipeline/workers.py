"""DataLoader worker hygiene shared by the readers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

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

    A worker that a fork server started (`worker_context`) has the server as its parent, which
    outlives the rank: every worker holds the server's "alive" pipe open, so neither would ever
    end. It watches the rank through multiprocessing's parent sentinel instead (a pipe the rank
    holds open; it reads as closed once the rank is gone) and exits at once.
    """
    import multiprocessing

    owner = multiprocessing.parent_process()
    if owner is not None and owner.pid != os.getppid():
        threading.Thread(target=_exit_when_closed, args=(owner.sentinel,), name="recap-owner-watch", daemon=True).start()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _exit_when_closed(sentinel: int) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])
    os._exit(1)


# How this process starts DataLoader workers: None is the platform's default (fork on Linux).
_start_method: str | None = None
# Imported once by the fork server, so that each worker it forks starts with them loaded.
FORKSERVER_PRELOAD = ["torch", "data_pipeline.shard_reader"]


def set_worker_start_method(method: str | None) -> None:
    """Start this process's DataLoader workers with ``method`` ("forkserver") or the default (None).

    train/runtime/processes.py asks for the fork server while a process group is up. Forking a
    process whose C++ threads take Python's GIL can deadlock the child: a gloo thread that has
    just finished a collective creates and deletes a Python thread state under CPython's
    interpreter-head lock, and a fork at that moment (a rank starting its workers right after
    an all-gather) leaves the child waiting for that lock forever: CPython up to 3.11.7 takes it
    in the child before re-creating it (python/cpython#112275). The fork server is a fresh
    single-threaded process, so its forks are safe, whatever the Python version.
    """
    if method not in (None, "forkserver"):
        raise ValueError(f"worker start method must be None or 'forkserver', got {method!r}")
    global _start_method
    _start_method = method


def worker_context() -> Any:
    """The multiprocessing context for DataLoader(multiprocessing_context=...): None (the
    default) or a running fork server's. The fork server and its resource tracker start with
    RANK_SIGNALS blocked, a mask they and every worker the server forks inherit: the SIGTERM or
    SIGUSR1 that torchrun sends to the rank's process group must not end them (the workers would
    die with the server, die_with_parent) before the rank has saved its checkpoint."""
    if _start_method is None:
        return None
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    context = multiprocessing.get_context(_start_method)
    forkserver.set_forkserver_preload(FORKSERVER_PRELOAD)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, RANK_SIGNALS)
    try:
        resource_tracker.ensure_running()  # the server's helper; it ignores SIGTERM, not SIGUSR1
        signal.pthread_sigmask(signal.SIG_BLOCK, RANK_SIGNALS)  # the tracker's start unblocked SIGTERM here
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context
