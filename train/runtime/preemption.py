"""Preemption: SIGTERM or SIGUSR1 ends a training run cleanly at the next step boundary.

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


class Preempted(Exception):
    """Raised after the preemption checkpoint of ``step`` was saved on every rank."""

    def __init__(self, step: int, signal_name: str, checkpoint: Any) -> None:
        super().__init__(f"preempted by {signal_name} at step {step}: checkpoint {checkpoint} saved on every rank; "
                         "rerun the same command to resume")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 while a training loop runs (a context manager; the previous
    handlers come back on exit). ``agreed(runtime)`` is collective: every rank calls it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                        signal.Signals(signum).name)

    def __enter__(self) -> PreemptionWatch:
        for sig in RANK_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, runtime: Any) -> str | None:
        """The name of the signal some rank received ("SIGUSR1"...), the same on every rank, or
        None: one all-reduce (max of the signal numbers) per call."""
        signum = runtime.max_int(self.received or 0)
        return signal.Signals(signum).name if signum else None

