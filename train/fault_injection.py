"""Failpoints for the fault-injection tests: kill a run at an exact point.

Off unless the environment variable RECAP_FAULT is set, e.g. ``sigkill@step=7`` (every rank),
``sigkill@step=7,rank=1``, or ``sigkill@recaption_batch=3`` / ``sigkill@recaption_shard=1``
(recaptioning: after the 3rd batch written, or between the 1st shard's rename and its stats
file), or ``nan@step=5,rank=1`` (the loss of training step 5 on rank 1 becomes NaN). A test
sets it on a subprocess; nothing in conf/ can enable it.
"""

from __future__ import annotations

import os
import signal
from typing import Any

ENV = "RECAP_FAULT"


def _matches(spec: str, action: str, rank: int, point: dict[str, int]) -> bool:
    kind, _, where = spec.partition("@")
    fields = {k: int(v) for k, v in (part.split("=", 1) for part in where.split(",") if part)}
    if kind != action or fields.pop("rank", rank) != rank or not fields:
        return False
    return all(point.get(k) == v for k, v in fields.items())


def poison_loss(loss: Any, *, rank: int, step: int) -> Any:
    """The loss (a tensor, or a dict with "loss"), made NaN when RECAP_FAULT is ``nan@step=N``
    for this (1-based) step and rank."""
    spec = os.environ.get(ENV)
    if not spec or not _matches(spec, "nan", rank, {"step": step}):
        return loss
    if isinstance(loss, dict):
        return {**loss, "loss": loss["loss"] * float("nan")}
    return loss * float("nan")


def maybe_fail(*, rank: int, **point: int) -> None:
    """Called at a failpoint (``step=N`` at the end of every training step, ...); acts when
    RECAP_FAULT names this point (every field it gives must match) and rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action = spec.partition("@")[0]
    if action not in ("sigkill", "nan"):
        raise ValueError(f"{ENV}={spec!r}: unknown action {action!r} (known: sigkill, nan)")
    if _matches(spec, "sigkill", rank, point):
        os.kill(os.getpid(), signal.SIGKILL)
