"""The parent side of a launch: run the launcher (torchrun), pass signals on, report one exit code.

torchrun reports only "a worker failed" (exit 1), whatever the workers' own codes were, so a
preempted job (every rank exits EXIT_REQUEUE after its checkpoint) would look like a crash to
the Slurm script that must decide to requeue it. Each worker therefore records its exit code in
``$RECAP_EXIT_DIR/rank_<RANK>.code`` (`record_exit`), and `run_supervised` combines them:
a real failure (the lowest rank's) wins over a requeue, a requeue over success; with no record
(a worker killed by SIGKILL) torchrun's own code stands.

Signals: the launcher runs in a process group of its own, and SIGTERM, SIGUSR1 and SIGINT sent
to this process are passed to that group: torchrun passes them on to every worker's process
group (``--signals-to-handle``); under DeepSpeed's launcher the workers share the group and get
them directly. Either launcher may die of a signal, or of a second one, before its workers have
saved and left (DeepSpeed's has no SIGUSR1 handler; torchrun's handler raises again while it
waits); so this process makes itself the "child subreaper" of its descendants (Linux), which
hands it the orphaned workers, and it waits for them (up to ``drain_timeout_s``) before it
reads their exit codes.

A multi-node launch whose rendezvous fails (a node that never joins within the join timeout)
ends torchrun with a bare ``RendezvousTimeoutError`` traceback. torchrun records its own fatal
exception in ``$TORCHELASTIC_ERROR_FILE`` (its ``@record`` entry point), so `run_supervised`
points that at a file of its own and, for a rendezvous failure, ends with one line naming the
endpoint, the node count and the timeout.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: preempted after a checkpoint; rerun the same command to resume
EXIT_DIR_ENV = "RECAP_EXIT_DIR"
LAUNCHER_ERROR_ENV = "TORCHELASTIC_ERROR_FILE"  # torchrun writes its own fatal exception there (JSON)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def record_exit(code: int | None, environ: dict[str, str] | None = None) -> None:
    """Worker side: write this rank's exit code where the launching parent reads it (no-op
    outside a supervised launch)."""
    env = os.environ if environ is None else environ
    directory = env.get(EXIT_DIR_ENV)
    if not directory or not Path(directory).is_dir():
        return
    rank = env.get("RANK", "0")
    tmp = Path(directory) / f".rank_{rank}.{os.getpid()}.tmp"
    tmp.write_text(str(0 if code is None else code))
    os.replace(tmp, Path(directory) / f"rank_{rank}.code")


def combine_exit_codes(recorded: dict[int, int], launcher_code: int) -> int:
    """One exit code for the job from each rank's recorded code and the launcher's.

    >>> combine_exit_codes({0: 75, 1: 75}, 1)
    75
    >>> combine_exit_codes({0: 75, 1: 3}, 1)
    3
    >>> combine_exit_codes({}, -9)
    -9
    """
    if launcher_code == 0:
        return 0
    failures = [code for _, code in sorted(recorded.items()) if code not in (0, EXIT_REQUEUE)]
    if failures:
        return failures[0]
    if EXIT_REQUEUE in recorded.values():
        return EXIT_REQUEUE
    return launcher_code


def read_exit_codes(directory: Path) -> dict[int, int]:
    out = {}
    for path in directory.glob("rank_*.code"):
        try:
            out[int(path.stem.split("_", 1)[1])] = int(path.read_text().strip())
        except ValueError:
            continue
    return out


def _option(cmd: Sequence[str], name: str) -> str | None:
    """The value of ``--name=value`` in a torchrun command line (None when absent)."""
    prefix = f"--{name}="
    return next((arg[len(prefix):] for arg in cmd if arg.startswith(prefix)), None)


def launcher_failure(error_file: Path, cmd: Sequence[str]) -> str | None:
    """One line explaining a rendezvous failure recorded by torchrun in ``error_file``; None for
    anything else (no file, another error: the workers' own messages already said it)."""
    try:
        message = str(json.loads(error_file.read_text())["message"]["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kind, _, detail = message.partition(":")
    if not kind.startswith("Rendezvous"):
        return None
    endpoint = _option(cmd, "rdzv-endpoint") or "?"
    nnodes = _option(cmd, "nnodes") or "?"
    conf = dict(part.split("=", 1) for part in (_option(cmd, "rdzv-conf") or "").split(",") if "=" in part)
    timeout = conf.get("join_timeout", "?")
    if kind == "RendezvousTimeoutError":
        return (f"the {nnodes} nodes did not join the rendezvous at {endpoint} within {timeout} s "
                "(launcher.rdzv_timeout_s); start every node with the same launcher.nnodes and "
                "launcher.rdzv_endpoint, and check that node 0 can be reached there")
    return (f"the rendezvous at {endpoint} ({nnodes} nodes, join timeout {timeout} s) failed: {kind}"
            f"{': ' + detail.strip() if detail.strip() else ''}; check launcher.rdzv_endpoint and that node 0 "
            "can be reached there")


def _become_subreaper() -> None:
    """Orphaned descendants are reparented to this process instead of init (Linux; no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap_descendants(deadline: float) -> bool:
    """Wait for every remaining child (orphaned workers handed to us) until ``deadline``; True
    when none is left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def run_supervised(cmd: Sequence[str], env: dict[str, str] | None = None, drain_timeout_s: float = 150.0) -> int:
    """Run ``cmd`` (torchrun ..., deepspeed ...) in its own process group, passing SIGTERM, SIGUSR1
    and SIGINT to that group; wait for the launcher and then for any worker it left behind (at most
    ``drain_timeout_s``); return the combined exit code. A failed rendezvous is explained in one
    line on stderr (`launcher_failure`)."""
    _become_subreaper()
    with tempfile.TemporaryDirectory(prefix="recap-exit-") as directory:
        error_file = Path(directory) / "launcher_error.json"  # torchrun sets each worker's own
        child_env = {**(os.environ if env is None else env), EXIT_DIR_ENV: directory,
                     LAUNCHER_ERROR_ENV: str(error_file)}
        proc = subprocess.Popen(list(cmd), env=child_env, start_new_session=True)

        def forward(signum: int, _frame: object) -> None:
            try:
                os.killpg(proc.pid, signum)
            except (ProcessLookupError, PermissionError):  # the group is gone already
                pass

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            code = proc.wait()
            if not _reap_descendants(time.monotonic() + drain_timeout_s):
                print(f"recap: warning: worker processes still running {drain_timeout_s:.0f} s after the launcher "
                      "ended; not waiting for them", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        explanation = launcher_failure(error_file, cmd) if code != 0 else None
        if explanation:
            print(f"recap: error: {explanation}", file=sys.stderr)
        return combine_exit_codes(read_exit_codes(Path(directory)), code)
