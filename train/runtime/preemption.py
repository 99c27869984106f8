"""Preemption: SIGTERM or SIGUSR1 ends a stage cleanly at its next safe point, with exit code 75.

A training run stops at the next step boundary, after a checkpoint; a shard job (`recap
recaption`, `recap cache`: train/runtime/shard_jobs.py) before its next batch, abandoning the
shards in progress (their partial files are removed; the done ones stay done).

Clusters announce the end of a job with a signal: Slurm sends SIGUSR1 ``--signal=USR1@90``
seconds before the time limit and SIGTERM when it preempts; torchrun passes both on to every
worker. The handler only records the signal (so one that arrives in the middle of a checkpoint
save cannot interrupt it). At each step boundary the ranks agree with one all-reduce whether any
of them was signalled, so they all save a checkpoint at the same step and leave with
`Preempted`, which `recap` turns into exit code 75 (launch/supervise.py: requeue).

DataLoader workers share the rank's process group, which torchrun signals as a whole; they
ignore these signals (data_pipeline/workers.py) and end when the rank ends them.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

from data_pipeline.workers import RANK_SIGNALS

log = logging.getLogger("recap")


class StagePreempted(Exception):
    """A stage stopped at a safe point after SIGTERM/SIGUSR1: `recap` prints the message and exits
    75 (launch/supervise.py's EXIT_REQUEUE), and rerunning the same command continues."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class Preempted(StagePreempted):
    """Raised after the preemption checkpoint of ``step`` was saved on every rank."""

    def __init__(self, step: int, signal_name: str, checkpoint: Any) -> None:
        super().__init__(f"preempted by {signal_name} at step {step}: checkpoint {checkpoint} saved on every rank; "
                         "rerun the same command to resume", signal_name)
        self.step, self.checkpoint = step, checkpoint


class ShardsPreempted(StagePreempted):
    """A shard job stopped before its next batch: ``done`` shards were completed in this run,
    ``abandoned`` (input shard names) were in progress and are left not done."""

    def __init__(self, signal_name: str, done: int, abandoned: list[str]) -> None:
        where = f"abandoned {len(abandoned)} shard(s) in progress ({', '.join(abandoned)}), their partial " \
                f"files removed" if abandoned else "no shard was in progress"
        super().__init__(f"preempted by {signal_name}: {done} shard(s) written and marked done in this run; {where}; "
                         "rerun the same command to write the rest", signal_name)
        self.done, self.abandoned = done, abandoned


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 while a training loop runs (a context manager; the previous
    handlers come back on exit). ``agreed(runtime)`` is collective: every rank calls it."""

    def __init__(self, then: str = "saving a checkpoint at the end of this step, then exiting") -> None:
        self.received: int | None = None
        self.then = then  # what the stage does next, for the warning logged on the first signal
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: %s", signal.Signals(signum).name, self.then)

    def __enter__(self) -> PreemptionWatch:
        for sig in RANK_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def signal_name(self) -> str | None:
        """The name of the first signal this process received ("SIGTERM"...), or None."""
        return signal.Signals(self.received).name if self.received else None

    def agreed(self, runtime: Any) -> str | None:
        """The name of the signal some rank received ("SIGUSR1"...), the same on every rank, or
        None: one all-reduce (max of the signal numbers) per call."""
        signum = runtime.max_int(self.received or 0)
        return signal.Signals(signum).name if signum else None

