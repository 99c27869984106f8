"""DeepSpeed's checkpoint save, made safe to fail: a rank whose write fails (a full disk) must
still take part in the engine's barriers, or the ranks whose writes succeeded wait for it forever.

DeepSpeed writes every state file through its checkpoint engine's ``save(state_dict, path)`` and
copies its zero_to_fp32.py recovery scripts beside them; for one save both are routed through a
wrapper that keeps the first failure, skips this rank's later writes and raises it once the
engine's save has returned on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_engine_state(engine: Any, directory: Path, tag: str, save_torch: Callable[[Any, Path], None]) -> None:
    """``engine.save_checkpoint`` into ``directory/tag/`` (collective), every file written by
    ``save_torch(obj, path)``; this rank's first failed write is raised after the engine's save
    returned (the checkpointer then fails the save on every rank alike)."""
    failed: list[Exception] = []

    def deferred(write: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            if failed:
                return
            try:
                write(*args, **kwargs)
            except Exception as exc:  # raised below, once past the engine's barriers
                failed.append(exc)
        return run

    engine.checkpoint_engine.save = deferred(lambda state_dict, path: save_torch(state_dict, Path(path)))
    engine._copy_recovery_script = deferred(engine._copy_recovery_script)
    try:
        engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
    finally:
        del engine.checkpoint_engine.save, engine._copy_recovery_script  # back to the engine's own
    if failed:
        raise failed[0]
