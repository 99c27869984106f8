"""Which slice of an embarrassingly parallel job this process is: torchrun or a Slurm array.

Recaptioning and caching need no process group: each process takes a deterministic share of
the shards and never talks to the others. Its (rank, world size) comes from, in order:
explicit config values, torchrun's RANK/WORLD_SIZE, a Slurm array's task id and count, or
(0, 1). Under both torchrun and an array, the array splits first and torchrun inside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


class RankError(ValueError):
    """Inconsistent rank settings (the stage reports it as a config error)."""


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RankError(f"environment variable {name}={value!r} is not an integer") from None


def job_rank_and_world(rank: int | None = None, world_size: int | None = None,
                       environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world_size) of this process among all processes of the job."""
    if (rank is None) != (world_size is None):
        raise RankError("set both rank and world_size, or neither (they then come from torchrun or Slurm)")
    if rank is not None and world_size is not None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise RankError(f"rank {rank} is not in [0, world_size={world_size})")
        return rank, world_size
    env = os.environ if environ is None else environ
    local_rank, local_world = _int(env, "RANK") or 0, _int(env, "WORLD_SIZE") or 1
    task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is None or count is None:
        return local_rank, local_world
    first = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
    step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
    index = (task - first) // step
    if not 0 <= index < count:
        raise RankError(f"Slurm array task {task} is outside the array (min {first}, step {step}, count {count})")
    return index * local_world + local_rank, count * local_world
