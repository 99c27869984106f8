"""Progressive resolution schedule: stage lookup at every step, boundaries, checks."""

from __future__ import annotations

import pytest

from train.resolution_schedule import ResolutionStage, check_schedule, stage_at, stage_starts, total_steps

PRODUCTION = [ResolutionStage(256, 1000, 2048, 32, 1e-4), ResolutionStage(512, 300, 1024, 16, 5e-5),
              ResolutionStage(1024, 200, 512, 8, 2e-5)]


def test_every_step_maps_to_its_stage() -> None:
    check_schedule(PRODUCTION)
    assert stage_starts(PRODUCTION) == [0, 1000, 1300] and total_steps(PRODUCTION) == 1500
    assert [stage_at(PRODUCTION, s) for s in (0, 999, 1000, 1001, 1299, 1300, 1499)] == [
        (0, 0), (0, 999), (1, 0), (1, 1), (1, 299), (2, 0), (2, 199)]
    walked = [stage_at(PRODUCTION, s)[0] for s in range(1500)]
    assert [walked.count(i) for i in range(3)] == [1000, 300, 200]
    assert walked == sorted(walked)
    for bad in (-1, 1500):
        with pytest.raises(ValueError, match="outside the schedule's 1500 steps"):
            stage_at(PRODUCTION, bad)


@pytest.mark.parametrize(("stages", "message"), [
    ([], "at least one stage"),
    ([ResolutionStage(96, 10, 8, 8, 1e-4)], "96 is not a multiple of 64"),
    ([ResolutionStage(128, 10, 8, 8, 1e-4), ResolutionStage(64, 10, 8, 8, 1e-4)], "below the previous"),
    ([ResolutionStage(64, 0, 8, 8, 1e-4)], "stage 0: steps must be >= 1"),
])
def test_bad_schedules_name_the_stage(stages: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_schedule(stages)
