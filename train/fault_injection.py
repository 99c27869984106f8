"""Failpoints for the fault-injection tests: kill a run at an exact step.

Off unless the environment variable RECAP_FAULT is set, e.g. ``sigkill@step=7`` (every rank)
or ``sigkill@step=7,rank=1``. A test sets it on a subprocess; nothing in conf/ can enable it.
"""

from __future__ import annotations

import os
import signal

ENV = "RECAP_FAULT"


def maybe_fail(*, step: int, rank: int) -> None:
    """Called at the end of every training step; acts when RECAP_FAULT names this step/rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    fields = {k: int(v) for k, v in (part.split("=", 1) for part in where.split(",") if part)}
    if fields.get("step") != step or fields.get("rank", rank) != rank:
        return
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError(f"{ENV}={spec!r}: unknown action {action!r} (known: sigkill)")
