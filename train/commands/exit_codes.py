"""`recap`'s exit codes and its one-line error: 0 done, 1 crash, 2 usage/config error, 3 data error
(too many bad samples, an unusable checkpoint, or a checkpoint save that failed), 4 training
diverged, 75 preempted after a checkpoint (launch/supervise.py's EXIT_REQUEUE)."""

from __future__ import annotations

import sys

EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_DIVERGED = 4


def fail(stage: str, message: str, code: int) -> int:
    """Print ``recap STAGE: error: MESSAGE`` as one redacted line on stderr; returns ``code``.

    The line goes out in a single write: the ranks of a job share one stderr pipe, and print()'s
    separate write of the newline let two ranks' lines interleave into one."""
    from train.outputs.redaction import redact_text

    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    sys.stderr.write(f"recap {stage}: error: {redact_text(one_line)}\n")
    sys.stderr.flush()
    return code


def warn(stage: str, message: str) -> None:
    """Print ``recap STAGE: warning: MESSAGE`` as one redacted line on stderr (the run goes on)."""
    from train.outputs.redaction import redact_text

    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    sys.stderr.write(f"recap {stage}: warning: {redact_text(one_line)}\n")
    sys.stderr.flush()
