"""Failpoints for the fault-injection tests: kill or signal a run, or fail a write, at an exact point.

Off unless the environment variable RECAP_FAULT is set. A fault is ``ACTION@POINT[,rank=R]``:

- actions: ``sigkill`` (the process dies on the spot), ``sigterm`` / ``sigusr1`` (the signal a
  cluster sends before preempting; train/runtime/preemption.py handles it), ``nan`` (the loss of that
  training step becomes NaN), ``enospc`` / ``edquot`` / ``eio`` (the write of a file fails as on a
  full disk, an exceeded quota or a failing disk: part of the file is written, then OSError with
  that errno and the file's name; at ``save=N``: the first file this rank writes into step N's
  checkpoint: ``model.safetensors`` on one process, ``rank_00001.pt`` on DDP's rank 1, a file of
  ``deepspeed/`` under ZeRO);
- points: ``step=N`` (the end of training step N; for ``nan``: step N's loss),
  ``save=N`` (in the middle of the checkpoint save of step N, rank files written, not yet
  committed), ``recaption_batch=N`` / ``recaption_shard=N`` (recaptioning: after the Nth batch
  written, or between the Nth shard's rename and its stats file), ``cache_batch=N`` /
  ``cache_shard=N``; a ``from_`` prefix matches that point and every later one
  (``nan@from_step=5``: step 5 and all steps after it);
- ``rank=R``: only on that rank (default: every rank); ``group=1``: signal the process's whole
  process group (the rank and its DataLoader workers, as torchrun and Slurm do).

Several faults are separated by ``;``: ``nan@step=3,rank=1;nan@from_step=5,rank=1``. A test sets
RECAP_FAULT on a subprocess (or with monkeypatch); nothing in conf/ can enable it.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "RECAP_FAULT"
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1}
WRITE_ERRORS = {"enospc": errno.ENOSPC, "edquot": errno.EDQUOT, "eio": errno.EIO}
ACTIONS = (*SIGNALS, "nan", *WRITE_ERRORS)
PARTIAL_BYTES = 64  # what a failed write leaves of its file
FROM = "from_"


@dataclass(frozen=True)
class Fault:
    action: str
    point: dict[str, int] = field(default_factory=dict)  # every entry must match; "from_x": x >= value
    rank: int | None = None  # None: every rank
    group: bool = False  # signal the process group, not just this process

    def matches(self, action: str, rank: int, point: dict[str, int]) -> bool:
        if action != self.action or (self.rank is not None and self.rank != rank) or not self.point:
            return False
        return all(_field_matches(k, v, point) for k, v in self.point.items())


def _field_matches(key: str, value: int, point: dict[str, int]) -> bool:
    if key.startswith(FROM):
        here = point.get(key[len(FROM):])
        return here is not None and here >= value
    return point.get(key) == value


def parse_faults(text: str) -> list[Fault]:
    """The faults of a RECAP_FAULT value (``;``-separated); a malformed one is a ValueError."""
    faults = []
    for spec in (part.strip() for part in text.split(";")):
        if not spec:
            continue
        action, _, where = spec.partition("@")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}={text!r}: unknown action {action!r} (known: {', '.join(ACTIONS)})")
        try:
            fields = {k.strip(): int(v) for k, v in (part.split("=", 1) for part in where.split(",") if part)}
        except ValueError:
            raise ValueError(f"{ENV}={text!r}: {spec!r} is not ACTION@key=N[,key=N...]") from None
        rank, group = fields.pop("rank", None), bool(fields.pop("group", 0))
        faults.append(Fault(action, fields, rank, group))
    return faults


def _faults() -> list[Fault]:
    return parse_faults(os.environ.get(ENV, ""))


def poison_loss(loss: Any, *, rank: int, step: int) -> Any:
    """The loss (a tensor, or a dict with "loss"), made NaN when RECAP_FAULT names this
    (1-based) step and rank: ``nan@step=N`` or ``nan@from_step=N``."""
    if not any(f.matches("nan", rank, {"step": step}) for f in _faults()):
        return loss
    if isinstance(loss, dict):
        return {**loss, "loss": loss["loss"] * float("nan")}
    return loss * float("nan")


def maybe_fail(*, rank: int, **point: int) -> None:
    """Called at a failpoint (``step=N`` at the end of every training step, ``save=N`` inside a
    checkpoint save, ...); sends the signal of every fault that names this point and rank."""
    for fault in _faults():
        for action, signum in SIGNALS.items():
            if fault.matches(action, rank, point):
                if fault.group:
                    os.killpg(os.getpgrp(), signum)
                else:
                    os.kill(os.getpid(), signum)


def maybe_fail_write(path: Path, *, rank: int, **point: int) -> None:
    """Called just before ``path`` is written at a failpoint (``save=N``: before each file of step
    N's checkpoint); for a fault like ``enospc@save=N`` naming this point and rank, writes the
    first bytes of the file and raises the OSError that write would raise (errno, its text, the
    file's name), as a disk that fills up in the middle of a file does."""
    for fault in _faults():
        for action, code in WRITE_ERRORS.items():
            if fault.matches(action, rank, point):
                with open(path, "wb") as f:
                    f.write(b"\0" * PARTIAL_BYTES)
                raise OSError(code, os.strerror(code), str(path))
