"""`python -m train.runtime.torchrun_main ARGS`: torchrun, ending a failed job in one line.

launch/torchrun.py builds this command instead of `python -m torch.distributed.run`: the same
arguments, rendezvous, signal handling and exit status (1 when a worker fails). What differs is
the end of a job in which a worker exited non-zero (75 after a preemption, 3 for a full disk, 2
for a usage error): torchrun's main raises ChildFailedError, and Python printed a traceback of
torchrun's own frames and a table per rank below the workers' messages, which already say what
happened. The supervising `recap` reads every worker's exit code itself (launch/supervise.py);
here the traceback becomes one line naming each failed rank and its exit code.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from launch.quick_process import defer_gc, exit_now, resume_gc

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

EXIT_FAILED = 1  # torchrun's own status when a worker fails


def failed_ranks(exc: ChildFailedError) -> str:
    """'rank 0 exited 75, rank 1 exited 75': the failed global ranks, in order."""
    return ", ".join(f"rank {rank} exited {failure.exitcode}" for rank, failure in sorted(exc.failures.items()))


def main(argv: list[str] | None = None) -> int:
    defer_gc()  # torch imports faster without the collector (launch/quick_process.py)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    resume_gc()
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        print(f"torchrun: {failed_ranks(exc)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    exit_now(main())  # without the interpreter teardown, as the workers (launch/quick_process.py)
