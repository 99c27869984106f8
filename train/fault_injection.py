"""Failpoints for the fault-injection tests: kill a run at an exact point.

Off unless the environment variable RECAP_FAULT is set, e.g. ``sigkill@step=7`` (every rank),
``sigkill@step=7,rank=1``, or ``sigkill@recaption_batch=3`` / ``sigkill@recaption_shard=1``
(recaptioning: after the 3rd batch written, or between the 1st shard's rename and its stats
file). A test sets it on a subprocess; nothing in conf/ can enable it.
"""

from __future__ import annotations

import os
import signal

ENV = "RECAP_FAULT"


def maybe_fail(*, rank: int, **point: int) -> None:
    """Called at a failpoint (``step=N`` at the end of every training step, ...); acts when
    RECAP_FAULT names this point (every field it gives must match) and rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, where = spec.partition("@")
    fields = {k: int(v) for k, v in (part.split("=", 1) for part in where.split(",") if part)}
    if fields.pop("rank", rank) != rank or not fields or any(point.get(k) != v for k, v in fields.items()):
        return
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError(f"{ENV}={spec!r}: unknown action {action!r} (known: sigkill)")
