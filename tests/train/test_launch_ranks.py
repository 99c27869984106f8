"""launch/ranks.py: a process's share of an embarrassingly parallel job (torchrun, Slurm array)."""

from __future__ import annotations

import pytest

from launch.ranks import RankError, job_rank_and_world


@pytest.mark.parametrize(("env", "expected"), [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4"}, (3, 4)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "5"}, (2, 5)),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10"}, (2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 3)),
    # torchrun inside an array task: the array splits first, torchrun inside each task
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "1", "WORLD_SIZE": "4"}, (5, 8)),
])
def test_rank_and_world_from_the_environment(env: dict[str, str], expected: tuple[int, int]) -> None:
    assert job_rank_and_world(environ=env) == expected


def test_every_process_of_an_array_of_torchruns_is_distinct() -> None:
    seen = {job_rank_and_world(environ={"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "3",
                                        "RANK": str(r), "WORLD_SIZE": "2"}) for t in range(3) for r in range(2)}
    assert seen == {(i, 6) for i in range(6)}


def test_explicit_values_win_and_are_checked() -> None:
    assert job_rank_and_world(1, 3, environ={"RANK": "0", "WORLD_SIZE": "8"}) == (1, 3)
    with pytest.raises(RankError, match="set both rank and world_size"):
        job_rank_and_world(1, None, environ={})
    with pytest.raises(RankError, match=r"rank 3 is not in \[0, world_size=3\)"):
        job_rank_and_world(3, 3, environ={})
    with pytest.raises(RankError, match="SLURM_ARRAY_TASK_ID='x' is not an integer"):
        job_rank_and_world(environ={"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"})
    with pytest.raises(RankError, match="outside the array"):
        job_rank_and_world(environ={"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "2"})
