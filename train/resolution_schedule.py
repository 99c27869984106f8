"""Progressive resolution: which stage (256 -> 512 -> 1024 in production, 64 -> 128 in the toy)
a global step belongs to, and where each stage starts.

The trainer calls `stage_at(stages, step)` at every step: a resumed run lands in the right
stage (and the right step within it) from its global step alone, in the middle of a stage or
exactly on a boundary, with no extra state to checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ResolutionStage:
    """One stage: base resolution in pixels (its bucket table), length in optimizer steps, batch, LR."""

    resolution: int
    steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float


def check_schedule(stages: Sequence[ResolutionStage], *, multiple: int = 64) -> None:
    """ValueError naming the stage when the schedule is unusable."""
    if not stages:
        raise ValueError("the resolution schedule needs at least one stage")
    for i, s in enumerate(stages):
        if s.steps < 1 or s.lr <= 0:
            raise ValueError(f"stage {i}: steps must be >= 1 and lr > 0, got steps={s.steps}, lr={s.lr}")
        if s.resolution % multiple:
            raise ValueError(f"stage {i}: resolution {s.resolution} is not a multiple of {multiple}")
        if i and s.resolution < stages[i - 1].resolution:
            raise ValueError(f"stage {i}: resolution {s.resolution} is below the previous stage's "
                             f"{stages[i - 1].resolution} (progressive training only grows)")


def stage_starts(stages: Sequence[ResolutionStage]) -> list[int]:
    """The global step at which each stage starts (the first is 0)."""
    starts, total = [], 0
    for s in stages:
        starts.append(total)
        total += s.steps
    return starts


def total_steps(stages: Sequence[ResolutionStage]) -> int:
    return sum(s.steps for s in stages)


def stage_at(stages: Sequence[ResolutionStage], step: int) -> tuple[int, int]:
    """(stage index, steps already done in it) for global step ``step`` (0-based: the step about
    to run). ValueError past the end of the schedule."""
    if step < 0 or step >= total_steps(stages):
        raise ValueError(f"step {step} is outside the schedule's {total_steps(stages)} steps")
    for index, start in reversed(list(enumerate(stage_starts(stages)))):
        if step >= start:
            return index, step - start
    raise AssertionError("unreachable: the first stage starts at 0")
