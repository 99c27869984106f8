"""Progressive resolution: which stage (256 -> 512 -> 1024 in production, 64 -> 128 in the toy)
a global step belongs to, and where each stage starts.

The trainer calls `stage_at(stages, step)` at every step: a resumed run lands in the right
stage (and the right step within it) from its global step alone, in the middle of a stage or
exactly on a boundary, with no extra state to checkpoint. A `ResolutionPlan` is the stages of one
run with each one's gradient accumulation (train/t2i/batches.py builds it from the config).
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


@dataclass(frozen=True)
class PlannedStage:
    """One resolution stage as a run takes it: its place in the plan, the micro-batches each rank
    accumulates per optimizer step, and its global steps ``start`` + 1 .. ``end``."""

    index: int
    count: int  # stages in the plan
    stage: ResolutionStage
    accum: int
    start: int

    @property
    def end(self) -> int:
        """The global step count when the stage is done."""
        return self.start + self.stage.steps


@dataclass(frozen=True)
class ResolutionPlan:
    """The stages of a run (checked with `check_schedule`) and each one's gradient accumulation."""

    stages: tuple[ResolutionStage, ...]
    accums: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> PlannedStage:
        return PlannedStage(index, len(self.stages), self.stages[index], self.accums[index],
                            stage_starts(self.stages)[index])

    @property
    def lengths(self) -> list[int]:
        """Optimizer steps per stage."""
        return [s.steps for s in self.stages]

    @property
    def lrs(self) -> list[float]:
        """Peak learning rate per stage."""
        return [s.lr for s in self.stages]

    def labels(self) -> list[str]:
        """``["64px x 300", "128px x 200"]``: the stages for logs and the summary."""
        return [f"{s.resolution}px x {s.steps}" for s in self.stages]

    def remaining(self, step: int) -> list[PlannedStage]:
        """The stages still to train after ``step`` global steps: the current one (possibly
        entered part way, as a resumed run does) and those after it; none once done."""
        first = stage_at(self.stages, step)[0] if step < total_steps(self.stages) else len(self.stages)
        return [self[index] for index in range(first, len(self.stages))]

    def resolution_after(self, step: int) -> int:
        """The resolution the run trains at when ``step`` steps are done (the first stage's at 0)."""
        return self.stages[stage_at(self.stages, step - 1)[0]].resolution if step else self.stages[0].resolution
