"""Progressive resolution schedule: stage lookup at every step, boundaries, checks."""

from __future__ import annotations

import pytest

from train.t2i.resolution_schedule import ResolutionStage, check_schedule, stage_at, stage_starts, total_steps

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


def test_a_plan_resumes_inside_a_stage_and_names_the_sampling_resolution() -> None:
    from train.t2i.resolution_schedule import ResolutionPlan

    plan = ResolutionPlan(tuple(PRODUCTION), (8, 4, 2))
    assert len(plan) == 3 and plan.lengths == [1000, 300, 200] and plan.lrs == [1e-4, 5e-5, 2e-5]
    assert plan.labels() == ["256px x 1000", "512px x 300", "1024px x 200"]
    second = plan[1]
    assert (second.index, second.count, second.accum, second.start, second.end) == (1, 3, 4, 1000, 1300)
    assert [p.index for p in plan.remaining(0)] == [0, 1, 2]
    assert [p.index for p in plan.remaining(1000)] == [1, 2]  # exactly on the boundary: the next stage
    assert [p.index for p in plan.remaining(1299)] == [1, 2]  # inside it: that stage again, part way
    assert plan.remaining(1500) == []
    # the resolution trained at after ``step`` steps: the stage that ran the last one
    assert [plan.resolution_after(s) for s in (0, 1, 1000, 1001, 1500)] == [256, 256, 256, 512, 1024]
