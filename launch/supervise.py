"""The parent side of a launch: run the launcher (torchrun), pass signals on, report one exit code.

torchrun reports only "a worker failed" (exit 1), whatever the workers' own codes were, so a
preempted job (every rank exits EXIT_REQUEUE after its checkpoint) would look like a crash to
the Slurm script that must decide to requeue it. Each worker therefore records its exit code in
``$RECAP_EXIT_DIR/rank_<RANK>.code`` (`record_exit`), and `run_supervised` combines them:
a real failure (the lowest rank's) wins over a requeue, a requeue over success; with no record
(a worker killed by SIGKILL) torchrun's own code stands.

Signals: SIGTERM and SIGUSR1 sent to this process are passed to torchrun, which passes them to
every worker's process group (``--signals-to-handle``); SIGINT from a terminal already reaches
torchrun (same process group), so it is only kept from raising here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: preempted after a checkpoint; rerun the same command to resume
EXIT_DIR_ENV = "RECAP_EXIT_DIR"
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


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


def run_supervised(cmd: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` (torchrun ...), forwarding SIGTERM/SIGUSR1 to it; the combined exit code."""
    with tempfile.TemporaryDirectory(prefix="recap-exit-") as directory:
        child_env = {**(os.environ if env is None else env), EXIT_DIR_ENV: directory}
        proc = subprocess.Popen(list(cmd), env=child_env)

        def forward(signum: int, _frame: object) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return combine_exit_codes(read_exit_codes(Path(directory)), code)
